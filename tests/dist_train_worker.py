"""One rank of a data-parallel training run for tests/test_distributed_train.py.

Started by the test with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT); argv: recipe JSON file, tile store, train folder, stop_after (or -1)."""

import json
import sys

from synthpath.recipe import parse_recipe
from synthpath.train.trainer import TrainingInterrupted, train

recipe = parse_recipe(json.loads(open(sys.argv[1]).read()), check_files=False)
stop = int(sys.argv[4])
try:
    out = train(recipe, sys.argv[2], sys.argv[3], stop_after=None if stop < 0 else stop, progress=False)
except TrainingInterrupted:
    sys.exit(17)
print(json.dumps({"steps": out["steps"]}))
