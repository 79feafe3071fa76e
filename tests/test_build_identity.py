"""A 2-D database builds byte-identically to the toolkit before the N-D core (issue #19): the records
of a fixed tiny input hash to the values the starting commit's build_lmdb.py (0d11729) gave."""
import hashlib
import os

import numpy as np
import pytest
import tifffile

import build_lmdb
from segkit import lmdb_format

# Records of fixed_input() hashed with build_lmdb.py at commit 0d11729 (before this branch).
EXPECTED = {
    "whole": "1c80d114c2e6cbddce2292958bbfc9be7d1d3c8a7b889e8201bcc7727aaedfef",
    "tiled": "081cb17d71d7ad97e33164f050d289e0a3beaeb4a528511ba29a28753452a59e",
}


def fixed_input(root):
    """Three images of different sizes, one smaller than the 32-px tile (mirror padding), two channels."""
    rng = np.random.default_rng(12345)
    for i, (h, w) in enumerate([(40, 70), (20, 33), (64, 64)]):
        os.makedirs(os.path.join(root, "images"), exist_ok=True)
        os.makedirs(os.path.join(root, "masks"), exist_ok=True)
        tifffile.imwrite(os.path.join(root, "images", f"im{i}.tif"), rng.integers(0, 60000, (h, w, 2), dtype=np.uint16))
        tifffile.imwrite(os.path.join(root, "masks", f"im{i}.tif"), rng.integers(0, 3, (h, w), dtype=np.uint8))
    return os.path.join(root, "images"), os.path.join(root, "masks")


def records_digest(folder):
    digest = hashlib.sha256()
    for split in ("train", "test"):
        path = os.path.join(folder, f"{split}-ds.lmdb")
        meta = lmdb_format.read_metadata(path)
        env = lmdb_format.open_readonly(path)
        with env.begin(buffers=False) as txn:
            for i in range(meta["num_records"]):
                digest.update(txn.get(lmdb_format.record_key(i)))
        env.close()
    return digest.hexdigest()


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_2d_records_are_byte_identical_to_the_previous_build(tmp_path, kind):
    images, masks = fixed_input(str(tmp_path))
    extra = {"use_tiling": True, "tile_size": 32, "tile_stride": 24} if kind == "tiled" else {}
    build_lmdb.build_databases(image_folder=images, mask_folder=masks, output_folder=str(tmp_path / "out"),
                               dataset_name="ds", train_fraction=0.6, workers=1, progress=False, **extra)
    assert records_digest(str(tmp_path / "out")) == EXPECTED[kind]
