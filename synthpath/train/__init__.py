"""synthpath.train: the trainer and private training (docs/architecture.md §3).

Public entry points:

- :func:`synthpath.train.trainer.run` (stage) and :func:`synthpath.train.trainer.train`
  (the same, callable with a recipe, a tile-store folder and an output folder);
- :mod:`synthpath.train.privacy`: ``plan_patient_privacy``, ``calibrate_sigma``,
  ``epsilon_of(history, delta, accountant)`` (recompute epsilon from a ledger),
  ``resolve_delta``, ``check_supported``, the ledger writers;
- :mod:`synthpath.train.engine`: ``gradient_step`` with ``PlainGradients`` /
  ``PrivateGradients`` -- the single training step, with or without the privacy wrapper.

Submodules are imported on use, so ``import synthpath.train`` stays cheap.
"""
