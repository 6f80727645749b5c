"""Cut the case regions of a QuPath-style GeoJSON into smaller cases on a square grid.

Each region (Polygon or MultiPolygon, holes kept) is clipped to every ``--cell`` x ``--cell``
level-0 square it touches; each piece gets the case id ``<case_id>-r<row>c<col>`` (row and
column of the square on the slide's grid from (0, 0)). With ``--cell`` equal to the level-0
size of a coarsest-level tile, every coarse tile and its children fall in exactly one case,
so each synthetic "patient" is one multi-magnification stack of the slide. This is how
recipes/demo_private_regions.geojson and demo_public_regions.geojson were made from
demo_regions.geojson (issue 14: more, smaller cases make a patient-level DP guarantee over
the demo's private regions less degenerate and give the holdout enough patients):

    python examples/cut_cases.py recipes/demo_regions.geojson --cases case04,...,case09 \
        --cell 256 --out recipes/demo_private_regions.geojson
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def clip_ring(ring: list, x0: float, y0: float, x1: float, y1: float) -> list:
    """Sutherland-Hodgman: the part of the closed ring inside the box (closed; [] if none)."""
    pts = [tuple(p[:2]) for p in ring]
    if pts and pts[0] == pts[-1]:
        pts = pts[:-1]
    edges = [(0, x0, True), (0, x1, False), (1, y0, True), (1, y1, False)]
    for axis, v, lower in edges:
        if not pts:
            break
        inside = (lambda p: p[axis] >= v) if lower else (lambda p: p[axis] <= v)
        out = []
        for i, cur in enumerate(pts):
            prev = pts[i - 1]
            if inside(cur):
                if not inside(prev):
                    out.append(_cross(prev, cur, axis, v))
                out.append(cur)
            elif inside(prev):
                out.append(_cross(prev, cur, axis, v))
        pts = out
    if len(pts) < 3 or abs(_area(pts)) < 1e-6:
        return []
    return [list(p) for p in pts] + [list(pts[0])]


def _cross(a, b, axis, v):
    t = (v - a[axis]) / (b[axis] - a[axis])
    p = [a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1])]
    p[axis] = v
    return (round(p[0], 2), round(p[1], 2))


def _area(pts) -> float:
    return 0.5 * sum(pts[i - 1][0] * p[1] - p[0] * pts[i - 1][1] for i, p in enumerate(pts))


def _polygons(geom: dict) -> list:
    if geom["type"] == "Polygon":
        return [geom["coordinates"]]
    if geom["type"] == "MultiPolygon":
        return list(geom["coordinates"])
    raise ValueError(f"unsupported geometry type {geom['type']!r}")


def cut(doc: dict, cell: float, cases: set[str] | None) -> dict:
    pieces: dict[tuple, list] = {}
    for ft in doc["features"]:
        props = ft["properties"]
        case = props.get("case_id")
        if cases is not None and case not in cases:
            continue
        for poly in _polygons(ft["geometry"]):
            xs = [p[0] for p in poly[0]]
            ys = [p[1] for p in poly[0]]
            for r in range(int(min(ys) // cell), int(max(ys) // cell) + 1):
                for c in range(int(min(xs) // cell), int(max(xs) // cell) + 1):
                    box = (c * cell, r * cell, (c + 1) * cell, (r + 1) * cell)
                    outer = clip_ring(poly[0], *box)
                    if not outer:
                        continue
                    holes = [h for h in (clip_ring(ring, *box) for ring in poly[1:]) if h]
                    key = (f"{case}-r{r}c{c}", props["classification"]["name"])
                    pieces.setdefault(key, [props, []])[1].append([outer] + holes)
    feats = []
    for (case, cls), (props, polys) in sorted(pieces.items()):
        feats.append({"type": "Feature", "id": f"{case}-{cls}",
                      "geometry": {"type": "MultiPolygon", "coordinates": polys},
                      "properties": {**props, "name": f"{case} {cls}", "case_id": case}})
    return {"type": "FeatureCollection", "features": feats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("geojson")
    ap.add_argument("--cell", type=float, required=True, help="grid square side, level-0 pixels")
    ap.add_argument("--cases", default=None, help="comma-separated case ids to keep (default: all)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    doc = json.loads(Path(args.geojson).read_text())
    cases = set(args.cases.split(",")) if args.cases else None
    out = cut(doc, args.cell, cases)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"{len(out['features'])} regions in {len({f['properties']['case_id'] for f in out['features']})} cases "
          f"-> {args.out}")


if __name__ == "__main__":
    main()
