"""No real pixel leaves (issue 12), tested as an attacker would: build a small release on
the real demo slide through the command line, then search every image in it for every real
tile of the tile store (training and holdout, every level) and each of its 8 dihedral
variants (flips and 90° rotations), at every position, also after undoing a whole-number
nearest-neighbour enlargement (as a card grid would show a tile).

Images searched: the PNG members of the WebDataset shards, the images of the Hugging Face
Parquet files, every level of every TIFF slide, and the card's images. The release
manifest must list exactly the files on disk, each as a synthetic image, statistic or
text; the scanner must have seen every file listed as a synthetic image; and a positive
control shows the scanner finds a planted rotated tile, so "none found" means something.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile
from PIL import Image

from synthpath.export.release import RELEASE_MANIFEST, release_files
from synthpath.tiles.store import TileStore


KEY = 8  # side of the corner patch that indexes a tile


def dihedral(tile: np.ndarray) -> list[np.ndarray]:
    out = []
    for k in range(4):
        r = np.rot90(tile, k)
        out += [np.ascontiguousarray(r), np.ascontiguousarray(r[:, ::-1])]
    return out


class TileIndex:
    """Every real tile in its 8 dihedral variants, indexed by its top-left KEY x KEY patch."""

    def __init__(self, tiles: np.ndarray):
        self.px = tiles.shape[1]
        self.variants: list[np.ndarray] = []
        self.by_key: dict[bytes, list[int]] = {}
        for t in tiles:
            for v in dihedral(t):
                self.by_key.setdefault(v[:KEY, :KEY].tobytes(), []).append(len(self.variants))
                self.variants.append(v)

    def find(self, img: np.ndarray) -> list[tuple[int, int, int]]:
        """(y, x, variant) of every exact occurrence of a real tile variant in ``img``."""
        px = self.px
        h, w = img.shape[:2]
        if h < px or w < px:
            return []
        img = np.ascontiguousarray(img[..., :3])
        win = np.lib.stride_tricks.sliding_window_view(img, (KEY, KEY, 3))[: h - px + 1, : w - px + 1, 0]
        hits = []
        for y in range(win.shape[0]):
            for x in range(win.shape[1]):
                cand = self.by_key.get(win[y, x].tobytes())
                if cand:
                    block = img[y:y + px, x:x + px]
                    hits += [(y, x, i) for i in cand if np.array_equal(block, self.variants[i])]
        return hits

    def find_any_scale(self, img: np.ndarray, max_scale: int = 4) -> list:
        """Occurrences in ``img`` and in its decimations by 2..max_scale at every offset,
        which undo a nearest-neighbour enlargement by that factor."""
        hits = []
        for s in range(1, max_scale + 1):
            for oy in range(s):
                for ox in range(s):
                    hits += self.find(img[oy::s, ox::s])
        return hits


def released_images(out: Path) -> dict[str, list[np.ndarray]]:
    """Every image of the release by released file name (as the manifest names it)."""
    images: dict[str, list[np.ndarray]] = {}
    for name, path in release_files(out / "export", out / "generate"):
        arrs = []
        if path.suffix == ".tar":
            with tarfile.open(path) as tar:
                for m in tar:
                    if m.isfile() and m.name.endswith(".png"):
                        arrs.append(np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")))
        elif path.suffix == ".parquet":
            table = pq.read_table(path)
            for col in table.column_names:
                if col == "image" or col.startswith("image_"):  # stacks (image_<level>) and tiles_<level> configs
                    for cell in table.column(col).to_pylist():
                        arrs.append(np.asarray(Image.open(io.BytesIO(cell["bytes"])).convert("RGB")))
        elif path.suffix in (".tif", ".tiff"):
            with tifffile.TiffFile(path) as tif:
                for series in tif.series:
                    arrs += [np.asarray(level.asarray()) for level in series.levels]
        elif path.suffix == ".png":
            arrs.append(np.asarray(Image.open(path).convert("RGB")))
        if arrs:
            images[name] = arrs
    return images


@pytest.fixture(scope="module")
def release(tiny_release) -> Path:
    """The session's small release on the real demo slide (conftest's ``tiny_release``: 2 TIFF
    slides, shards, Parquet, card), built through ``synthpath build``; only read here."""
    return tiny_release / "run"


@pytest.mark.slow
def test_no_real_tile_in_any_released_image(release):
    store = TileStore(release / "ingest")
    ids = store.index.column("tile_id").to_pylist()
    index = TileIndex(store.read_images(ids))
    images = released_images(release)
    manifest = json.loads((release / "export" / "hf" / RELEASE_MANIFEST).read_text())
    kinds = {e["file"]: e["kind"] for e in manifest["files"]}
    # the manifest lists exactly the released files, each with an allowed kind
    assert set(kinds) == {name for name, _ in release_files(release / "export", release / "generate")}
    assert set(kinds.values()) <= {"synthetic image", "statistic", "text"}
    assert {n for n, k in kinds.items() if k == "synthetic image"} == set(images)
    # every kind of released image is there: shards, Parquet, TIFF levels, card images
    names = list(images)
    for part in ("generate/shards/", "export/hf/data/", "export/hf/tiles_", "generate/slides/", "export/hf/samples_"):
        assert any(n.startswith(part) for n in names), f"no released image under {part}"
    assert len(images["generate/slides/syn00000.tiff"]) == 3
    # the audit's contact sheet (real training tiles) stays in audit/, marked, never in the release
    assert (release / "audit" / "contact_sheet.png").is_file()
    assert "never share" in (release / "audit" / "PATIENT_IMAGES_DO_NOT_SHARE.txt").read_text().lower()
    assert not any("contact_sheet" in n for n in kinds)
    assert "contact_sheet" not in (release / "export" / "hf" / "README.md").read_text()

    n_checked = 0
    for name, arrs in images.items():
        for a in arrs:
            hits = index.find_any_scale(a)
            assert not hits, f"{name}: real tile variant found at {hits[:3]}"
            n_checked += 1
    assert n_checked >= 20

    # positive controls: the scanner finds a planted rotated+flipped tile in a TIFF level and
    # a 2x enlarged one in a card image
    tile = store.read_images([ids[len(ids) // 2]])[0]
    level = images["generate/slides/syn00000.tiff"][0].copy()
    level[37:37 + tile.shape[0], 11:11 + tile.shape[1]] = np.rot90(tile, 1)[:, ::-1]
    assert index.find_any_scale(level)
    card = next(a for n, a in images.items() if n.startswith("export/hf/samples_"))[0].copy()
    big = np.kron(tile, np.ones((2, 2, 1), dtype=np.uint8))
    if card.shape[0] < big.shape[0] + 4 or card.shape[1] < big.shape[1] + 4:
        card = np.pad(card, ((0, big.shape[0] + 4), (0, big.shape[1] + 4), (0, 0)))
    card[4:4 + big.shape[0], 2:2 + big.shape[1]] = big
    assert index.find_any_scale(card)
