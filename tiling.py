"""Tiling geometry: one home for how images are cut into tiles.

* :func:`tile_starts` / :func:`tile_grid`: the build-time grid (the original's
  behaviour: tiles stride across the image and the last tile in each row and
  column slides inward to end at the border, so every pixel is covered).
* Inference's zone-of-responsibility tiling (``predict_tiled``) lives here too.
No TensorFlow here.
"""
from __future__ import annotations


def tile_starts(length: int, tile: int, stride: int | None = None) -> list[int]:
    """Start offsets along one axis so that tiles of ``tile`` cover [0, length).

    ``stride`` defaults to ``tile`` (no overlap). The last tile is slid inward
    to end exactly at ``length``. When ``length <= tile`` there is one tile at
    0 (the caller pads the image up to the tile).
    """
    if tile <= 0:
        raise ValueError(f"tile must be > 0, got {tile}")
    stride = tile if stride is None else stride
    if stride <= 0 or stride > tile:
        raise ValueError(f"tile stride must be in [1, tile={tile}], got {stride}")
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def tile_grid(height: int, width: int, tile: int, stride: int | None = None) -> list[tuple[int, int]]:
    """(y, x) top-left corners of a tile grid covering a height x width image."""
    return [(y, x) for y in tile_starts(height, tile, stride) for x in tile_starts(width, tile, stride)]
