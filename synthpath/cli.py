"""Command line: ``synthpath build|validate|ingest|train|audit|generate|export|evaluate``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import __version__
from .recipe import RecipeError, load_recipe


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", type=Path, help="recipe YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set train.steps=100 (repeatable)")
    p.add_argument("-v", "--verbose", action="store_true")


def _stage_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strict", action="store_true", help="ingest: fail on the first unreadable slide")
    p.add_argument("--allow-failed-audit", action="store_true",
                   help="export even if the audit failed (the dataset card then says so first)")


def make_parser() -> argparse.ArgumentParser:
    from .pipeline import stages

    ap = argparse.ArgumentParser(prog="synthpath", description="Privacy-preserving synthetic histopathology datasets.")
    ap.add_argument("--version", action="version", version=f"synthpath {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a recipe and report every problem at once")
    _common(p)
    p.add_argument("--print", action="store_true", help="print the resolved recipe")

    p = sub.add_parser("plan", help="print the training and generation compute of a recipe against its budget")
    _common(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")

    p = sub.add_parser("build", help="run every stage in order, skipping stages that are up to date")
    _common(p)
    _stage_options(p)
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="re-run STAGE (and so everything after it) even if it is up to date")
    p.add_argument("--until", metavar="STAGE", help="stop after STAGE")

    for st in stages():
        p = sub.add_parser(st.name, help=st.help)
        _common(p)
        _stage_options(p)
        p.add_argument("--force", action="store_true", help="re-run even if up to date")
    return ap


def _print_outputs(recipe) -> None:
    out = recipe.output_dir
    print(f"\nOutputs are in {out}")
    hf = out / "export" / "hf"
    if hf.is_dir():
        print(f"  Hugging Face dataset: {hf}\n    datasets.load_dataset({str(hf)!r})")
    shards = out / "generate" / "shards"
    if shards.is_dir():
        print(f"  WebDataset shards:    {shards}\n    webdataset.WebDataset(sorted(glob.glob({str(shards / '*.tar')!r}))).decode('pil')")
    for name in ("audit/report.md", "evaluate/report.json", "train/ledger.json"):
        if (out / name).exists():
            print(f"  {name}: {out / name}")


def _worker_rank() -> bool:
    from .train.distributed import is_worker_rank

    return is_worker_rank()


def main(argv: list[str] | None = None) -> int:
    from .pipeline import ReleaseBlocked, StageDeferred, StageError, build, run_stage

    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as e:
        print(str(e), file=sys.stderr)
        return 2

    if args.command == "validate":
        print(f"{args.recipe}: OK ({recipe.name}; levels {recipe.levels} µm/px, tile {recipe.tile_px} px)")
        if args.print:
            print(json.dumps(recipe.model_dump(mode="json"), indent=2))
        from .plan import compute_plan, format_plan

        plan = compute_plan(recipe)
        print(format_plan(plan))
        return 0 if plan.fits else 4

    if args.command == "plan":
        from .plan import compute_plan, format_plan

        plan = compute_plan(recipe)
        print(json.dumps(plan.to_json(), indent=2) if args.json else format_plan(plan))
        return 0 if plan.fits else 4

    options = {"strict": getattr(args, "strict", False), "allow_failed_audit": getattr(args, "allow_failed_audit", False)}
    try:
        if args.command == "build":
            for m in build(recipe, force=tuple(args.force), until=args.until, options=options):
                print(f"[{m['stage']}] done in {m.get('seconds', 0):.1f}s -> {recipe.output_dir / m['stage']}")
            _print_outputs(recipe)
        elif args.command == "train" and _worker_rank():  # torchrun/srun rank > 0: trains, writes nothing
            from .train.distributed import run_train_worker

            run_train_worker(recipe, force=args.force, options=options)
        else:
            m = run_stage(recipe, args.command, force=args.force, options=options)
            print(f"[{m['stage']}] -> {recipe.output_dir / m['stage']}")
            print(json.dumps(m.get("summary", {}), indent=2, default=str)[:4000])
    except StageDeferred as e:
        print(f"deferred: {e}")
        return 0
    except ReleaseBlocked as e:
        print(f"RELEASE BLOCKED: {e}", file=sys.stderr)
        return 3
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
