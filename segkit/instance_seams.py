"""Instance labels of images too large to label whole: zones labelled independently, merged across seams.

Each zone of responsibility is labelled from its probabilities plus a halo (:func:`segkit.instances.
labels_from_probabilities` on the larger crop) and keeps its zone plus a one-pixel ring around it; the ids are
offset to be globally unique. :class:`SeamMerger` pairs, at every pixel just across a seam, the id the
neighbouring zone gave it (from its ring) with the id its own zone gave it; union-find over those pairs and one
relabelling pass give the final ids.

Exactness: the watershed's flooding order is a function of the probabilities and the global pixel position only
(:func:`segkit.instances.flooding_keys`), so a crop labels every pixel as the whole image does unless the pixel's
seed, or the flooding path to it, is cut off by the crop's edge, or a seed cut by the edge falls under
``min_size``. With a halo at least the largest object's extent this cannot reach the zone, and tiled labels
equal whole-image labels up to renumbering (tested for 2-D and 3-D touching objects, 3-class and membrane
targets). Objects larger than the halo may come out differently (split or merged at a seam); the membrane
target floods everything, so its basins, not its cells, must fit the halo. numpy and scipy only; no TensorFlow.
"""
from __future__ import annotations

import itertools
from typing import Any, Iterator, Sequence

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from segkit import tiling
from segkit.instances import InstanceThresholds, label_dtype, labels_from_probabilities

Box = tuple[slice, ...]


def zones(shape: Sequence[int], tile: tiling.PerAxis) -> Iterator[Box]:
    """Zones of responsibility: a grid of ``tile`` pixels per axis (the last ones shorter), covering ``shape``."""
    tiles = tiling.per_axis(tile, len(shape), "tile")
    starts = [range(0, length, size) for length, size in zip(shape, tiles)]
    for origin in itertools.product(*starts):
        yield tuple(slice(o, min(o + t, n)) for o, t, n in zip(origin, tiles, shape))


def grow(box: Box, by: tiling.PerAxis, shape: Sequence[int]) -> Box:
    """``box`` grown by ``by`` pixels on every side, clipped to the image (no padding: mirrored context would
    invent objects)."""
    margins = tiling.per_axis(by, len(shape), "halo")
    return tuple(slice(max(s.start - m, 0), min(s.stop + m, n)) for s, m, n in zip(box, margins, shape))


def within(inner: Box, outer: Box) -> Box:
    """``inner`` in the coordinates of ``outer`` (which contains it)."""
    return tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner, outer))


def _flat_indices(box: Box, shape: Sequence[int]) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(s.start, s.stop) for s in box], indexing="ij")
    return np.ravel_multi_index(grids, tuple(shape))


class SeamMerger:
    """Collects zones labelled independently and resolves ids cut by their seams (memory: the zones' surfaces).

    ``add`` each zone with its labels over the zone plus a one-pixel ring (:func:`grow` by 1), then write the
    labels it returns (globally unique ids, int64) into the output; ``finish`` gives a lookup table, and
    :func:`relabel` applies it to the output (block by block for out-of-core stores).
    """

    def __init__(self, shape: Sequence[int]):
        self.shape = tuple(int(n) for n in shape)
        self.next_id = 0
        self._shell: list[tuple[np.ndarray, np.ndarray]] = []   # (flat index, id) of the zone's outer layer
        self._margin: list[tuple[np.ndarray, np.ndarray]] = []  # (flat index, id) of the ring outside the zone
        self._present: list[np.ndarray] = []

    def add(self, zone: Box, ring_labels: np.ndarray) -> np.ndarray:
        """``ring_labels``: this zone's own labels (0 = background) over ``grow(zone, 1, shape)``. Returns the
        zone's labels with ids offset to be unique among all zones added."""
        ring = grow(zone, 1, self.shape)
        local = np.asarray(ring_labels).astype(np.int64)
        if local.shape != tuple(s.stop - s.start for s in ring):
            raise ValueError(f"ring labels of shape {local.shape} do not cover the zone plus one pixel {ring}")
        ids = np.where(local > 0, local + self.next_id, 0)
        self.next_id += int(local.max(initial=0))
        inner = within(zone, ring)
        in_zone = np.zeros(local.shape, bool)
        in_zone[inner] = True
        shell = in_zone.copy()
        shell[tuple(slice(s.start + 1, s.stop - 1) for s in inner)] = False
        flat = _flat_indices(ring, self.shape)
        for store, where in ((self._shell, shell), (self._margin, ~in_zone)):
            where = where & (ids > 0)
            store.append((flat[where], ids[where]))
        self._present.append(np.unique(ids[inner]))
        return ids[inner]

    def record(self) -> dict[str, Any]:
        """The seam data of a merger that holds one zone (count, present, shell_idx, shell_ids, margin_idx,
        margin_ids; e.g. for ``np.savez``): zones labelled by separate processes or runs are merged by
        :meth:`add_record`."""
        if len(self._present) != 1:
            raise ValueError(f"a seam record holds one zone; this merger has {len(self._present)}")
        (shell_idx, shell_ids), (margin_idx, margin_ids) = self._shell[0], self._margin[0]
        return {"count": self.next_id, "present": self._present[0], "shell_idx": shell_idx, "shell_ids": shell_ids,
                "margin_idx": margin_idx, "margin_ids": margin_ids}

    def add_record(self, record: Any) -> int:
        """Add a zone from the :meth:`record` of a one-zone merger (a mapping or an ``np.load`` file); its ids
        are offset to follow those added so far. Returns the offset."""
        offset = self.next_id
        self._shell.append((record["shell_idx"], record["shell_ids"] + offset))
        self._margin.append((record["margin_idx"], record["margin_ids"] + offset))
        present = record["present"]
        self._present.append(np.where(present > 0, present + offset, 0))
        self.next_id += int(record["count"])
        return offset

    def pairs(self) -> np.ndarray:
        """(k, 2) ids that two zones gave the same pixel just across their seam."""
        if not self._shell:
            return np.zeros((0, 2), np.int64)
        shell_idx = np.concatenate([i for i, _ in self._shell])
        shell_ids = np.concatenate([v for _, v in self._shell])
        order = np.argsort(shell_idx)
        shell_idx, shell_ids = shell_idx[order], shell_ids[order]
        margin_idx = np.concatenate([i for i, _ in self._margin])
        margin_ids = np.concatenate([v for _, v in self._margin])
        pos = np.clip(np.searchsorted(shell_idx, margin_idx), 0, max(len(shell_idx) - 1, 0))
        found = (shell_idx[pos] == margin_idx) if len(shell_idx) else np.zeros(len(margin_idx), bool)
        return np.unique(np.stack([margin_ids[found], shell_ids[pos[found]]], axis=1), axis=0)

    def finish(self) -> np.ndarray:
        """Lookup table: ``table[id]`` is the final id (1..N in order of the zones, 0 for background)."""
        size = self.next_id + 1
        pairs = self.pairs()
        graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(size, size))
        _, component = connected_components(graph, directed=False)
        present = np.zeros(size, bool)
        for ids in self._present:
            present[ids] = True
        present[0] = False
        # number the merged objects 1..N (components are numbered by their smallest id), only those with pixels
        marked = np.zeros(component.max() + 1, bool)
        marked[component[present]] = True
        number = np.cumsum(marked) * marked
        table = np.where(present, number[component], 0)
        return table.astype(label_dtype(int(number.max(initial=0))))


def relabel(ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Apply :meth:`SeamMerger.finish`'s table to labels written from :meth:`SeamMerger.add`."""
    return table[np.asarray(ids)]


def labels_tiled(probs: Any, tile: tiling.PerAxis, halo: tiling.PerAxis,
                 thresholds: InstanceThresholds = InstanceThresholds(), target: str = "3class") -> np.ndarray:
    """Instance labels of an in-memory or array-like (memmap, zarr) probability map, zone by zone with ``halo``
    pixels of context, merged across seams. Equals the whole-image labels up to renumbering when every object
    that reaches a zone lies within its halo (module docstring)."""
    ids = np.zeros(tuple(probs.shape[:-1]), np.int64)
    return relabel(ids, label_zones(probs, ids, tile, halo, thresholds, target))


def label_zones(probs: Any, ids_out: Any, tile: tiling.PerAxis, halo: tiling.PerAxis,
                thresholds: InstanceThresholds = InstanceThresholds(), target: str = "3class") -> np.ndarray:
    """:func:`labels_tiled` for outputs larger than memory: writes each zone's unique ids into ``ids_out`` (an
    int64 array-like of the spatial shape: memmap, zarr) and returns the :meth:`SeamMerger.finish` table to
    :func:`relabel` it with, block by block."""
    shape = tuple(probs.shape[:-1])
    if min(tiling.per_axis(halo, len(shape), "halo")) < 1:
        raise ValueError(f"the halo must be at least 1 pixel on every axis (the seams need it), got {halo!r}")
    merger = SeamMerger(shape)
    for zone in zones(shape, tile):
        region = grow(zone, halo, shape)
        labels = labels_from_probabilities(np.asarray(probs[region]), thresholds, target,
                                           origin=[s.start for s in region])
        ring = grow(zone, 1, shape)
        ids_out[zone] = merger.add(zone, labels[within(ring, region)])
    return merger.finish()
