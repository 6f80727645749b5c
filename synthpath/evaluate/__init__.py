"""synthpath.evaluate: downstream utility and fidelity of a released synthetic dataset.

- :mod:`.fidelity`: FID, KID, improved precision/recall on feature arrays; ``features_for``
  (shared feature spaces of :mod:`synthpath.features`); native-resolution crops for pFID.
- :mod:`.utility`: the small CNN classifier, TSTR / TRTR / real+synthetic settings, metrics
  with confidence intervals over seeds.
- :mod:`.data`: real tiles from the tile store, synthetic tiles through
  ``datasets.load_dataset(<export>/hf)``, synthetic slide levels through OpenSlide.
- :mod:`.plots`: the report's figures.
- :mod:`.stage`: the ``evaluate`` pipeline stage (``run(ctx)``).
"""
