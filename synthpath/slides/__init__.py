"""synthpath.slides: real slides in, nested labelled tiles out (the ingest stage).

Modules: ``reader`` (OpenSlide, plain-image fallback, region reads at a resolution),
``mpp`` (resolution sources and their order), ``tissue`` (Otsu on HSV saturation),
``labels`` (labels CSV, QuPath GeoJSON, rasterised majority labels), ``tiling`` (nested tile
geometry), ``split`` (patient-level train/holdout), ``ingest`` (the stage: ``run(ctx)``),
``testdata`` (small pyramidal TIFFs for tests and benchmarks).
"""
