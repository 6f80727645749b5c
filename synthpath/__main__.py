"""``python -m synthpath ...``: the same command line as the ``synthpath`` script (also
what ``torchrun --nproc_per_node N -m synthpath generate recipe.yaml`` runs)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
