"""One rank of ``synthpath train`` under torchrun that SIGKILLs at a chosen point, for
tests/test_distributed_kill.py.

``KILL_AT=<rank>:<point>:<step>:<scope>`` (empty: no kill). ``point``:

- ``grad``: after this process's ``<step>``-th optimiser step;
- ``state``: in the middle of writing the resumable state of step ``<step>`` (rank 0): the
  state's temp folder holds a torn tensor file, ``latest.json`` still names the previous one;
- ``finalise``: after training returned, before the stage is finalised (rank 0, run_stage).

``scope``: ``self`` kills this process only (torchrun must then stop the other rank);
``job`` kills the torchrun agent, every rank and this process at once (a node failure,
``scancel``, the OOM killer), each with SIGKILL. Each rank writes its pid to
``$KILL_PIDS/rank<r>`` so the job can be found. Prints ``OPTIMISER_STEPS <n>`` at the end
(the wrapping and the run are tests/kill_common.py's, shared with tests/train_kill_driver.py)."""

import os
import signal
import sys
from pathlib import Path

from kill_common import train_with_kill_points

rank = int(os.environ["RANK"])
who, point, at, scope = (os.environ.get("KILL_AT") or "-1:::").split(":")
pids = Path(os.environ["KILL_PIDS"])
pids.mkdir(parents=True, exist_ok=True)
(pids / f"rank{rank}").write_text(str(os.getpid()))


def die():
    if scope == "job":  # the other ranks, the torchrun agent, then this rank
        for f in pids.glob("rank*"):
            pid = int(f.read_text())
            if pid != os.getpid():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        os.kill(os.getppid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


mine = int(who) == rank


def wrap_save_state(state_fn):
    def save_state(root, *, step, **k):
        if mine and point == "state" and step == int(at):
            work = Path(root) / f"step_{step:07d}.tmp"
            work.mkdir(parents=True, exist_ok=True)
            (work / "tensors.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"model.")  # torn
            die()
        return state_fn(root, step=step, **k)

    return save_state


train_with_kill_points(sys.argv[1], die, grad_at=int(at) if mine and point == "grad" else None,
                       finalise=mine and point == "finalise", wrap={"save_state": wrap_save_state})
