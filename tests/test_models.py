"""models/: every model builds, keeps the input size, round-trips its config; receptive fields are exact."""
import numpy as np
import pytest

import models

TINY = {  # small but structurally complete configs (FC-DenseNet: all 11 blocks, 5 poolings)
    "unet": {"depth": 2, "base_filters": 4},
    "fcdensenet56": {"layers_per_block": [1] * 11, "growth_rate": 2, "first_filters": 4},
    "fcdensenet67": {"layers_per_block": [1] * 11, "growth_rate": 2, "first_filters": 4},
    "fcdensenet103": {"layers_per_block": [1, 2, 1, 1, 1, 2, 1, 1, 1, 2, 1], "growth_rate": 2, "first_filters": 4},
}


@pytest.mark.parametrize("name", models.MODEL_NAMES)
@pytest.mark.parametrize("channels,classes", [(1, 2), (3, 4)])
def test_output_shape_matches_input_for_several_sizes(name, channels, classes):
    model = models.build_model(name, channels, classes, **TINY[name])
    factor = models.size_factor(name, **TINY[name])
    rng = np.random.default_rng(0)
    for h, w in [(factor, factor), (2 * factor, 3 * factor), (3 * factor, factor)]:
        out = model(rng.normal(size=(2, h, w, channels)).astype(np.float32), training=False)
        assert tuple(out.shape) == (2, h, w, classes)
        assert out.dtype.name == "float32"


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_full_size_models_build_with_paper_parameter_counts(name):
    """Default configs; FC-DenseNet counts as in Jegou et al. Table 2 (56: 1.5M rounded, 67: 3.5M, 103: 9.4M)."""
    model = models.build_model(name, 3, 11)
    expected = {"unet": None, "fcdensenet56": 1.4e6, "fcdensenet67": 3.5e6, "fcdensenet103": 9.4e6}[name]
    if expected:
        assert abs(model.count_params() - expected) / expected < 0.03
    assert model.input_shape == (None, None, None, 3) and model.output_shape == (None, None, None, 11)


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_config_round_trips(name):
    import keras

    cfg = models.model_config(name, **TINY[name])
    assert models.model_config(name, **cfg) == cfg  # registry config is a fixed point
    a = models.build_model(name, 2, 3, **cfg)
    b = models.build_model(name, 2, 3, **cfg)
    c = keras.Model.from_config(a.get_config())
    assert a.get_config() == b.get_config() == c.get_config()
    for other in (b, c):
        other.set_weights(a.get_weights())
        x = np.random.default_rng(1).normal(size=(1, 32, 64, 2)).astype(np.float32)
        np.testing.assert_allclose(other(x, training=False), a(x, training=False), rtol=1e-5, atol=1e-5)


def test_unknown_model_and_setting_are_refused():
    with pytest.raises(ValueError, match="unknown model"):
        models.model_config("resnet")
    with pytest.raises(ValueError, match="no setting"):
        models.model_config("unet", growth_rate=3)
    with pytest.raises(ValueError, match="depth"):
        models.model_config("unet", depth=0)


def test_fcdensenet_paper_structure():
    """Dense-layer counts, growth, 48 first filters, BN momentum 0.9, L2 1e-4, dropout 0.2."""
    model = models.build_model("fcdensenet103", 1, 2)
    layers = {layer.name: layer for layer in model.layers}
    assert layers["first_conv"].filters == 48 and layers["first_conv"].kernel_size == (3, 3)
    counts = [4, 5, 7, 10, 12, 15, 12, 10, 7, 5, 4]
    blocks = [f"down{i}" for i in range(5)] + ["bottleneck"] + [f"up{i}" for i in range(5)]
    for block, n in zip(blocks, counts):
        convs = [l for name, l in layers.items() if name.startswith(block + "_layer") and name.endswith("_conv")]
        assert len(convs) == n and all(c.filters == 16 and c.kernel_size == (3, 3) for c in convs)
    bns = [l for l in model.layers if "BatchNormalization" in type(l).__name__]
    assert bns and all(abs(l.momentum - 0.9) < 1e-9 for l in bns)
    drops = [l for l in model.layers if type(l).__name__ == "Dropout"]
    assert len(drops) == sum(counts) + 5 and all(abs(l.rate - 0.2) < 1e-9 for l in drops)
    assert all(abs(float(l.kernel_regularizer.l2) - 1e-4) < 1e-12 for l in model.layers if hasattr(l,
        "kernel_regularizer") and l.kernel_regularizer)
    # transition up upsamples only the previous block's new maps: bottleneck 15 x 16 = 240 filters
    assert layers["tu0_upconv"].filters == 240 and layers["tu0_upconv"].input.shape[-1] == 240
    assert layers["tu0_upconv"].strides == (2, 2) and layers["tu0_upconv"].kernel_size == (3, 3)


@pytest.mark.slow
@pytest.mark.parametrize("name,radius", [
    # Hand-derived worst case (see models/receptive_field.py). FC-DenseNet: first conv 1 + dense 3x3 convs
    # sum(n_i * 2^i) down and up + bottleneck n*32 + transposed 3x3 stride-2 convs 2 * (1+2+4+8+16).
    ("fcdensenet56", 1 + 4 * 31 + 4 * 32 + 4 * 31 + 62),
    ("fcdensenet67", 1 + 5 * 31 + 5 * 32 + 5 * 31 + 62),
    ("fcdensenet103", 1 + 314 + 15 * 32 + 314 + 62),
    # UNet depth 4: 2 convs per level, bottleneck 2 x 16, 2x2 transposed convs reach 1 level-jump back.
    ("unet", 2 * 15 + 2 * 16 + 15 + 2 * 15),
])
def test_theoretical_receptive_field_radius(name, radius):
    assert models.receptive_field_radius(name) == radius


@pytest.mark.slow
@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_radius_equals_the_reach_of_an_impulse(name):
    """Positive weights, zero input, one positive pixel: exactly the dependent outputs become non-zero.

    Every ReLU then passes, every max-pool window holding the impulse passes it on, so the set of
    non-zero outputs is the structural dependency set; its farthest pixel must be the radius.
    """
    cfg = dict(TINY[name], **({"batch_norm": False} if name == "unet" else {}))
    radius = models.receptive_field_radius(name, **cfg)
    factor = models.size_factor(name, **cfg)
    model = models.build_model(name, 1, 2, **cfg)
    model.set_weights([np.abs(w) if w.ndim == 4 else (np.ones_like(w) if "variance" in v.path or "gamma" in v.path
                       else np.zeros_like(w)) for w, v in zip(model.get_weights(), model.weights)])
    size = 2 * factor * -(-(radius + 1) // factor)
    q = size // 2 + np.arange(factor)  # impulses at every residue modulo the poolings
    x = np.zeros((factor, size, size, 1), np.float32)
    x[np.arange(factor), q, q, 0] = 1.0
    out = np.asarray(model(x, training=False)).max(axis=-1)
    reach = 0
    for i in range(factor):
        ys, xs = np.nonzero(out[i] > 0)
        reach = max(reach, np.abs(ys - q[i]).max(), np.abs(xs - q[i]).max())
    assert reach == radius


def test_mixed_precision_keeps_float32_logits():
    import keras

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = models.build_model("unet", 1, 2, depth=1, base_filters=2)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model(np.zeros((1, 8, 8, 1), np.float32)).dtype.name == "float32"


@pytest.mark.parametrize("shape", [(4, 8, 8, 5), (2, 3, 8, 8, 5)], ids=["nhwc", "ndhwc"])
def test_fused_batch_norm_matches_keras_batch_norm(shape):
    import keras

    from models.layers import FusedBatchNormalization

    x = np.random.default_rng(2).normal(3, 2, size=shape).astype(np.float32)
    ref, fused = keras.layers.BatchNormalization(momentum=0.9), FusedBatchNormalization(momentum=0.9)
    np.testing.assert_allclose(fused(x, training=True), ref(x, training=True), atol=1e-4)
    np.testing.assert_allclose(fused.moving_mean.numpy(), ref.moving_mean.numpy(), rtol=1e-5)
    n = x.size / x.shape[-1]  # the fused kernel keeps the unbiased variance
    np.testing.assert_allclose(fused.moving_variance.numpy() - 0.9, (ref.moving_variance.numpy() - 0.9) * n / (n - 1), rtol=1e-4)
    np.testing.assert_allclose(fused(x, training=False), ref(x, training=False), atol=2e-2)


def test_effective_receptive_field_probe():
    from models.receptive_field import effective_receptive_field

    cfg = {"depth": 2, "base_filters": 4}
    model = models.build_model("unet", 1, 2, **cfg)
    theory = models.receptive_field_radius("unet", **cfg)
    erf = effective_receptive_field(model, size_factor=4, theoretical_radius=theory)
    assert 0 <= erf["radius"] <= theory and erf["radius_rounded"] % 4 == 0 and erf["radius_rounded"] >= erf["radius"]
    assert erf["probe_size"] >= 2 * theory + 1 and not erf["truncated"] and not erf["degenerate"]
    small = effective_receptive_field(model, size_factor=4, theoretical_radius=theory, max_probe=16)
    assert small["probe_size"] == 16 and small["truncated"] and small["radius"] <= 8
