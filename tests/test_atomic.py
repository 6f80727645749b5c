"""synthpath.atomic: standard JSON only, and no temp file left by a failed write."""

from __future__ import annotations

import errno
import json
import math

import numpy as np
import pytest
import torch

from synthpath import atomic
from synthpath.atomic import write_json, write_text


def test_non_finite_numbers_never_reach_json(tmp_path, caplog):
    p = tmp_path / "ledger.json"
    write_json(p, {"epsilon": math.inf, "losses": [1.0, float("nan")], "arr": np.array([0.5, -np.inf]),
                   "t": torch.tensor([2.0, float("nan")]), "np": np.float32("nan"), "ok": 3})
    text = p.read_text()
    assert "Infinity" not in text and "NaN" not in text
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard constant {c}"))
    assert data == {"epsilon": None, "losses": [1.0, None], "arr": [0.5, None], "t": [2.0, None], "np": None, "ok": 3}
    assert "$.epsilon = inf" in caplog.text  # the key is named
    with pytest.raises(ValueError, match=r"ledger\.json.*\$\.epsilon = inf"):
        write_json(p, {"epsilon": math.inf}, nonfinite="error")
    assert json.loads(p.read_text())["epsilon"] is None  # the failed write left the old file


def test_failed_write_leaves_no_temp_file(tmp_path, monkeypatch):
    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(atomic.os, "replace", full)
    with pytest.raises(OSError):
        write_text(tmp_path / "a.txt", "x")
    assert list(tmp_path.iterdir()) == []
