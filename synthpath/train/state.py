"""Resumable training state without pickles: tensors in safetensors, the rest in JSON.

``state/step_<step:07d>/`` holds ``tensors.safetensors`` (model and EMA weights, every tensor of
the optimiser state, the states of the training generators and torch's global RNG) and
``state.json`` (step, optimiser hyper-parameters and scalar state, numpy's and Python's RNG
states, the accountant history, the loss log). ``state/latest.json`` names the newest
complete folder and is replaced atomically only after that folder is fully written, so an
interruption while saving leaves the previous state in force.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..atomic import write_text

LATEST = "latest.json"



def optimizer_to_flat(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors (keyed ``opt.<param>.<name>``) and JSON."""
    tensors, scalars = {}, {}
    for pid, st in opt_state["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{pid}.{name}"] = v.detach().to("cpu").contiguous().clone()
            else:
                scalars.setdefault(str(pid), {})[name] = v
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict, device: torch.device) -> dict:
    """Inverse of :func:`optimizer_to_flat`: a dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if not key.startswith("opt."):
            continue
        _, pid, name = key.split(".", 2)
        # AdamW keeps "step" on the CPU unless capturable/fused; everything else lives with the params
        state.setdefault(int(pid), {})[name] = v if name == "step" else v.to(device)
    for pid, st in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(st)
    groups = [dict(g) for g in meta["param_groups"]]
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def _py_random_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _set_py_random_state(s: list) -> None:
    random.setstate((s[0], tuple(s[1]), s[2]))


def save_state(root: Path, *, step: int, model: torch.nn.Module, ema: torch.nn.Module,
               optimizer_state: dict, generators: dict[str, torch.Generator], extra: dict) -> Path:
    """Write ``root/step_<step:07d>`` and point ``root/latest.json`` at it; older folders are removed."""
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"
    final = root / name
    work = root / (name + ".tmp")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    tensors = {f"model.{k}": v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v.detach().to("cpu").contiguous().clone() for k, v in ema.state_dict().items()})
    opt_t, opt_meta = optimizer_to_flat(optimizer_state)
    tensors.update(opt_t)
    tensors["rng.torch"] = torch.get_rng_state()
    for gname, g in generators.items():
        tensors[f"gen.{gname}"] = g.get_state().to("cpu")
    save_file(tensors, str(work / "tensors.safetensors"))
    meta = {
        "step": step,
        "optimizer": opt_meta,
        "numpy_rng": np.random.get_state(legacy=False),
        "python_rng": _py_random_state(),
        "extra": extra,
    }
    (work / "state.json").write_text(json.dumps(meta, default=_json_default))
    if final.exists():
        shutil.rmtree(final)
    os.replace(work, final)
    write_text(root / LATEST, json.dumps({"step": step, "folder": name}))
    for old in root.iterdir():
        if old.is_dir() and old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"cannot store {type(o).__name__} in the JSON training state")


def load_state(root: Path, *, folder: str | None = None, skip: tuple[str, ...] = ()) -> dict | None:
    """The newest complete state under ``root`` as ``{"step", "tensors", "meta", "folder"}``, or None.

    ``folder``: load that state folder (named by rank 0 under data-parallel training) instead
    of the one ``latest.json`` names. ``skip``: tensor names not to read at all (another rank
    never reads rank 0's secret DP generator states)."""
    try:
        if folder is None:
            p = root / LATEST
            if not p.is_file():
                return None
            folder = json.loads(p.read_text())["folder"]
        where = root / folder
        meta = json.loads((where / "state.json").read_text())
        if skip:
            with safe_open(str(where / "tensors.safetensors"), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys() if k not in skip}
        else:
            tensors = load_file(str(where / "tensors.safetensors"))
    except (OSError, KeyError, TypeError, json.JSONDecodeError, SafetensorError) as e:
        raise RuntimeError(f"the resumable training state in {root} is unreadable ({e}); delete that folder "
                           f"to start training again from scratch") from None
    return {"step": int(meta["step"]), "tensors": tensors, "meta": meta, "folder": folder}


def restore(state: dict, *, model: torch.nn.Module, ema: torch.nn.Module, optimizer,
            generators: dict[str, torch.Generator], device: torch.device) -> dict:
    """Load weights, optimiser state and every RNG state saved by :func:`save_state`;
    returns the JSON ``extra`` dict."""
    t, meta = state["tensors"], state["meta"]
    model.load_state_dict({k[len("model."):]: v for k, v in t.items() if k.startswith("model.")})
    ema.load_state_dict({k[len("ema."):]: v for k, v in t.items() if k.startswith("ema.")})
    optimizer.load_state_dict(optimizer_from_flat(t, meta["optimizer"], device))
    torch.set_rng_state(t["rng.torch"])
    for gname, g in generators.items():
        key = f"gen.{gname}"
        if key not in t:
            raise RuntimeError(f"the training state lacks generator {gname!r}")
        g.set_state(t[key])
    npst = dict(meta["numpy_rng"])
    npst["state"] = {**npst["state"], "key": np.asarray(npst["state"]["key"], dtype=np.uint32)}
    np.random.set_state(npst)
    _set_py_random_state(meta["python_rng"])
    return meta.get("extra", {})
