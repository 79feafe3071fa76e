"""3D train samples of the reader (issue #14): augment3d.make_sample_3d with the database's voxel size,
class ids kept, a fixed seed gives the same stream, and the voxel size is required."""
import hashlib

import numpy as np
import pytest
from lmdb_helpers import unit_sources, write_database

import augment3d
import reader_worker
from imagereader import ImageReader

CLASS_IDS = (0, 3, 9)  # not consecutive: interpolated labels would show up as other values


def labelled_volume(shape_zyx, seed):
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape_zyx, np.uint8)
    mask[:, : shape_zyx[1] // 2] = CLASS_IDS[1]
    mask[:, :, : shape_zyx[2] // 3] = CLASS_IDS[2]
    image = (mask.astype(np.float32)[..., None] * 10 + rng.normal(0, 1, shape_zyx + (1,))).astype(np.float32)
    return image, mask


@pytest.fixture(scope="module")
def volume_db(tmp_path_factory):
    root = tmp_path_factory.mktemp("vol3d")
    samples = [labelled_volume((12, 40, 44), 0), labelled_volume((6, 24, 24), 1)]
    with_size = write_database(str(root / "vol.lmdb"), samples, sources=unit_sources(1), source_index=[0, 0],
                               voxel_size=(0.04, 0.01, 0.01))
    without = write_database(str(root / "nosize.lmdb"), samples, sources=unit_sources(1), source_index=[0, 0])
    return {"vol": with_size, "nosize": without}


def stream_digest(path, seed, workers, batches=4, **kwargs):
    digest = hashlib.sha256()
    with ImageReader(path, batch_size=2, crop_size=(4, 16, 16), size_factor=4, workers=workers, seed=seed,
                     **kwargs) as reader:
        for _, (images, masks) in zip(range(batches), reader):
            assert images.shape == (2, 4, 16, 16, 1) and masks.shape == (2, 4, 16, 16)
            assert set(np.unique(masks).tolist()) <= set(CLASS_IDS)
            digest.update(images.tobytes())
            digest.update(masks.tobytes())
    return digest.hexdigest()


def test_a_fixed_seed_gives_the_same_3d_stream(volume_db):
    first = stream_digest(volume_db["vol"], seed=5, workers=2)
    assert stream_digest(volume_db["vol"], seed=5, workers=2) == first
    assert stream_digest(volume_db["vol"], seed=6, workers=2) != first


def test_3d_samples_come_from_make_sample_3d_with_the_databases_voxel_size(volume_db, monkeypatch):
    calls = []
    real = augment3d.make_sample_3d

    def spy(image, mask, rng, out_zyx, spacing, params, *args):
        calls.append((tuple(out_zyx), tuple(spacing), image.shape))
        return real(image, mask, rng, out_zyx, spacing, params, *args)

    monkeypatch.setattr(augment3d, "make_sample_3d", spy)
    reader = ImageReader(volume_db["vol"], batch_size=3, crop_size=(4, 16, 16), size_factor=4, seed=1)
    assert reader._plan.spacings_zyx_um == ((0.04, 0.01, 0.01),) and reader._plan.params_3d is not None
    ring = np.zeros(reader._plan.slots * reader._plan.slot_bytes, np.uint8)
    producer = reader_worker._Producer(reader._plan, 0, ring)
    try:
        count, shape = producer.fill(0, 0)
        images, masks = reader_worker._slot_views(ring, 0, reader._plan, count, shape)
    finally:
        producer.close()
    assert count == 3 and shape == (4, 16, 16)
    assert [c[:2] for c in calls] == [((4, 16, 16), (0.04, 0.01, 0.01))] * 3
    assert {c[2] for c in calls} <= {(12, 40, 44, 1), (6, 24, 24, 1)}  # whole records: context, not padding
    assert set(np.unique(masks).tolist()) <= set(CLASS_IDS) and np.isfinite(images).all()


def test_class_balanced_3d_sampling_keeps_class_ids(volume_db):
    stream_digest(volume_db["vol"], seed=2, workers=1, batches=3, sampling="balanced")


def test_3d_augmentation_needs_the_voxel_size(volume_db):
    with pytest.raises(ValueError, match="without a voxel size.*--voxel_size"):
        ImageReader(volume_db["nosize"], batch_size=1, crop_size=(4, 16, 16), size_factor=4)
    reader = ImageReader(volume_db["nosize"], batch_size=1, crop_size=(4, 16, 16), size_factor=4, augment=False)
    assert reader._plan.params_3d is None
