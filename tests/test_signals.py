"""Ctrl-C (SIGINT) and ``kill`` (SIGTERM) during ``synthpath ingest``: a clean stop with the
shell's exit code (130 / 143), no traceback, a resume hint, nothing marked finished, and the
same command then finishes the stage."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from synthpath.interrupt import Interrupted, critical, signals_stop
from synthpath.slides.testdata import make_pyramid_tiff

ROOT = Path(__file__).resolve().parents[1]


def _recipe(tmp_path: Path) -> Path:
    slide = make_pyramid_tiff(tmp_path / "big.tif", size=(2048, 2048), mpp=0.5, levels=3)
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({
        "name": "sig", "output_dir": str(tmp_path / "run"),
        "data": {"slides": [{"path": str(slide), "label": "a"}], "classes": ["a"]},
        "ingest": {"tiling": {"levels": [2.0, 1.0, 0.5], "tile_px": 32}, "tissue": {"min_tissue_fraction": 0.2},
                   "workers": 1}}))
    return p


def _cli(recipe: Path, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "synthpath.cli", "ingest", str(recipe)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_ingest_stops_cleanly_and_resumes(tmp_path, signum, code):
    recipe = _recipe(tmp_path)
    run = tmp_path / "run"
    proc = _cli(recipe, tmp_path)
    try:
        deadline = time.time() + 120
        while not (run / "ingest.partial" / "tmp").is_dir():  # the stage is reading the slide
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "ingest never started"
            time.sleep(0.05)
        time.sleep(0.3)
        assert proc.poll() is None, "ingest finished before the signal; use a larger slide"
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert f"stopped by {signal.Signals(signum).name} during stage 'ingest'" in err
    assert "To resume, run the same command again" in err and str(recipe) in err
    assert not (run / "ingest").exists()  # not marked finished
    assert (run / "ingest.partial" / "fingerprint.json").is_file()
    if signum == signal.SIGTERM:  # resuming once is enough to show the folder is usable
        proc = _cli(recipe, tmp_path)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert (run / "ingest" / "manifest.json").is_file() and not (run / "ingest.partial").exists()


def test_critical_section_defers_the_signal_until_it_ends():
    done = []
    with pytest.raises(Interrupted) as ei:
        with signals_stop():
            with critical():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                done.append("finished the critical block")
            done.append("never reached")
    assert done == ["finished the critical block"]
    assert ei.value.exit_code == 143
    # handlers are restored afterwards
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
