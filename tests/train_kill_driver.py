"""``synthpath train`` in one process that signals itself at a chosen point, for
tests/test_train_kill.py.

``KILL_AT=<point>:<step>:<signal>`` (empty: no kill), ``<signal>`` INT or KILL. ``point``:

- ``grad``: after the ``<step>``-th optimiser step;
- ``losses``: when the loss log is written after the state of step ``<step>`` (right after
  ``state/latest.json``): a torn temp file of the loss log is left behind;
- ``finalise``: after training returned, before the stage is finalised (run_stage).

Prints ``OPTIMISER_STEPS <n>`` at the end."""

import os
import signal
import sys

from kill_common import train_with_kill_points

kind, arg, sig = (os.environ.get("KILL_AT") or "::").split(":")


def die():
    os.kill(os.getpid(), getattr(signal, "SIG" + sig))


def wrap_write_losses(losses_fn):
    def write_losses(path, rows):  # called right after state/latest.json is written
        if kind == "losses" and rows and rows[-1]["step"] == int(arg):
            path.with_name(path.name + ".tmp").write_text("step,loss,units\n1,0.")  # torn, as a kill leaves it
            die()
        return losses_fn(path, rows)

    return write_losses


train_with_kill_points(sys.argv[1], die, grad_at=int(arg) if kind == "grad" else None, finalise=kind == "finalise",
                       wrap={"write_losses": wrap_write_losses})
