"""Generate the project's small synthetic example data set (deterministic).

Microscopy-like images with two object classes on a textured, unevenly lit
background, and their class masks (0 = background):

* class 1: round "cells" -- medium brightness, a darker nucleus, a faint halo;
* class 2: elongated, bright "rods".

Output (under ``--output_folder``, default: this script's folder)::

    images/cells_NN.tif        uint16, single channel (HW), zlib-compressed TIFF
    masks/cells_NN.png|.tif    uint8 0/1/2 (a mix of .png and .tif masks, paired by stem)
    rgb/images/stain_NN.tif    uint8, 3 channels (HWC), zlib-compressed TIFF
    rgb/masks/stain_NN.png     uint8 0/1/2

Everything derives from one ``numpy.random.default_rng(seed)``, so running
the script again reproduces the same pixels (``tests/test_example_data.py``
checks this). Usage::

    python data/make_example_data.py [--output_folder data] [--seed 0]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

# (height, width) of the uint16 images; one is larger than 512 px on both axes.
GRAY_SIZES = [(192, 256), (256, 256), (256, 256), (300, 420), (256, 320), (320, 256), (192, 256), (640, 576)]
RGB_SIZES = [(256, 256), (192, 320)]
# Every other gray mask is a .png, the rest .tif: exercises pairing by stem.
PNG_MASK_EVERY = 2


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std low-frequency noise (HW float32): background texture."""
    from skimage.filters import gaussian

    field = gaussian(rng.standard_normal(shape), sigma=sigma, preserve_range=True)
    return ((field - field.mean()) / (field.std() + 1e-9)).astype(np.float32)


def _illumination(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Multiplicative uneven illumination (HW float32), about 0.7..1.2 across the field."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    radius = 0.9 * max(h, w)
    return (1.2 - 0.5 * ((yy - cy) ** 2 + (xx - cx) ** 2) / radius**2).clip(0.6, 1.2).astype(np.float32)


def _place(rng, mask_hw, signal_hw, cls, radii, intensity, nucleus) -> bool:
    """Try to draw one ellipse of class ``cls`` that does not touch existing objects."""
    from skimage.draw import ellipse

    h, w = mask_hw.shape
    r_major, r_minor = radii
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    angle = rng.uniform(-np.pi, np.pi)
    rr, cc = ellipse(cy, cx, r_major + 2, r_minor + 2, shape=mask_hw.shape, rotation=angle)
    if rr.size == 0 or mask_hw[rr, cc].any():
        return False  # overlaps a neighbour (with a 2 px gap)
    rr, cc = ellipse(cy, cx, r_major, r_minor, shape=mask_hw.shape, rotation=angle)
    mask_hw[rr, cc] = cls
    signal_hw[rr, cc] = intensity * rng.uniform(0.85, 1.15)
    if nucleus:
        rr, cc = ellipse(cy, cx, r_major * 0.4, r_minor * 0.4, shape=mask_hw.shape, rotation=angle)
        signal_hw[rr, cc] *= 0.55
    return True


def make_scene(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (signal_hw float32 in [0, ~1], mask_hw uint8 with classes 0/1/2)."""
    from skimage.filters import gaussian

    h, w = shape
    mask = np.zeros(shape, np.uint8)
    signal = np.zeros(shape, np.float32)
    area = h * w
    # Rods first (they are harder to fit), then cells; a bounded number of tries each.
    for target, cls in ((area // 4000, 2), (area // 2600, 1)):
        placed = tries = 0
        while placed < target and tries < 20 * target:
            tries += 1
            if cls == 2:  # elongated, bright
                placed += _place(rng, mask, signal, 2, (rng.uniform(14, 26), rng.uniform(3, 5)), 1.0, nucleus=False)
            else:  # round, medium, darker nucleus
                r = rng.uniform(7, 14)
                placed += _place(rng, mask, signal, 1, (r * rng.uniform(1.0, 1.25), r), 0.45, nucleus=True)
    halo = gaussian((mask > 0).astype(np.float32), sigma=4) * 0.12
    signal = gaussian(signal, sigma=1.2, preserve_range=True).astype(np.float32) + halo
    return signal, mask


def render_gray(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A uint16 phase-contrast-like image (HW) and its mask (HW uint8)."""
    signal, mask = make_scene(rng, shape)
    texture = 0.05 * _smooth_noise(rng, shape, sigma=6)
    image = (0.25 + signal + texture) * _illumination(rng, shape)
    counts = 1200 + 5000 * image + rng.normal(0, 25, shape)
    return np.clip(np.round(counts), 0, 65535).astype(np.uint16), mask


def render_rgb(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A uint8 stained-tissue-like RGB image (HWC) and its mask (HW uint8)."""
    from skimage.filters import gaussian

    signal, mask = make_scene(rng, shape)
    colours = np.array([[235, 215, 225], [120, 70, 160], [150, 90, 40]], np.float32)  # bg, cells, rods
    onehot = np.stack([(mask == c).astype(np.float32) for c in range(3)], axis=-1)
    onehot = gaussian(onehot, sigma=1.0, channel_axis=-1)
    rgb = onehot @ colours
    rgb *= (0.9 + 0.1 * _smooth_noise(rng, shape, sigma=8))[..., None] * _illumination(rng, shape)[..., None]
    rgb -= 40 * (signal[..., None] * (mask[..., None] == 1))  # nucleus texture in cells
    rgb += rng.normal(0, 3, rgb.shape)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8), mask


def _write_tif(path: str, array: np.ndarray) -> None:
    import tifffile

    tifffile.imwrite(path, array, compression="zlib", predictor=True, photometric="rgb" if array.ndim == 3 else "minisblack")


def _write_png(path: str, array: np.ndarray) -> None:
    import imageio.v3 as iio

    iio.imwrite(path, array)


def generate(output_folder: str = HERE, seed: int = 0) -> list[str]:
    """Write the whole data set under ``output_folder``; return the written paths."""
    rng = np.random.default_rng(seed)
    written = []
    folders = {k: os.path.join(output_folder, *k.split("/")) for k in ("images", "masks", "rgb/images", "rgb/masks")}
    for folder in folders.values():
        os.makedirs(folder, exist_ok=True)
    for i, shape in enumerate(GRAY_SIZES):
        image, mask = render_gray(rng, shape)
        written.append(os.path.join(folders["images"], f"cells_{i:02d}.tif"))
        _write_tif(written[-1], image)
        mask_ext = ".png" if i % PNG_MASK_EVERY == 0 else ".tif"
        written.append(os.path.join(folders["masks"], f"cells_{i:02d}{mask_ext}"))
        (_write_png if mask_ext == ".png" else _write_tif)(written[-1], mask)
    for i, shape in enumerate(RGB_SIZES):
        image, mask = render_rgb(rng, shape)
        written.append(os.path.join(folders["rgb/images"], f"stain_{i:02d}.tif"))
        _write_tif(written[-1], image)
        written.append(os.path.join(folders["rgb/masks"], f"stain_{i:02d}.png"))
        _write_png(written[-1], mask)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output_folder", default=HERE, help="where images/, masks/ and rgb/ are written")
    parser.add_argument("--seed", type=int, default=0, help="random seed (the committed data uses 0)")
    args = parser.parse_args(argv)
    paths = generate(args.output_folder, args.seed)
    total = sum(os.path.getsize(p) for p in paths)
    print(f"wrote {len(paths)} files ({total / 1e6:.2f} MB) under {args.output_folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
