"""The metadata a trained SavedModel carries, as one typed, frozen, validated object (:class:`ModelMetadata`).

Stored as ``saved_model/assets/segmentation_metadata.json`` (written by ``train_unet.py``'s export
through :func:`make_metadata`, read by inference without TensorFlow). Each field documents itself
(``ModelMetadata.describe()``); README.md, "What the SavedModel carries", says how stages use it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from types import MappingProxyType
from typing import Any, Mapping

from segkit import cliutil, image_io

FORMAT = "segmentation-savedmodel"
FORMAT_VERSION = 1
METADATA_FILENAME = "segmentation_metadata.json"
SIGNATURE = {"name": "serving_default", "input": "images", "output": "probabilities"}
REQUIRED_KEYS = ("model", "channels", "number_classes", "normalization", "size_factor", "receptive_field_radius")
RE_EXPORT = "; re-export the model with train_unet.py of this toolkit"


class MetadataError(cliutil.InputError, ValueError):
    """Bad or missing metadata: one line naming the file and the field (exit 2 at the command line)."""


def _field(doc: str, kind: str, default: Any = dataclasses.MISSING, **check: Any) -> Any:
    """A dataclass field whose metadata carries its documentation and how it is validated."""
    meta = {"doc": doc, "kind": kind, **check}
    if isinstance(default, dict):
        return dataclasses.field(default_factory=lambda: MappingProxyType(dict(default)), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class ModelMetadata:
    """What inference needs to know about a trained model; see each field's ``doc`` (``describe()``)."""

    model: str = _field("registry name of the network, e.g. 'unet', 'fcdensenet56'", "str")
    channels: int = _field("input channels C of the images the model was trained on", "int", minimum=1)
    number_classes: int = _field("output classes K (class 0 = background)", "int", minimum=1)
    normalization: Mapping[str, Any] = _field(
        "{'method': ..., 'epsilon': ...}: how images are normalized before the model (image_io)", "mapping")
    size_factor: int | tuple[int, ...] = _field(
        "input spatial sizes must be multiples of this (pooling depth); a list: one per spatial axis ((z, y, x) "
        "for volumes)", "int|axes", minimum=1)
    receptive_field_radius: float | tuple[float, ...] = _field(
        "theoretical receptive-field radius in pixels: the exact halo; a list: one per spatial axis", "number|axes")
    model_config: Mapping[str, Any] = _field("the network's get_config()-style keyword arguments", "mapping", {})
    image_dtype: str | None = _field("pixel type of the training images (informational)", "str?", None)
    effective_receptive_field_radius: float | None = _field(
        "radius measured by a gradient probe, rounded up to the size factor (--halo erf)", "number?", None)
    effective_receptive_field: Mapping[str, Any] | None = _field("details of the gradient probe", "mapping?", None)
    training_tile_size: tuple[int, ...] | None = _field("spatial size of the training crops", "sizes?", None)
    final_metrics: Mapping[str, Any] | None = _field("best test-pass metrics of the training run", "mapping?", {})
    mask_map: Mapping[str, int] | None = _field(
        "{'VALUE': CLASS} the training masks were remapped with (build_lmdb.py --mask_map; {} none, null when "
        "the training databases disagreed); inference applies it to --mask_folder ground truth", "mask_map?", None)
    training: Mapping[str, Any] | None = _field("training settings (loss, learning rate, batch size, seed, ...)",
                                                "mapping?", None)
    signature: Mapping[str, str] = _field("serving signature: name, input and output tensor names", "mapping",
                                          SIGNATURE)
    format: str = _field(f"always {FORMAT!r}", "str", FORMAT)
    format_version: int = _field(f"version of this layout ({FORMAT_VERSION})", "int", FORMAT_VERSION, minimum=1)
    # Written only when not the default, so 2-D models' files stay as they were.
    spatial_rank: int = _field("spatial axes of the images: 2 (NHWC) or 3 (volumes, NDHWC)", "rank", 2,
                               omit_default=True)
    voxel_size_um: tuple[float, ...] | None = _field(
        "(z, y, x) voxel size in micrometres the volume model was planned for; null for 2-D models", "spacing?", None,
        omit_default=True)
    instances: Mapping[str, Any] | None = _field(
        "models trained on instance targets (build_lmdb.py --mask_type instances): {'target': 'three_class', "
        "'boundary' or 'distance', 'classes': class names, 'thresholds': segkit.instances.InstanceThresholds fields, 'halo_px': "
        "context in pixels (one number, or one per spatial axis) for seam merging out of core, and optionally "
        "'tuning': how the thresholds were fitted on training records (segkit.instance_tuning) and, 2-D, "
        "'object_diameter_px': the median training object's diameter (inference --object_diameter)}; null otherwise",
        "instances?", None, omit_default=True)
    extra: Mapping[str, Any] = _field("keys this version does not know, kept as they are", "mapping", {})

    def __post_init__(self) -> None:
        for spec in dataclasses.fields(self):
            object.__setattr__(self, spec.name, _checked(spec, getattr(self, spec.name)))
        if self.format != FORMAT or self.format_version != FORMAT_VERSION:
            raise MetadataError(f"unsupported metadata format {self.format!r} v{self.format_version}")
        for name in ("size_factor", "receptive_field_radius", "voxel_size_um"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != self.spatial_rank:
                raise MetadataError(f"metadata field {name} must have one value per spatial axis "
                                    f"({self.spatial_rank}), got {list(value)}")
        if self.instances is not None:
            _check_instances_block(self.instances, self.number_classes, self.spatial_rank)

    def per_axis(self, name: str) -> tuple:
        """``size_factor`` or ``receptive_field_radius`` as one value per spatial axis (a number repeated)."""
        value = getattr(self, name)
        return value if isinstance(value, tuple) else (value,) * self.spatial_rank

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelMetadata:
        """From the JSON dict; unknown keys go to ``extra``. MetadataError names the first bad field."""
        check_required(data)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        """The JSON dict (the layout of ``segmentation_metadata.json``), extra keys included."""
        data = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "extra"
                and not (f.metadata.get("omit_default") and getattr(self, f.name) == f.default)}
        return {**data, **_plain(self.extra)}

    def write(self, saved_model_dir: str) -> str:
        """Write ``assets/segmentation_metadata.json`` atomically; returns its path."""
        path = metadata_path(saved_model_dir)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        cliutil.atomic_write_text(path, json.dumps(self.to_dict(), indent=1))
        return path

    # Read access by key, for code written against the metadata dict (``meta["size_factor"]``).
    def __getitem__(self, key: str) -> Any:
        value = self.get(key, dataclasses.MISSING)
        if value is dataclasses.MISSING:
            raise KeyError(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        if key != "extra" and key in self.__dataclass_fields__:
            return getattr(self, key)
        return self.extra.get(key, default)

    @classmethod
    def describe(cls) -> str:
        """One line per field: name and documentation."""
        return "\n".join(f"{f.name}: {f.metadata['doc']}" for f in dataclasses.fields(cls))


def _plain(value: Any) -> Any:
    """JSON-ready copy: read-only mappings -> dicts, tuples -> lists (recursively)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _checked(spec: dataclasses.Field, value: Any) -> Any:
    """``value`` validated against the field's kind (read-only when a mapping); MetadataError otherwise."""
    kind, name = spec.metadata["kind"], spec.name
    if kind.endswith("?"):
        if value is None:
            return None
        kind = kind[:-1]
    if kind.endswith("|axes"):  # a number, or one per spatial axis
        scalar = kind[:-len("|axes")]
        if not isinstance(value, (list, tuple)):
            return _checked_kind(name, scalar, value, spec.metadata.get("minimum", 0))
        if len(value) not in (2, 3):
            raise MetadataError(f"metadata field {name} must be a number or a list of 2 or 3 (one per spatial "
                                f"axis), got {value!r}")
        return tuple(_checked_kind(name, scalar, v, spec.metadata.get("minimum", 0)) for v in value)
    return _checked_kind(name, kind, value, spec.metadata.get("minimum", 0))


def _checked_kind(name: str, kind: str, value: Any, minimum: int) -> Any:
    problem = _problem(kind, value, minimum)
    if problem:
        raise MetadataError(f"metadata field {name} must be {problem}, got {value!r}")
    if kind == "int":
        return int(value)
    if kind in ("sizes", "rank"):
        return tuple(int(v) for v in value) if kind == "sizes" else int(value)
    if kind == "spacing":
        return tuple(float(v) for v in value)
    if kind in ("mapping", "mask_map", "instances"):
        return MappingProxyType(dict(value))
    return value


def _problem(kind: str, value: Any, minimum: int) -> str | None:
    """What ``value`` should be, or None when it is fine."""
    if kind == "str":
        return None if isinstance(value, str) and value else "a non-empty string"
    if kind == "int":
        return None if _is_int(value) and value >= minimum else f"an integer >= {minimum}"
    if kind == "number":
        return None if _is_number(value) and value >= 0 else "a finite number >= 0"
    if kind == "sizes":
        ok = isinstance(value, (list, tuple)) and len(value) in (2, 3) and all(_is_int(v) and v > 0 for v in value)
        return None if ok else "a list of 2 or 3 positive integers (one per spatial axis)"
    if kind == "rank":
        return None if _is_int(value) and value in (2, 3) else "2 or 3"
    if kind == "spacing":
        ok = isinstance(value, (list, tuple)) and len(value) == 3 and all(_is_number(v) and v > 0 for v in value)
        return None if ok else "a list of 3 positive numbers (z, y, x micrometres)"
    if not isinstance(value, Mapping):
        return "a JSON object"
    if kind == "mask_map":
        try:
            image_io.parse_mask_map(dict(value))
        except ValueError:
            return "an object of VALUE: CLASS pairs (non-negative integers)"
    return None


INSTANCE_TARGET_CLASSES = {"three_class": 3, "boundary": 2, "distance": 6}  # segkit.instance_targets.CLASSES
INSTANCE_KEYS = ("target", "classes", "thresholds", "halo_px")
MAX_OBJECT_DIAMETER_PX = 1e5
INSTANCE_OPTIONAL_KEYS = ("tuning",  # how the thresholds were fitted (segkit.instance_tuning), a record only
                          "object_diameter_px")  # 2-D: the median training object's diameter (--object_diameter)


def _check_instances_block(block: Mapping[str, Any], number_classes: int, rank: int) -> None:
    """The ``instances`` block: known keys, a target that matches the classes, valid thresholds and halo."""
    from segkit.instances import InstanceThresholds, ThresholdError

    keys = sorted((set(block) - set(INSTANCE_OPTIONAL_KEYS)) ^ set(INSTANCE_KEYS))
    if keys:
        raise MetadataError(f"metadata field instances must have exactly the keys {list(INSTANCE_KEYS)}, and "
                            f"may have {list(INSTANCE_OPTIONAL_KEYS)} (differs in {keys})")
    if "tuning" in block and not isinstance(block["tuning"], Mapping):
        raise MetadataError(f"metadata field instances.tuning must be a JSON object, got {block['tuning']!r}")
    classes = INSTANCE_TARGET_CLASSES.get(block["target"])
    if classes is None:
        raise MetadataError(f"metadata field instances.target must be one of {sorted(INSTANCE_TARGET_CLASSES)}, "
                            f"got {block['target']!r}")
    if classes != number_classes:
        raise MetadataError(f"metadata field instances.target {block['target']!r} needs {classes} classes, "
                            f"the model has {number_classes}")
    if not isinstance(block["thresholds"], Mapping):
        raise MetadataError(f"metadata field instances.thresholds must be a JSON object, got {block['thresholds']!r}")
    try:
        InstanceThresholds.from_dict(block["thresholds"])
    except ThresholdError as exc:
        raise MetadataError(f"metadata field instances.thresholds: {exc}") from None
    diameter = block.get("object_diameter_px")
    if diameter is not None and (rank != 2 or isinstance(diameter, bool) or not isinstance(diameter, (int, float))
                                 or not math.isfinite(diameter) or not 1 <= diameter <= MAX_OBJECT_DIAMETER_PX):
        raise MetadataError(f"metadata field instances.object_diameter_px must be a number of pixels in 1-"
                            f"{MAX_OBJECT_DIAMETER_PX:g} (2-D models only), got {diameter!r}")
    halo = block["halo_px"]
    halos = list(halo) if isinstance(halo, (list, tuple)) else [halo]
    if len(halos) not in (1, rank) or not all(_is_int(h) and h >= 1 for h in halos):
        raise MetadataError(f"metadata field instances.halo_px must be an integer >= 1 or one per spatial axis "
                            f"({rank}), got {halo!r}")


def metadata_path(saved_model_dir: str) -> str:
    return os.path.join(saved_model_dir, "assets", METADATA_FILENAME)


def load(saved_model_dir: str) -> ModelMetadata:
    """Read and validate a SavedModel's metadata; MetadataError naming the file (and field) otherwise."""
    if not os.path.isfile(os.path.join(saved_model_dir, "saved_model.pb")):
        raise MetadataError(f"{saved_model_dir}: not a SavedModel folder (no saved_model.pb); pass the saved_model/ "
                            "folder that train_unet.py wrote")
    path = metadata_path(saved_model_dir)
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise MetadataError(f"{saved_model_dir}: SavedModel has no {METADATA_FILENAME}; export it with "
                            "train_unet.py of this toolkit") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MetadataError(f"{path}: metadata is not valid JSON ({exc}){RE_EXPORT}") from None
    if not isinstance(data, dict):
        raise MetadataError(f"{path}: metadata must be a JSON object, got {type(data).__name__}{RE_EXPORT}")
    try:
        return ModelMetadata.from_dict(data)
    except MetadataError as exc:
        raise MetadataError(f"{path}: {exc}{RE_EXPORT}") from None


def read_metadata(saved_model_dir: str) -> ModelMetadata:
    """:func:`load` (the name callers used when the metadata was a dict; indexing by key still works)."""
    return load(saved_model_dir)


def check_required(meta: Mapping[str, Any], where: str = "", fix: str = "") -> None:
    """MetadataError naming the REQUIRED_KEYS that ``meta`` lacks."""
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise MetadataError(f"{where}metadata lacks {', '.join(missing)}{fix}")


def make_metadata(**fields: Any) -> dict[str, Any]:
    """A complete, validated metadata dict: ``fields`` plus format, version and signature (train_unet's export).

    Extra keys are kept (readers ignore what they do not know).
    """
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "signature": dict(SIGNATURE), **fields}
    return ModelMetadata.from_dict(meta).to_dict()
