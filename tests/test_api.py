"""segkit.api.Segmenter: in-memory segmentation identical to inference_unet.py's files."""
import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from conftest import ROOT
from savedmodel_helpers import export_chain, export_pointwise

import inference_unet
from segkit.api import Segmenter
from segkit.cliutil import InputError

# pool / 3x3 conv / upsample layers with a receptive field: tiling must use the halo to be exact
CHAIN = [("conv", 3), ("pool", 2), ("conv", 3), ("pool", 2), ("conv", 3), ("up", 2), ("conv", 3), ("up", 2),
         ("conv", 3)]


@pytest.fixture(scope="module")
def chain_model(tmp_path_factory):
    return export_chain(str(tmp_path_factory.mktemp("model") / "chain"), CHAIN)


def _image(shape, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    image = 2000 + 800 * np.sin(yy / 5.0) * np.cos(xx / 7.0) + rng.normal(0, 100, shape)
    return image.astype(np.uint16)


@pytest.mark.slow
@pytest.mark.parametrize("probability_dtype", ["float32", "uint8"])
def test_segment_equals_the_cli_output_for_the_same_image(chain_model, tmp_path, probability_dtype):
    image = _image((70, 90))
    (tmp_path / "images").mkdir()
    tifffile.imwrite(tmp_path / "images" / "a.tif", image)
    assert inference_unet.main(["--saved_model_filepath", chain_model, "--image_folder", str(tmp_path / "images"),
                                "--output_folder", str(tmp_path / "out"), "--tile_size", "16",
                                "--save_probabilities", "1", "--probability_dtype", probability_dtype]) == 0
    cli_mask = tifffile.imread(tmp_path / "out" / "a.tif")
    cli_probs = np.moveaxis(tifffile.imread(tmp_path / "out" / "probabilities" / "a.tif"), 0, -1)

    segmenter = Segmenter(chain_model, tile_size=16, probability_dtype=probability_dtype)
    mask, probs = segmenter.segment(image, probabilities=True)
    assert mask.dtype == cli_mask.dtype and np.array_equal(mask, cli_mask)
    assert probs.dtype == cli_probs.dtype and np.array_equal(probs, cli_probs)  # bit for bit
    assert np.array_equal(segmenter.segment(image), mask)  # the model stays loaded; same result again
    assert np.array_equal(segmenter.segment(image[..., None]), mask)  # (H, W, 1) == (H, W)


def test_tile_size_does_not_change_the_result(chain_model):
    image = _image((45, 61), seed=2)
    whole = Segmenter(chain_model, tile_size=1024).segment(image, probabilities=True)[1]
    tiled = Segmenter(chain_model, tile_size=16).segment(image, probabilities=True)[1]
    np.testing.assert_allclose(tiled, whole, atol=2e-5)


def test_bad_inputs_raise_clear_errors(chain_model, tmp_path):
    segmenter = Segmenter(chain_model)
    with pytest.raises(ValueError, match="channel"):
        segmenter.segment(np.zeros((32, 32, 3), np.uint16))
    with pytest.raises(ValueError, match="float64"):
        segmenter.segment(np.zeros((32, 32)))
    with pytest.raises(ValueError, match="NaN"):
        segmenter.segment(np.full((32, 32), np.nan, np.float32))
    with pytest.raises(InputError, match="saved_model.pb|not a SavedModel"):
        Segmenter(str(tmp_path))
    with pytest.raises(InputError, match="probability_dtype"):
        Segmenter(chain_model, probability_dtype="float16")


@pytest.mark.slow
def test_importable_with_only_the_project_folder_on_pythonpath(tmp_path):
    model = export_pointwise(str(tmp_path / "pointwise"))
    script = ("import numpy as np\nfrom segkit.api import Segmenter\n"
              f"mask = Segmenter({model!r}).segment(np.arange(40 * 48, dtype=np.uint16).reshape(40, 48))\n"
              "print(mask.shape, mask.dtype)\n")
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "(40, 48) uint8"
    assert "cudart" not in result.stderr and "cuInit" not in result.stderr
