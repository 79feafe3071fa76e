"""A trained SavedModel as a bioimage.io model package (spec 0.5: rdf.yaml, weights, test tensors, cover,
documentation), built and validated with ``bioimageio.spec``; README.md, "Use the model in Fiji, ilastik, napari".

Everything comes from the model's metadata (segkit/model_metadata.py); the test output is computed by this
toolkit's own inference (whole-image normalization, exact tiling, the SavedModel predictor).
"""
from __future__ import annotations

import getpass
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from segkit import cliutil, image_io, tiling
from segkit.model_metadata import ModelMetadata

log = logging.getLogger(__name__)

DEFAULT_LICENSE = "CC-BY-4.0"
PACKAGE_NAME = "bioimageio_model"  # <out_dir>/bioimageio_model/ and <out_dir>/bioimageio_model.zip
INPUT_ID, OUTPUT_ID = "images", "probabilities"  # = the serving signature's names (model_metadata.SIGNATURE)
WEIGHTS_FILE = "tf_saved_model.zip"
NIST_TOOLKIT = ("Majurski M., NIST semantic segmentation toolkit (UNet / FC-DenseNet on LMDB), the design this "
                "toolkit follows", "https://github.com/usnistgov/semantic-segmentation-unet")
ARCHITECTURE_CITES = {
    "unet": ("Ronneberger O., Fischer P., Brox T. (2015) U-Net: Convolutional networks for biomedical image "
             "segmentation. MICCAI", "10.1007/978-3-319-24574-4_28"),
    "fcdensenet": ("Jegou S. et al. (2017) The one hundred layers Tiramisu: fully convolutional DenseNets for "
                   "semantic segmentation. CVPR workshops", "10.1109/CVPRW.2017.156"),
}
CLASS_COLOURS = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                          [145, 30, 180], [70, 240, 240], [240, 50, 230]], np.uint8)


@dataclass(frozen=True)
class Geometry:
    """Per spatial axis (z, y, x or y, x): axis ids, size factor, halo (radius rounded up to the factor),
    minimum input size (the smallest multiple of the factor larger than 2 x halo, as the spec requires)."""

    axis_ids: tuple[str, ...]
    size_factor: tuple[int, ...]
    halo: tuple[int, ...]

    @property
    def minimum(self) -> tuple[int, ...]:
        return tuple(2 * h + f for h, f in zip(self.halo, self.size_factor))

    @classmethod
    def of(cls, meta: ModelMetadata) -> Geometry:
        factors = tuple(int(f) for f in meta.per_axis("size_factor"))
        radii = meta.per_axis("receptive_field_radius")
        halo = tuple(-(-math.ceil(float(r)) // f) * f for r, f in zip(radii, factors))
        return cls(("z", "y", "x")[3 - meta.spatial_rank:], factors, halo)


def export_bioimageio(saved_model_dir: str, out_dir: str, *, authors: Sequence[str] | None = None,
                      license: str = DEFAULT_LICENSE, cite: Sequence[tuple[str, str]] | None = None,
                      name: str | None = None, description: str | None = None,
                      test_image: np.ndarray | str | None = None, cover: str | None = None,
                      predict_fn=None) -> tuple[str, str]:
    """Write ``out_dir/bioimageio_model/`` and ``out_dir/bioimageio_model.zip``; returns (folder, zip).

    ``authors``: names (default: this user); ``cite``: (text, DOI or URL) pairs (default: the NIST toolkit and
    the architecture's paper); ``test_image``: an image (spatial axes, channels last) or its file (default: a
    synthetic one of the minimum valid size); ``cover``: a PNG/JPEG (default: an overlay of the test
    prediction). ``predict_fn``: an already loaded SavedModelPredictor. Raises InputError for bad input.
    """
    from segkit.inference.settings import load_model_metadata

    meta = load_model_metadata(saved_model_dir)
    geometry = Geometry.of(meta)
    image = _test_image(test_image, meta, geometry)
    if predict_fn is None:
        from segkit.inference.predictor import SavedModelPredictor

        predict_fn = SavedModelPredictor(saved_model_dir)
    probs = reference_probabilities(image, predict_fn, meta, geometry)
    os.makedirs(out_dir, exist_ok=True)
    folder = os.path.join(out_dir, PACKAGE_NAME)
    staging = cliutil.make_temp(folder, directory=True)
    try:
        files = _write_files(os.path.join(staging, "files"), saved_model_dir, meta, image, probs, cover)
        descr = build_description(meta, geometry, files, authors=authors, license=license, cite=cite, name=name,
                                  description=description)
        return _save_package(descr, folder, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def reference_probabilities(image: np.ndarray, predict_fn, meta: ModelMetadata, geometry: Geometry) -> np.ndarray:
    """Our inference on one image (spatial axes, channels last): whole-image per-channel statistics, exact
    tiling with the receptive-field halo (segkit.api.Segmenter's steps, for 2 or 3 spatial axes)."""
    mean, std = image_io.image_stats(image)
    tile = tuple(-(-s // f) * f for s, f in zip(image.shape[:-1], geometry.size_factor))
    return tiling.predict_tiled(image, predict_fn, tile, geometry.halo, geometry.size_factor,
                                preprocess=lambda t: image_io.normalize(t, mean, std))


# --- test image -------------------------------------------------------------------


def _test_image(test_image: np.ndarray | str | None, meta: ModelMetadata, geometry: Geometry) -> np.ndarray:
    """The test image as float32 (spatial axes, channels last) of a size the description accepts."""
    if test_image is None:
        return synthetic_image(geometry.minimum, meta.channels)
    where = test_image if isinstance(test_image, str) else "test_image"
    image = image_io.read_image(test_image) if isinstance(test_image, str) else np.asarray(test_image)
    if image.ndim == meta.spatial_rank:
        image = image[..., None]
    if image.ndim != meta.spatial_rank + 1 or image.shape[-1] != meta.channels:
        raise cliutil.InputError(f"{where}: shape {image.shape} is not a {meta.spatial_rank}-D image with "
                                 f"{meta.channels} channel(s) last, as the model expects; give another test image")
    if not np.all(np.isfinite(image)):
        raise cliutil.InputError(f"{where}: the test image has NaN or infinite pixels; give another one")
    return _valid_size(image.astype(np.float32), geometry)


def _valid_size(image: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Mirror-pad up to the minimum size, then crop (centred) to ``minimum + n * size_factor`` per axis."""
    pads = [(0, max(0, m - s)) for s, m in zip(image.shape[:-1], geometry.minimum)]
    image = image_io.mirror_pad(image, pads)
    crop = []
    for size, low, step in zip(image.shape[:-1], geometry.minimum, geometry.size_factor):
        keep = low + (size - low) // step * step
        start = (size - keep) // 2
        crop.append(slice(start, start + keep))
    return np.ascontiguousarray(image[tuple(crop)])


def synthetic_image(shape: Sequence[int], channels: int, seed: int = 0) -> np.ndarray:
    """Smooth blobs on a noisy background (float32, channels last): something for the model to respond to."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    field = ndi.gaussian_filter(rng.normal(size=(*shape, channels)), sigma=[2.0] * len(shape) + [0])
    blobs = (field > field.std()).astype(np.float32)
    return (100 + 50 * blobs + rng.normal(0, 5, blobs.shape)).astype(np.float32)


# --- files of the package ------------------------------------------------------------------


def _write_files(staging: str, saved_model_dir: str, meta: ModelMetadata, image: np.ndarray, probs: np.ndarray,
                 cover: str | None) -> dict[str, str]:
    """Weights zip, test tensors (batch axis first), cover and documentation in ``staging``; their paths."""
    os.makedirs(staging)
    files = {"weights": shutil.make_archive(os.path.join(staging, WEIGHTS_FILE[:-4]), "zip", root_dir=saved_model_dir),
             "test_input": os.path.join(staging, "test_input.npy"),
             "test_output": os.path.join(staging, "test_output.npy"),
             "cover": os.path.join(staging, "cover.png"), "documentation": os.path.join(staging, "README.md")}
    np.save(files["test_input"], image[None].astype(np.float32))
    np.save(files["test_output"], probs[None].astype(np.float32))
    if cover:
        if not os.path.isfile(cover) or os.path.splitext(cover)[1].lower() not in (".png", ".jpg", ".jpeg"):
            raise cliutil.InputError(f"cover {cover}: not a PNG or JPEG file; give one, or none for an overlay")
        files["cover"] = os.path.join(staging, "cover" + os.path.splitext(cover)[1].lower())
        shutil.copyfile(cover, files["cover"])
    else:
        import imageio.v3 as iio

        iio.imwrite(files["cover"], cover_image(image, probs))
    with open(files["documentation"], "w", encoding="utf-8") as fh:
        fh.write(documentation(meta, Geometry.of(meta)))
    return files


def cover_image(image: np.ndarray, probs: np.ndarray, min_height: int = 256) -> np.ndarray:
    """RGB uint8: the image (first channel, 1-99 % contrast) beside it with the predicted classes overlaid
    (2:1 for square images, as bioimage.io recommends); volumes show their middle z slice."""
    while image.ndim > 3:  # (Z, Y, X, C): the middle slice
        image, probs = image[image.shape[0] // 2], probs[probs.shape[0] // 2]
    low, high = np.percentile(image[..., 0], [1, 99])
    grey = np.clip((image[..., 0] - low) / max(high - low, 1e-6) * 255, 0, 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    classes = np.argmax(probs, axis=-1)
    overlay = rgb.copy()
    fg = classes > 0
    colours = CLASS_COLOURS[(classes[fg] - 1) % len(CLASS_COLOURS)]
    overlay[fg] = (0.5 * overlay[fg] + 0.5 * colours).astype(np.uint8)
    both = np.concatenate([rgb, overlay], axis=1)
    zoom = max(1, -(-min_height // both.shape[0]))
    return np.repeat(np.repeat(both, zoom, axis=0), zoom, axis=1)


# --- what the package says -------------------------------------------------------------


def instance_target(meta: ModelMetadata) -> str | None:
    """'3class', 'membrane' or 'distance' for instance models (metadata ``instances`` / ``instance_target`` /
    ``mask_type``), None for semantic ones."""
    info = meta.get("instances") or meta.get("instance_target")
    target = info.get("target") if isinstance(info, Mapping) else info
    if target is None and meta.get("mask_type") != "instances":
        return None
    target = str(target or ("3class" if meta.number_classes == 3 else "membrane"))
    if target == "distance":
        return "distance"
    return "3class" if target in ("3class", "three_class") else "membrane"


def class_names(meta: ModelMetadata) -> list[str]:
    """One name per output channel: the metadata's ``class_names``, the instance target's, or class_k."""
    names = meta.get("class_names")
    if isinstance(names, (list, tuple)) and len(names) == meta.number_classes:
        return [str(n) for n in names]
    target = instance_target(meta)
    if target == "3class" and meta.number_classes == 3:
        return ["background", "interior", "boundary"]
    if target == "membrane" and meta.number_classes == 2:
        return ["inside", "membrane"]
    if target == "distance" and meta.number_classes >= 3:
        return ["background", "boundary"] + [f"depth_{k + 1}_of_{meta.number_classes - 2}"
                                             for k in range(meta.number_classes - 2)]
    return ["background"] + [f"class_{k}" for k in range(1, meta.number_classes)]


def _space_units(meta: ModelMetadata, geometry: Geometry) -> list[dict[str, Any]]:
    """Physical size of one pixel per spatial axis (volumes: the metadata's voxel size), in nanometres.

    The spec infers each input axis' halo as output halo x output scale / input scale and refuses the package
    unless that is a whole number: in micrometres a 50 nm axis gives 24 x 0.05 / 0.05 = 24.000000000000004.
    Nanometres (rounded to 1e-6) are whole numbers for the usual voxel sizes, which divide exactly; a voxel size
    for which even they would not leaves the scales out (the voxel size stays in the model's metadata)."""
    if meta.voxel_size_um is None:
        return [{} for _ in geometry.axis_ids]
    scales = [round(float(v) * 1000, 6) for v in meta.voxel_size_um]
    if all(h * s / s == h for h, s in zip(geometry.halo, scales)):
        return [{"unit": "nanometer", "scale": s} for s in scales]
    return [{} for _ in geometry.axis_ids]


def _tensors(meta: ModelMetadata, geometry: Geometry, files: dict[str, str]):
    """The input and output tensor descriptions: the serving signature's layout (N, [Z,] Y, X, C)."""
    from bioimageio.spec.model import v0_5 as bio

    space_in, space_out = [], []
    units = _space_units(meta, geometry)
    for i, (axis, factor, halo) in enumerate(zip(geometry.axis_ids, geometry.size_factor, geometry.halo)):
        physical = units[i]
        space_in.append(bio.SpaceInputAxis(id=bio.AxisId(axis), size=bio.ParameterizedSize(
            min=geometry.minimum[i], step=factor), **physical))
        size = bio.SizeReference(tensor_id=bio.TensorId(INPUT_ID), axis_id=bio.AxisId(axis))
        space_out.append(bio.SpaceOutputAxisWithHalo(id=bio.AxisId(axis), size=size, halo=halo, **physical)
                         if halo else bio.SpaceOutputAxis(id=bio.AxisId(axis), size=size, **physical))
    eps = float(meta.normalization.get("epsilon", image_io.NORMALIZATION_EPSILON))
    normalize = bio.ZeroMeanUnitVarianceDescr(kwargs=bio.ZeroMeanUnitVarianceKwargs(
        axes=[bio.AxisId(a) for a in geometry.axis_ids], eps=eps))
    inputs = bio.InputTensorDescr(
        id=bio.TensorId(INPUT_ID), description="image, any pixel type (cast to float32)",
        axes=[bio.BatchAxis(), *space_in, bio.ChannelAxis(channel_names=[f"channel{c}" for c in range(meta.channels)])],
        test_tensor=bio.FileDescr(source=Path(files["test_input"])), preprocessing=[normalize],
        # Tools pad the image by the halo: the mirror extension of --border mirror. The mode is set explicitly:
        # a default-valued ReflectPadding() is written as {} and read back as zero padding.
        pad=bio.ReflectPadding(mode="reflect"),
        data=bio.IntervalOrRatioDataDescr(type="float32"))
    outputs = bio.OutputTensorDescr(
        id=bio.TensorId(OUTPUT_ID), description="softmax class probabilities (argmax over channel: class mask)",
        axes=[bio.BatchAxis(), *space_out, bio.ChannelAxis(channel_names=class_names(meta))],
        test_tensor=bio.FileDescr(source=Path(files["test_output"])),
        data=bio.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)))
    return inputs, outputs


def _cite_entries(meta: ModelMetadata, cite: Sequence[tuple[str, str]] | None):
    from bioimageio.spec.model import v0_5 as bio

    if cite is None:
        family = "fcdensenet" if meta.model.startswith("fcdensenet") else "unet"
        cite = [NIST_TOOLKIT, ARCHITECTURE_CITES[family]]
    entries = []
    for text, ref in cite:
        kind = "url" if ref.startswith(("http://", "https://")) else "doi"
        entries.append(bio.CiteEntry(text=text, **{kind: ref}))
    return entries


def default_authors() -> list[str]:
    """This user's full name (from the account), else the login name."""
    try:
        import pwd

        full = pwd.getpwuid(os.getuid()).pw_gecos.split(",")[0].strip()
    except (ImportError, KeyError):
        full = ""
    return [full or getpass.getuser()]


def build_description(meta: ModelMetadata, geometry: Geometry, files: dict[str, str], *,
                      authors: Sequence[str] | None = None, license: str = DEFAULT_LICENSE,
                      cite: Sequence[tuple[str, str]] | None = None, name: str | None = None,
                      description: str | None = None):
    """The validated ``bioimageio.spec`` ModelDescr (spec 0.5); InputError names a bad field."""
    import pydantic
    from bioimageio.spec import ValidationContext
    from bioimageio.spec.model import v0_5 as bio

    try:
        with ValidationContext(perform_io_checks=False):
            inputs, outputs = _tensors(meta, geometry, files)
            return bio.ModelDescr(
                name=name or default_name(meta), description=description or default_description(meta),
                authors=[bio.Author(name=a) for a in (authors or default_authors())],
                cite=_cite_entries(meta, cite), license=bio.LicenseId(license),
                documentation=bio.FileDescr(source=Path(files["documentation"])),
                covers=[bio.FileDescr(source=Path(files["cover"]))], tags=_tags(meta),
                inputs=[inputs], outputs=[outputs],
                weights=bio.WeightsDescr(tensorflow_saved_model_bundle=bio.TensorflowSavedModelBundleWeightsDescr(
                    source=Path(files["weights"]), tensorflow_version=bio.Version(_tensorflow_version()))))
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise cliutil.InputError(f"bioimage.io description: {where}: {first['msg']} (check the author, licence, "
                                 "citation and name given, or the model's metadata)") from None


def _tensorflow_version() -> str:
    from importlib.metadata import version

    return version("tensorflow")


def default_name(meta: ModelMetadata) -> str:
    kind = "instance" if instance_target(meta) else "semantic"
    return f"{meta.model} {meta.spatial_rank}D {kind} segmentation ({meta.number_classes} classes)"


def default_description(meta: ModelMetadata) -> str:
    return (f"{meta.model} trained with the UNet/FC-DenseNet segmentation toolkit (NIST design): "
            f"{meta.channels}-channel {meta.spatial_rank}-D images to per-pixel probabilities of "
            f"{', '.join(class_names(meta))}.")


def _tags(meta: ModelMetadata) -> list[str]:
    kind = "instance-segmentation" if instance_target(meta) else "semantic-segmentation"
    return ["segmentation", kind, f"{meta.spatial_rank}d", "tensorflow", meta.model.rstrip("0123456789") or "unet"]


# --- documentation -------------------------------------------------------------------


def documentation(meta: ModelMetadata, geometry: Geometry) -> str:
    """README.md of the package: inputs, outputs, post-processing, training, validation (markdown)."""
    return "\n".join([f"# {default_name(meta)}", "", default_description(meta), "", *_doc_io(meta, geometry),
                      *_doc_postprocessing(meta), *_doc_training(meta), *_doc_validation(meta)]) + "\n"


def _doc_io(meta: ModelMetadata, geometry: Geometry) -> list[str]:
    axes = ", ".join(geometry.axis_ids)
    eps = meta.normalization.get("epsilon", image_io.NORMALIZATION_EPSILON)
    spacing = (f"Voxel size (z, y, x): {', '.join(f'{v:g}' for v in meta.voxel_size_um)} micrometres."
               if meta.voxel_size_um else "Pixel size: not recorded by the training data.")
    return ["## Input", "",
            f"`{INPUT_ID}`: batch, {axes}, channel ({meta.channels} channel(s), channels last), float32 "
            f"(trained on {meta.image_dtype or 'unknown'} images). Sizes: minimum {list(geometry.minimum)}, "
            f"then steps of {list(geometry.size_factor)} (the size factor of the network's pooling). {spacing}", "",
            f"Preprocessing: per image and per channel, zero mean and unit variance over all of {axes} "
            f"(`zero_mean_unit_variance`, eps {eps:g}). This toolkit divides by max(std, eps) and bioimage.io "
            f"tools by std + eps: the two agree to a relative {eps:g} / std.", "",
            "## Output", "",
            f"`{OUTPUT_ID}`: batch, {axes}, channel: softmax probabilities of the classes "
            f"{', '.join(class_names(meta))} (channel k = class k; 0 = background). The class mask is the argmax "
            "over the channel axis.", "",
            f"Halo {list(geometry.halo)} px per side (the receptive-field radius {list(meta.per_axis('receptive_field_radius'))} "
            "rounded up to the size factor): tiles are predicted with that much context and cropped by it, so "
            "tiled prediction equals whole-image prediction.", ""]


# the last step of the 3class and distance targets' labelling (segkit.instances._fill_holes)
HOLES = (" Last, background enclosed by one object (not touching another object or the image edge) is filled into "
         "that object.")


def _doc_postprocessing(meta: ModelMetadata) -> list[str]:
    target = instance_target(meta)
    if target is None:
        return ["## Post-processing", "", "None beyond the argmax: each pixel's class is the channel of highest "
                "probability.", ""]
    block = meta.get("instances")  # ModelMetadata's instances block: thresholds under "thresholds"
    thresholds = block.get("thresholds", block) if isinstance(block, Mapping) else {}
    from segkit.instances import InstanceThresholds

    defaults = InstanceThresholds().to_dict()  # what labelling uses for a threshold the metadata leaves out
    seed, fg, min_size, dynamic = (thresholds.get(k, defaults[k]) for k in ("seed", "foreground", "min_size", "dynamic"))
    if target == "3class":
        steps = (f"Objects (instance labels) from the probabilities: seeds are connected components of "
                 f"p_interior > {seed} (smaller than {min_size} pixels dropped), grown by a seeded watershed on "
                 f"1 - p_interior within the foreground p_interior + p_boundary > {fg}; a foreground component "
                 "without a seed becomes one object." + HOLES)
    elif target == "distance":
        steps = (f"Objects (instance labels) from the probabilities: the expected depth d = sum over the depth "
                 f"channels k = 1..L of p_k (k - 0.5) / L (0 for background and boundary); seeds are connected "
                 f"components of d > {seed} (smaller than {min_size} pixels dropped)"
                 + (f", each with two or more peaks of d of dynamic >= {dynamic} split into them (h-maxima, h = "
                    f"{dynamic}, of d within the component, 0 around it; other components stay whole)" if dynamic else "")
                 + f", grown by a seeded watershed on 1 - d within the foreground 1 - p_background > {fg}; a "
                 "foreground component without a seed becomes one object." + HOLES)
    else:
        steps = (f"Objects (instance labels) from the probabilities: seeds are connected components of "
                 f"p_inside > {seed} (smaller than {min_size} pixels dropped), flooded by a watershed on "
                 "p_membrane over the whole image.")
    return ["## Post-processing (instance segmentation)", "", steps,
            "This toolkit does it with `segkit.instances.labels_from_probabilities` (and `inference_unet.py`); "
            "in other tools apply a seeded watershed with the same thresholds.", ""]


def _doc_training(meta: ModelMetadata) -> list[str]:
    lines = ["## Training", "", f"Network: `{meta.model}` {json.dumps(dict(meta.model_config), default=str)}.",
             f"Training crops: {list(meta.training_tile_size or [])} px; mask map: "
             f"{json.dumps(dict(meta.mask_map)) if meta.mask_map else 'none'}.", ""]
    if meta.training:
        lines += ["| setting | value |", "|---|---|"]
        lines += [f"| {k} | `{json.dumps(v, default=str)}` |" for k, v in meta.training.items()]
        lines.append("")
    return lines


def _doc_validation(meta: ModelMetadata) -> list[str]:
    lines = ["## Validation", "", "Best test-pass metrics of the training run (held-out test database):", ""]
    metrics = dict(meta.final_metrics or {})
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    else:
        lines.append("(none recorded)")
    lines += ["", "To validate on your own annotated images: `inference_unet.py --saved_model_filepath "
              "saved_model --image_folder IMAGES --mask_folder MASKS --output_folder OUT` prints IoU and Dice "
              "per class.", ""]
    return lines


# --- saving -------------------------------------------------------------------------------


def _save_package(descr, folder: str, staging: str) -> tuple[str, str]:
    """Folder and zip written in ``staging``, the zip re-loaded and validated, then both renamed into place."""
    from bioimageio.spec import load_description, save_bioimageio_package, save_bioimageio_package_as_folder

    tmp_folder, tmp_zip = os.path.join(staging, "package"), os.path.join(staging, "package.zip")
    save_bioimageio_package_as_folder(descr, output_path=Path(tmp_folder))
    save_bioimageio_package(descr, output_path=Path(tmp_zip))
    loaded = load_description(tmp_zip, perform_io_checks=True)
    status = loaded.validation_summary.status
    if status not in ("valid-format", "passed"):
        raise cliutil.InputError(f"bioimage.io package does not validate ({status}): "
                                 f"{loaded.validation_summary.format()[:500]}")
    final_zip = folder + ".zip"
    _replace_folder(tmp_folder, folder)
    os.replace(tmp_zip, final_zip)
    cliutil.fsync_path(os.path.dirname(os.path.abspath(folder)))
    log.info("bioimage.io package: %s (and %s)", folder, final_zip)
    return folder, final_zip


def _replace_folder(new: str, final: str) -> None:
    """Rename ``new`` to ``final``; an existing ``final`` is moved aside first and removed after."""
    old = None
    if os.path.exists(final):
        old = cliutil.make_temp(final, directory=True)
        os.rmdir(old)
        os.rename(final, old)
    os.rename(new, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)
