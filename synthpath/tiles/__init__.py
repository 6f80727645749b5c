"""synthpath.tiles: the tile store (``store``: writer, ``TileStore`` reader) and the torch
``TileDataset`` over it (``dataset``); see docs/architecture.md §1."""
