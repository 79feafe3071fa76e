"""RunConfig: every resolved setting of a training run, one documented field each, saved as config.json.

No TensorFlow here. Fields say in their metadata what they mean ("doc") and whether a checkpoint may
only be continued with the same value ("run_defining": True, or a predicate of the config). README.md,
"Stage 2", describes the files of a run.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import models
from segkit import cliutil

log = logging.getLogger(__name__)

WARMUP_MAX_STEPS = 1000
LOSSES = ("ce", "dice", "ce+dice", "focal")
LR_SCHEDULES = ("constant", "cosine")
EMA_DEFAULT_DECAY = 0.999
CONFIG_FILENAME = "config.json"


@dataclass(frozen=True)
class Rule:
    """A range check of one value: ``test(value)`` must hold; ``text`` completes "--name ..." or "name ..."."""

    test: Callable[[Any], bool]
    text: str


AT_LEAST_1 = Rule(lambda v: v >= 1, "must be >= 1")
MAX_SIZE = 65536       # pixels per axis, samples per batch: anything larger is a typo, not a run
MAX_SEED = 2 ** 32 - 1  # numpy SeedSequence and keras.utils.set_random_seed take 32-bit seeds


def at_most(limit: int, lower: int = 1) -> Rule:
    return Rule(lambda v: lower <= v <= limit, f"must be >= {lower} and <= {limit}")


def augmentation_constants() -> dict[str, dict[str, Any]]:
    """augment.py's AugmentParams and augment3d.py's AugmentParams3D values the reader trains with (their
    defaults: the constants at the top of those modules), JSON-style."""
    import augment
    import augment3d

    return json.loads(json.dumps({"2d": dataclasses.asdict(augment.AugmentParams()),
                                  "3d": dataclasses.asdict(augment3d.AugmentParams3D())}))
POSITIVE = Rule(lambda v: v > 0 and math.isfinite(v), "must be a positive number")


def one_of(choices) -> Rule:
    return Rule(lambda v: v in choices, "must be one of " + ", ".join(choices))


def setting(doc: str, *, run_defining: bool | Callable[[RunConfig], bool] = False, rule: Rule | None = None,
            legacy: Any = dataclasses.MISSING, default: Any = dataclasses.MISSING, serialized: bool = True,
            omit_empty: bool = False, **kw):
    """A RunConfig field. ``legacy``: the value meant when a config.json written before the field existed
    lacks it (fields without one must be present). ``serialized``: written to config.json; ``omit_empty``:
    left out of it while None or empty (so configurations that do not use it are written as before)."""
    meta = {"doc": doc, "run_defining": run_defining, "rule": rule, "legacy": legacy, "serialized": serialized,
            "omit_empty": omit_empty}
    return field(default=default, metadata=meta, **kw)


@dataclass(frozen=True)
class RunConfig:
    """Every resolved setting of one training run; see each field's ``doc`` (:func:`describe`)."""

    model: str = setting("architecture, one of models.ALL_MODEL_NAMES", run_defining=True, rule=one_of(models.ALL_MODEL_NAMES))
    model_config: dict = setting("the architecture's full settings (models.model_config)", run_defining=True)
    size_factor: int = setting("image height and width must be multiples of this", rule=AT_LEAST_1)
    channels: int = setting("image channels of the databases", run_defining=True, rule=AT_LEAST_1)
    number_classes: int = setting("classes the model predicts (mask values 0..N-1)", run_defining=True,
                                  rule=at_most(MAX_SIZE, lower=2))
    image_dtype: str = setting("pixel type of the training images (numpy name)")
    train_database: tuple = setting("absolute paths of the training databases",
                                    rule=Rule(lambda v: len(v) >= 1, "must name at least one database"))
    test_database: str = setting("absolute path of the test database")
    output_dir: str = setting("absolute path of the run's folder")
    batch_size: int = setting("samples per replica; global batch = batch_size x replicas", run_defining=True,
                              rule=at_most(MAX_SIZE))
    learning_rate: float = setting("Adam learning rate after warm-up", run_defining=True, rule=POSITIVE)
    lr_schedule: str = setting("after warm-up: constant, or cosine decay to a hundredth at max_steps (else at the "
                               "end of the max_minutes budget)",
                               run_defining=True, rule=one_of(LR_SCHEDULES), legacy="constant")
    ema_decay: float = setting("decay of the weights' moving average that is tested and exported; 0 = raw weights",
                               run_defining=True, legacy=0.0,
                               rule=Rule(lambda v: 0.0 <= v < 1.0, "must be in [0, 1) (0 = no moving average)"))
    test_every_n_steps: int = setting("steps between test passes (an 'epoch')", run_defining=True, rule=AT_LEAST_1)
    warmup_steps: int = setting("first steps at a tenth of the learning rate: min(1000, --test_every_n_steps), "
                                "or min(100, the interval) when the interval was chosen",
                                rule=Rule(lambda v: v >= 0, "must be >= 0"))
    balance_classes: bool = setting("sample a class uniformly, then a record containing it", run_defining=True)
    use_augmentation: bool = setting("augment training samples (augment.py)", run_defining=True)
    early_stopping: int = setting("stop after this many test passes without improvement; 0 = never",
                                  rule=Rule(lambda v: v >= 0, "must be >= 0 (0 = never stop early)"))
    reader_count: int = setting("reader processes per replica", rule=at_most(256))
    seed: int = setting("seed of weights initialization and of the sample stream", run_defining=True,
                        rule=at_most(MAX_SEED, lower=0))
    max_steps: int | None = setting("stop after this many steps; None = early stopping only "
                                       "(run-defining under lr_schedule cosine, which decays to it)",
                                       run_defining=lambda c: c.lr_schedule == "cosine", rule=AT_LEAST_1)
    mixed_precision: bool = setting("mixed_float16 requested (active only on a GPU)", run_defining=True)
    loss: str = setting("training loss", run_defining=True, rule=one_of(LOSSES))
    class_weights: str = setting("the --class_weights text: none, auto or w0,w1,...")
    class_weight_values: tuple = setting("resolved weight per class", run_defining=True,
                                         rule=Rule(lambda v: all(w >= 0 and math.isfinite(w) for w in v)
                                                   and max(v, default=0) > 0, "must be non-negative, not all 0"))
    crop_size: tuple = setting("training crop (height, width), or (z, y, x) for volumes, in pixels", run_defining=True,
                               rule=Rule(lambda v: len(v) in (2, 3) and 1 <= min(v) and max(v) <= MAX_SIZE,
                                         f"must be two sizes >= 1 (three for volumes) and <= {MAX_SIZE}"))
    train_data: tuple = setting("content fingerprint of each training database", run_defining=True)
    test_data: dict = setting("content fingerprint of the test database", run_defining=True)
    mask_map: dict | None = setting("mask value -> class map of the training databases; None = they disagree",
                                       legacy=None)
    augmentation: dict | None = setting("augmentation constants: augment.py's AugmentParams ('2d') and "
                                 "augment3d.py's AugmentParams3D ('3d'); None = not recorded (a config.json written "
                                 "before the field existed; resumed without the check)", run_defining=True,
                                 legacy=None, default=None, omit_empty=True,
                                 rule=Rule(lambda v: set(v) == {"2d", "3d"} and all(isinstance(p, dict) for p in v.values()),
                                           "must hold the '2d' and '3d' parameter objects"))
    max_minutes: float | None = setting("stop stepping when this many minutes of training (steps and test passes) "
                                           "have passed in this run, over every resumed invocation (state.json "
                                           "counts them), then test and export; None = no time limit "
                                           "(run-defining under lr_schedule cosine without max_steps, which decays to it)",
                                           run_defining=lambda c: c.lr_schedule == "cosine" and c.max_steps is None,
                                           rule=POSITIVE, legacy=None, default=None, omit_empty=True)
    # Known once the run starts (train()):
    replicas: int | None = setting("replicas in sync (GPUs over all workers)", default=None, legacy=None,
                                      rule=AT_LEAST_1)
    workers: int | None = setting("worker machines", default=None, legacy=None, rule=AT_LEAST_1)
    global_batch_size: int | None = setting("batch_size x replicas", default=None, legacy=None, rule=AT_LEAST_1)
    mixed_precision_active: bool | None = setting("whether mixed_float16 was active (a GPU was visible)",
                                                     default=None, legacy=None)
    clip_norm: float | None = setting("each replica's gradient (of its batch's mean loss) is scaled down to this global "
                                      "norm when larger; 0 = no clipping; None = not recorded (a config.json written "
                                      "before the field existed: that run did not clip; continued by this version, "
                                      "it clips from then on unless --clip_norm 0 is passed)", run_defining=True,
                                      legacy=None, default=None, omit_empty=True,
                                      rule=Rule(lambda v: v >= 0 and math.isfinite(v), "must be >= 0 (0 = no clipping)"))
    origins: dict = setting("field name -> why the toolkit chose its value (segkit.training.autoconfig); fields "
                            "not listed were set by a flag or are the flag's default", legacy={}, omit_empty=True,
                            default_factory=dict, compare=False, repr=False,
                            rule=Rule(lambda v: all(isinstance(k, str) and isinstance(r, str) for k, r in v.items()),
                                      "must map field names to reasons"))

    def __post_init__(self):
        for f in _fields():
            object.__setattr__(self, f.name, _coerce(f, getattr(self, f.name), "RunConfig"))
        if self.lr_schedule == "cosine" and self.max_steps is None and self.max_minutes is None:
            raise cliutil.InputError("RunConfig: lr_schedule cosine decays to max_steps or to the end of max_minutes; "
                                     "set one")

    def __getitem__(self, name: str) -> Any:
        """Read access by name, as the dict this replaces (config["model"]): scripts written for it keep working."""
        if name not in _field_names():
            raise KeyError(name)
        return getattr(self, name)

    def run_defining(self) -> list[str]:
        """Names of the fields a checkpoint must share with this configuration to be continued."""
        return [f.name for f in _fields() if _is_run_defining(f, self)]

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form written to config.json (tuples as lists)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in _fields() if f.metadata["serialized"]
                and not (f.metadata["omit_empty"] and getattr(self, f.name) in (None, {}))}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "RunConfig") -> RunConfig:
        """Validate every field of ``data`` (types, ranges); InputError naming ``source`` and the field."""
        values = {}
        for f in _fields():
            if not f.metadata["serialized"]:
                continue
            if f.name in data:
                values[f.name] = _coerce(f, data[f.name], source)
            elif f.metadata["legacy"] is not dataclasses.MISSING:
                values[f.name] = f.metadata["legacy"]
            else:
                raise cliutil.InputError(f"{source}: the field '{f.name}' is missing; restore it or start a new --output_dir")
        unknown = sorted(set(data) - set(values))
        if unknown:
            log.info("%s: ignoring unknown field(s) %s", source, ", ".join(unknown))
        _check_model(values, source)
        try:
            return cls(**values)
        except cliutil.InputError as exc:
            raise cliutil.InputError(str(exc).replace("RunConfig", source, 1)) from None

    @classmethod
    def load(cls, path: str) -> RunConfig:
        """Read and validate a config.json (also one written before lr_schedule, ema_decay or mask_map existed)."""
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, json.JSONDecodeError) as exc:
            raise cliutil.InputError(f"{path}: unreadable ({exc}); restore it or start a new --output_dir") from None
        if not isinstance(data, dict):
            raise cliutil.InputError(f"{path}: expected a JSON object of settings; restore it or start a new --output_dir")
        return cls.from_dict(data, source=path)

    def save(self, path: str) -> None:
        cliutil.atomic_write_text(path, self.to_json())


def describe() -> dict[str, str]:
    """Field name -> its documentation (with "[run-defining]" where it is)."""
    return {f.name: f.metadata["doc"] + (" [run-defining]" if f.metadata["run_defining"] is True else "")
            for f in _fields()}


def config_view(config: RunConfig | Mapping[str, Any]):
    """Attribute access to a RunConfig or to a plain mapping with some of its keys (tests, notebooks)."""
    return config if isinstance(config, RunConfig) else types.SimpleNamespace(**config)


def _fields() -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(RunConfig)


def _field_names() -> frozenset[str]:
    return frozenset(f.name for f in _fields() if f.metadata["serialized"])


def _is_run_defining(f: dataclasses.Field, config: RunConfig) -> bool:
    flag = f.metadata["run_defining"]
    return flag(config) if callable(flag) else bool(flag)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


_SCALARS = {int: "an integer", float: "a number", bool: "0/1 (true/false)", str: "a text", dict: "a JSON object",
            tuple: "a list"}


def _coerce(f: dataclasses.Field, value: Any, source: str) -> Any:
    """``value`` as the field's type (lists -> tuples, integers -> floats), range-checked; else InputError."""
    kind, optional = _kind(f)
    if value is None and optional:
        return None
    problem = None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is tuple and isinstance(value, list):
        value = tuple(value)
    if kind is bool and isinstance(value, int) and value in (0, 1):
        value = bool(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        problem = f"must be {_SCALARS[kind]}{' or null' if optional else ''}, got {json.dumps(_jsonable(value))[:40]}"
    elif f.metadata["rule"] is not None and not _passes(f.metadata["rule"], value):
        problem = f"{f.metadata['rule'].text}, got {json.dumps(_jsonable(value))[:40]}"
    if problem:
        raise cliutil.InputError(f"{source}: the field '{f.name}' {problem}; fix it or start a new --output_dir")
    return value


def _passes(rule: Rule, value: Any) -> bool:
    try:
        return bool(rule.test(value))
    except (TypeError, ValueError):
        return False


@functools.cache
def _hints() -> dict[str, Any]:
    return typing.get_type_hints(RunConfig)


def _kind(f: dataclasses.Field) -> tuple[type, bool]:
    hint = _hints()[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType)  # Optional[X] or X | None
    base = args[0] if optional else hint
    return (typing.get_origin(base) or base), optional


def _check_model(values: dict[str, Any], source: str) -> None:
    """The architecture settings must describe a model this toolkit builds (models.model_config)."""
    if values.get("model") not in models.ALL_MODEL_NAMES:
        return  # the field check names it
    try:
        models.model_config(values["model"], **values["model_config"])
    except (ValueError, TypeError) as exc:
        raise cliutil.InputError(f"{source}: the field 'model_config' is invalid ({exc}); fix it or start a new "
                                 "--output_dir") from None
