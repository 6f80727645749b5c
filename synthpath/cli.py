"""Command line: ``synthpath build|validate|ingest|train|audit|generate|export|evaluate``."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import signal
import sys
from pathlib import Path

from . import __version__
from .interrupt import Interrupted, disk_problem, signals_stop
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
    names = [st.name for st in stages()]
    p.add_argument("--force", action="append", default=[], metavar="STAGE", choices=names,
                   help=f"re-run STAGE (and so everything after it) even if it is up to date; one of {', '.join(names)}")
    p.add_argument("--until", metavar="STAGE", choices=names, help=f"stop after STAGE; one of {', '.join(names)}")

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
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as e:
        print(str(e), file=sys.stderr)
        return 2

    if args.command == "validate":
        from .slides.probe import slide_problems

        try:
            problems = slide_problems(recipe, args.recipe)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        if problems:
            print(str(RecipeError(args.recipe, problems)), file=sys.stderr)
            return 2
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
    command = "synthpath " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    try:
        with signals_stop():
            return _run(args, recipe, options)
    except (Interrupted, KeyboardInterrupt) as e:
        if not isinstance(e, Interrupted):
            e = Interrupted(signal.SIGINT)
        where = f" during stage {e.stage!r}: it is not marked finished" if e.stage else ""
        kept = f", and its work so far is kept in {e.partial}" if e.partial else ""
        print(f"\nstopped by {e.name}{where}{kept}.\n"
              f"To resume, run the same command again: {command}\n"
              f"(train and generate carry on from their last checkpoint; ingest starts its slides again)",
              file=sys.stderr)
        return e.exit_code
    except Exception as e:
        disk = disk_problem(e)
        if disk is None:
            raise
        what, path = disk
        print(f"error: cannot write {path or recipe.output_dir}: {what} ({type(e).__name__}: {e}).\n"
              f"The running stage is not marked finished. Free space or fix the folder's "
              f"permissions (or choose another output_dir), then run the same command again to resume: {command}",
              file=sys.stderr)
        return 1


def _run(args, recipe, options) -> int:
    from .pipeline import ReleaseBlocked, StageDeferred, StageError, build, run_stage
    from .distributed import build_ranked, generate_ranked, rank_world, under_torchrun

    try:
        ranked = under_torchrun()
        if args.command == "build":
            run_build = build_ranked if ranked else build
            for m in run_build(recipe, force=tuple(args.force), until=args.until, options=options):
                print(f"[{m['stage']}] done in {m.get('seconds', 0):.1f}s -> {recipe.output_dir / m['stage']}")
            if not ranked or rank_world()[0] == 0:
                _print_outputs(recipe)
        elif args.command == "train" and _worker_rank():  # torchrun/srun rank > 0: trains, writes nothing
            from .train.distributed import run_train_worker

            run_train_worker(recipe, force=args.force, options=options)
        elif ranked and args.command != "generate" and rank_world()[0] != 0:
            print(f"rank {rank_world()[0]}: `{args.command}` is a single-process stage; rank 0 runs it")
        else:
            if ranked and args.command == "generate":
                m = generate_ranked(recipe, force=args.force, options=options)
                if m is None:
                    raise StageDeferred(f"rank {rank_world()[0]} did its share; another rank finalised the stage")
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
