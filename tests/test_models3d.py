"""models/unet3d.py through the registry: pooling follows the voxel size, shapes, config round trip, and the
per-axis size factor and receptive field checked against numeric probes on tiny models."""
import json

import numpy as np
import pytest

import models

ANISOTROPIC = [0.04, 0.004, 0.004]  # 4 x 4 x 40 nm (z coarse), in micrometres
ISOTROPIC = [1.0, 1.0, 1.0]
TINY = {"depth": 2, "base_filters": 4}


def tiny(voxel_size, **extra):
    return models.model_config("unet3d", **TINY, voxel_size=voxel_size, **extra)


@pytest.mark.parametrize("voxel_size,depth,pools,kernels", [
    (ANISOTROPIC, 4, [[1, 2, 2], [1, 2, 2], [1, 2, 2], [2, 2, 2]],
     [[1, 3, 3], [1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3]]),
    (ISOTROPIC, 2, [[2, 2, 2], [2, 2, 2]], [[3, 3, 3]] * 3),
    ([2.0, 1.0, 1.0], 2, [[2, 2, 2], [2, 2, 2]], [[3, 3, 3]] * 3),  # within 2x: treated as isotropic
    ([3.0, 1.0, 1.0], 3, [[1, 2, 2], [2, 2, 2], [2, 2, 2]], [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]),
    ([1.0, 1.0, 5.0], 2, [[2, 2, 1], [2, 2, 1]], [[3, 3, 1], [3, 3, 1], [3, 3, 3]]),  # any axis; x joins at 4 vs 5
])
def test_plan_pools_an_axis_only_within_twice_the_finest_spacing(voxel_size, depth, pools, kernels):
    cfg = models.model_config("unet3d", depth=depth, voxel_size=voxel_size)
    assert cfg["pool_sizes"] == pools and cfg["kernel_sizes"] == kernels
    assert models.size_factors("unet3d", **cfg) == tuple(int(np.prod([p[a] for p in pools])) for a in range(3))
    assert models.spatial_rank("unet3d") == 3 and models.spatial_rank("unet") == 2


@pytest.mark.parametrize("voxel_size", [ANISOTROPIC, ISOTROPIC])
@pytest.mark.parametrize("channels,classes", [(1, 2), (2, 3)])
def test_output_shape_matches_input(voxel_size, channels, classes):
    cfg = tiny(voxel_size)
    fz, fy, fx = models.size_factors("unet3d", **cfg)
    model = models.build_model("unet3d", channels, classes, **cfg)
    assert model.input_shape == (None, None, None, None, channels)
    rng = np.random.default_rng(0)
    for shape in [(fz, fy, fx), (3 * fz, 2 * fy, 3 * fx), (16, 32, 32)]:
        out = model(rng.normal(size=(2, *shape, channels)).astype(np.float32), training=False)
        assert tuple(out.shape) == (2, *shape, classes) and out.dtype.name == "float32"


@pytest.mark.parametrize("voxel_size", [ANISOTROPIC, ISOTROPIC])
def test_config_round_trips_through_json_and_keras(voxel_size):
    import keras

    cfg = tiny(voxel_size)
    assert models.model_config("unet3d", **json.loads(json.dumps(cfg))) == cfg  # a fixed point, JSON-able
    a = models.build_model("unet3d", 1, 2, **cfg)
    b = models.build_model("unet3d", 1, 2, **cfg)
    c = keras.Model.from_config(a.get_config())
    assert a.get_config() == b.get_config() == c.get_config()
    x = np.random.default_rng(1).normal(size=(1, 8, 16, 16, 1)).astype(np.float32)
    for other in (b, c):
        other.set_weights(a.get_weights())
        np.testing.assert_allclose(other(x, training=False), a(x, training=False), rtol=1e-5, atol=1e-5)


def test_stored_plan_wins_over_the_voxel_size_rule():
    """A saved config rebuilds its exact architecture even if the derivation rule changes later."""
    cfg = tiny(ISOTROPIC, pool_sizes=[[1, 2, 2], [2, 2, 2]])
    assert cfg["pool_sizes"] == [[1, 2, 2], [2, 2, 2]] and models.size_factors("unet3d", **cfg) == (2, 4, 4)


@pytest.mark.parametrize("bad,match", [
    ({"voxel_size": [1.0, 1.0]}, "voxel_size"), ({"voxel_size": [1.0, 0.0, 1.0]}, "voxel_size"),
    ({"pool_sizes": [[2, 2, 2]]}, "pool_sizes"), ({"kernel_sizes": [[5, 3, 3]] * 3}, "kernel_sizes"),
    ({"depth": 0}, "depth"), ({"growth_rate": 2}, "no setting"),
])
def test_bad_settings_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        models.model_config("unet3d", **{**TINY, **bad})


def test_two_d_registry_is_unchanged():
    assert models.MODEL_NAMES == ("unet", "fcdensenet56", "fcdensenet67", "fcdensenet103")
    assert models.size_factors("unet", depth=3) == (8, 8) and models.size_factor("unet", depth=3) == 8
    assert models.receptive_field_radii("unet") == (models.receptive_field_radius("unet"),) * 2


@pytest.mark.parametrize("voxel_size,radii", [
    # Per axis: 2 convs per level of reach (k-1)/2 x jump, transposed convs reach (pool-1) x jump back.
    # Anisotropic: z is never mixed (1-wide kernels, no pooling): radius 0. y/x as the 2-D UNet of depth 2.
    (ANISOTROPIC, (0, 2 * 3 + 2 * 4 + 3 + 2 * 3, 2 * 3 + 2 * 4 + 3 + 2 * 3)),
    (ISOTROPIC, (23, 23, 23)),
])
def test_per_axis_radius_equals_the_reach_of_an_impulse(voxel_size, radii):
    """Positive weights, zero input, one positive voxel: exactly the outputs that depend on it become non-zero.

    Impulses sit at every residue modulo the poolings (one per sample); the farthest changed output along
    each axis must be that axis's theoretical radius.
    """
    cfg = tiny(voxel_size, batch_norm=False)
    assert models.receptive_field_radii("unet3d", **cfg) == radii
    factors = models.size_factors("unet3d", **cfg)
    model = models.build_model("unet3d", 1, 2, **cfg)
    model.set_weights([np.abs(w) if w.ndim == 5 else np.zeros_like(w) for w in model.get_weights()])
    shape = [2 * f * -(-(r + f) // f) for r, f in zip(radii, factors)]
    n = max(factors)
    q = np.array(shape)[None, :] // 2 + np.arange(n)[:, None] % np.array(factors)[None, :]
    x = np.zeros((n, *shape, 1), np.float32)
    x[np.arange(n), q[:, 0], q[:, 1], q[:, 2], 0] = 1.0
    out = np.asarray(model(x, training=False)).max(axis=-1)
    reach = [0, 0, 0]
    for i in range(n):
        hit = np.nonzero(out[i] > 0)
        assert hit[0].size, "the impulse reached no output"
        reach = [max(r, int(np.abs(h - q[i, a]).max())) for a, (r, h) in enumerate(zip(reach, hit))]
    assert tuple(reach) == radii


@pytest.mark.slow
@pytest.mark.parametrize("voxel_size", [ANISOTROPIC, ISOTROPIC])
def test_per_axis_size_factor_is_the_smallest_shift_the_model_commutes_with(voxel_size):
    """Shifting the input by s voxels along an axis shifts the output by s (away from the borders) exactly
    when s is a multiple of that axis's size factor: the pooling grid must not move."""
    cfg = tiny(voxel_size)
    factors = models.size_factors("unet3d", **cfg)
    radii = models.receptive_field_radii("unet3d", **cfg)
    model = models.build_model("unet3d", 1, 2, **cfg)
    shape = [max(f, 2 * r + 2 * max(factors) + 8) // f * f + f for r, f in zip(radii, factors)]
    x = np.random.default_rng(3).normal(size=(1, *shape, 1)).astype(np.float32)
    base = np.asarray(model(x, training=False))
    for axis, (factor, radius) in enumerate(zip(factors, radii)):
        commuting = []
        for s in range(1, max(factors) + 1):
            shifted = np.asarray(model(np.roll(x, s, axis=axis + 1), training=False))
            keep = [slice(None)] * 5
            keep[axis + 1] = slice(radius + s, shape[axis] - radius - s)
            if np.allclose(np.roll(base, s, axis=axis + 1)[tuple(keep)], shifted[tuple(keep)], atol=1e-5):
                commuting.append(s)
        assert commuting and min(commuting) == factor, (axis, commuting)
        assert all(s % factor == 0 for s in commuting)


def test_metadata_carries_rank_voxel_size_and_per_axis_values():
    from segkit import model_metadata
    from segkit.model_metadata import MetadataError, ModelMetadata

    cfg = tiny(ANISOTROPIC)
    fields = dict(model="unet3d", model_config=cfg, channels=1, number_classes=2, spatial_rank=3,
                  voxel_size_um=ANISOTROPIC, normalization={"method": "zscore", "epsilon": 1e-6},
                  size_factor=list(models.size_factors("unet3d", **cfg)),
                  receptive_field_radius=list(models.receptive_field_radii("unet3d", **cfg)))
    meta = ModelMetadata.from_dict(model_metadata.make_metadata(**fields))
    assert meta.spatial_rank == 3 and meta.voxel_size_um == tuple(ANISOTROPIC)
    assert meta.per_axis("size_factor") == (1, 4, 4) and meta.per_axis("receptive_field_radius") == (0, 23, 23)
    assert ModelMetadata.from_dict(json.loads(json.dumps(meta.to_dict()))) == meta
    flat = ModelMetadata.from_dict(model_metadata.make_metadata(**{**fields, "spatial_rank": 2, "voxel_size_um": None,
                                                                   "size_factor": 4, "receptive_field_radius": 23}))
    assert flat.per_axis("size_factor") == (4, 4) and "spatial_rank" not in flat.to_dict()
    with pytest.raises(MetadataError, match="one value per spatial axis"):
        model_metadata.make_metadata(**{**fields, "size_factor": [4, 4]})
    with pytest.raises(MetadataError, match="spatial_rank must be 2 or 3"):
        model_metadata.make_metadata(**{**fields, "spatial_rank": 4})


def test_checkpoint_of_stock_batch_norm_restores_into_fused(tmp_path, monkeypatch):
    """unet3d's BatchNorm layers became the fused kernel: a checkpoint written by a run started before that
    (stock Keras BatchNormalization, same layer names and variables) restores every variable, so --resume
    goes on, and the restored model computes the same output."""
    import keras
    import tensorflow as tf

    import models.layers

    cfg = tiny(ISOTROPIC)
    with monkeypatch.context() as patch:
        patch.setattr(models.layers, "FusedBatchNormalization", keras.layers.BatchNormalization)
        old = models.build_model("unet3d", 1, 2, **cfg)
    assert not any(isinstance(layer, models.layers.FusedBatchNormalization) for layer in old.layers)
    x = np.random.default_rng(0).normal(size=(1, 4, 8, 8, 1)).astype(np.float32)
    old(x, training=True)  # moves the moving statistics off their initial values
    prefix = tf.train.Checkpoint(model=old).write(str(tmp_path / "ckpt"))
    new = models.build_model("unet3d", 1, 2, **cfg)
    assert any(isinstance(layer, models.layers.FusedBatchNormalization) for layer in new.layers)
    tf.train.Checkpoint(model=new).read(prefix).assert_consumed()
    np.testing.assert_allclose(new(x, training=False), old(x, training=False), atol=1e-4)
