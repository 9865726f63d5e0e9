"""Typed run configuration: dataclasses, YAML presets and files, and ``key=value`` overrides.

Keys are dotted (``plm.n_alpha``, ``train.epochs``). An unknown key is an error that lists the
valid ones; values are converted to the field's type. The presets (the recipes ``cub200``, ``cars196``,
``sop``, ``plankton106``, METHOD.md's literal defaults ``cub200_paper``, the demo's and the folder's)
ship inside the package (``plmetric/config/presets/*.yaml``) and are read with :mod:`importlib.resources`,
so they work from a wheel as from a checkout.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from plmetric.core.files import require_regular_file
from plmetric.core.options import INFERENCE_RUNTIMES, PLMOptions, STMLOptions, SupervisedOptions, method_names
from plmetric.core.validation import (
    IMAGE_SIZE_MAX,
    MAX_BATCH_SIZE,
    MAX_EMBEDDING_DIM,
    MAX_EPOCHS,
    MAX_ITEMS,
    MAX_NESTING_DEPTH,
    MAX_NEIGHBOURS,
    MAX_STEPS,
    MAX_WORKERS,
    check_choice,
    check_image_size,
    check_int,
    check_number,
    shown,
)

#: ``model.frozen_stages``: a backbone has a handful of stages (EfficientNet-Lite 9, ResNet-50 8); 100 is
#: more than any has.
MAX_FROZEN_STAGES = 100
#: ``train.views``: cached views per image (5 in the folder recipe); each view is an embedding pass over the
#: whole set and a copy of its features.
MAX_VIEWS = 1_000
#: ``train.seed``: torch's generator takes 64 bits (NumPy's gets ``seed % 2**32``).
MAX_TRAIN_SEED = 2**63 - 1


@dataclass
class DataConfig:
    """Where the images come from and how they are prepared."""

    dataset: str = "cub200"  # cub200, cars196, sop, folder, images, digits
    root: str | None = None
    image_size: int = 224
    crop_scale_min: float = 0.16  # RandomResizedCrop scale (min, 1)
    # eval/clean transform: center_crop (shorter side to round(S * 256 / 224), centre crop S) or whole (the
    # whole image resized to S x S); recorded in the checkpoint, which every command then follows
    eval_resize: str = "center_crop"
    num_workers: int = 4
    # training input: pil (decode + augment per item in DataLoader workers), cached (decode once into a
    # uint8 cache, augment on the device: plmetric.data.pipeline) or auto (cached on CUDA, pil on the CPU)
    pipeline: str = "auto"
    cache_size: int | None = None  # shorter side of cached images (default round(image_size * 256 / 224))
    cache_max_bytes: str | None = None  # size guard, e.g. "16G" (default $PLMETRIC_CACHE_MAX_BYTES or 8 GiB)
    cache_path: str | None = None  # a .npy file to memory-map (shared by ranks, reused across runs)


@dataclass
class ModelConfig:
    """The student network (the teacher is its moving average)."""

    backbone: str = "efficientnet_lite0"
    embedding_dim: int = 512
    pretrained: bool = True
    weights: str | None = None  # local backbone weights instead of a download
    embedding_init: str = "orthogonal"  # orthogonal or pca (PCA of the pretrained pooled features)
    freeze_bn: bool = True  # keep BatchNorm statistics fixed (batches of neighbours are not i.i.d.)
    frozen_stages: int = 0  # freeze the first N backbone stages (training.backbone_stages)


TRAIN_MODES = ("auto", "end_to_end", "head", "tail")


@dataclass
class TrainConfig:
    """Optimisation, sampling and bookkeeping (METHOD.md §1, §6)."""

    method: str = "plm"  # a name of plmetric.methods.REGISTRY: none, plm, stml, supervised
    epochs: int = 90
    batch_size: int = 120
    neighbours_per_seed: int = 5  # k: each seed image brings its k-1 nearest neighbours
    momentum: float = 0.999
    lr_backbone: float = 1e-4
    lr_embedding: float = 1e-3
    lr_proxies: float = 1e-2
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    head_warmup_epochs: float = 0.0  # the backbone's learning rate stays 0 for these first epochs
    grad_clip: float | None = None
    bank_refresh_every: int = 5  # full re-embedding of the training set every N epochs
    eval_every: int = 1
    eval_batch_size: int = 128
    seed: int = 0
    device: str = "auto"
    bf16: bool = True  # autocast on CUDA only
    channels_last: bool = True  # CUDA only
    compile: bool = False  # torch.compile the student's and the teacher's forward
    max_steps_per_epoch: int | None = None  # for quick runs and tests
    min_steps: int = 0  # floor on the run's optimiser steps: a small pile gets more steps an epoch (0: none)
    # what trains (plmetric.training.cached): end_to_end (images, every epoch), head (the embedding layer on
    # pooled features of train.views cached views per image), tail (the stages after model.frozen_stages on
    # cached feature maps), auto (end_to_end on a GPU, head elsewhere)
    mode: str = "end_to_end"
    # what runs the passes without gradient (caching the frozen part, memory bank, evaluation, selection):
    # auto = onnxruntime on a CPU when installed (plmetric.data.runtime), else PyTorch; torch; onnxruntime
    runtime: str = "auto"
    views: int = 5  # cached views per training image (head, tail): the clean view and views - 1 random crops
    teacher_view: str = "same"  # teacher input: same (the student crop), clean (eval transform), other (a 2nd crop)
    keep: str = "student"  # the network evaluated and saved: student, or teacher (its moving average)
    # label-free model selection (plmetric.evaluation.selection): the rule that picks the epoch kept as
    # selected.safetensors, from a fixed subset of the unlabelled training images
    select: str = "mutual_knn"  # final, or a criterion of plmetric.evaluation.selection.CRITERIA (maximised)
    select_images: int = 1000  # training images the criteria are computed on
    select_k: int = 10  # neighbours of the criteria's k-NN graphs


@dataclass
class Config:
    """One training run: the data, the network, each method's options and the optimisation."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    plm: PLMOptions = field(default_factory=PLMOptions)
    stml: STMLOptions = field(default_factory=STMLOptions)
    supervised: SupervisedOptions = field(default_factory=SupervisedOptions)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (JSON/YAML-serialisable)."""
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Raise ValueError for settings that cannot work, before any work starts: the data section,
        the model (with the methods' sections it must fit), then training."""
        self._validate_data()
        self._validate_model()
        self._validate_train()

    def _validate_data(self) -> None:
        from plmetric.data.backbones import EVAL_RESIZE_RULES
        from plmetric.data.datasets import DATASET_NAMES

        d = self.data
        check_choice("data.dataset", d.dataset, DATASET_NAMES)
        check_image_size("data.image_size", d.image_size)
        check_number("data.crop_scale_min", d.crop_scale_min, strict=True)
        if d.crop_scale_min > 1:
            raise ValueError(f"data.crop_scale_min must lie in (0, 1], got {d.crop_scale_min}")
        check_choice("data.eval_resize", d.eval_resize, EVAL_RESIZE_RULES)
        check_int("data.num_workers", d.num_workers, 0, maximum=MAX_WORKERS)
        if d.cache_size is not None:  # the cached shorter side: at most 4x the largest input side
            check_int("data.cache_size", d.cache_size, 1, maximum=4 * IMAGE_SIZE_MAX)
        check_choice("data.pipeline", d.pipeline, ("auto", "pil", "cached"))
        if d.cache_max_bytes is not None:
            from plmetric.data.pipeline import resolve_max_bytes

            try:
                resolve_max_bytes(d.cache_max_bytes)
            except ValueError as err:
                raise ValueError(f"data.cache_max_bytes: {err}") from None

    def _validate_model(self) -> None:
        from plmetric.data.backbones import check_backbone

        mdl, p = self.model, self.plm
        check_backbone(mdl.backbone, "model.backbone")  # a name of BACKBONE_NAMES or timm:NAME
        check_int("model.embedding_dim", mdl.embedding_dim, 0, maximum=MAX_EMBEDDING_DIM)
        if 0 < mdl.embedding_dim <= p.m:
            raise ValueError(f"model.embedding_dim ({mdl.embedding_dim}) must exceed plm.m ({p.m})")
        check_choice("model.embedding_init", mdl.embedding_init, ("orthogonal", "pca"))
        check_int("model.frozen_stages", mdl.frozen_stages, 0, maximum=MAX_FROZEN_STAGES)
        self.plm.validate(where="plm.")
        self.stml.validate(where="stml.")
        self.supervised.validate(where="supervised.")

    def _validate_train(self) -> None:
        t, mdl = self.train, self.model
        maxima = {"epochs": MAX_EPOCHS, "eval_every": MAX_EPOCHS, "bank_refresh_every": MAX_EPOCHS}
        maxima.update(batch_size=MAX_BATCH_SIZE, eval_batch_size=MAX_BATCH_SIZE, neighbours_per_seed=MAX_BATCH_SIZE)
        for name, maximum in maxima.items():
            check_int(f"train.{name}", getattr(t, name), 1, maximum=maximum)
        if t.batch_size % t.neighbours_per_seed:
            raise ValueError(
                f"train.batch_size ({t.batch_size}) must be divisible by train.neighbours_per_seed "
                f"({t.neighbours_per_seed})"
            )
        check_choice("train.method", t.method, method_names())
        check_finite_fields(self)
        if not 0.0 <= t.momentum <= 1.0:
            raise ValueError(f"train.momentum must lie in [0, 1], got {t.momentum}")
        for name in ("lr_backbone", "lr_embedding", "lr_proxies", "weight_decay"):
            check_number(f"train.{name}", getattr(t, name))
        if t.grad_clip is not None:
            check_number("train.grad_clip", t.grad_clip, strict=True)
        if t.head_warmup_epochs < 0 or t.warmup_epochs < 0:
            raise ValueError(
                f"train.warmup_epochs ({t.warmup_epochs}) and train.head_warmup_epochs ({t.head_warmup_epochs}) "
                "must be >= 0"
            )
        check_choice("train.teacher_view", t.teacher_view, ("same", "clean", "other"))
        check_choice("train.keep", t.keep, ("student", "teacher"))
        check_choice("train.mode", t.mode, TRAIN_MODES)
        check_choice("train.runtime", t.runtime, INFERENCE_RUNTIMES)
        check_int("train.views", t.views, 1, maximum=MAX_VIEWS)
        check_int("train.min_steps", t.min_steps, 0, maximum=MAX_STEPS)
        if t.max_steps_per_epoch is not None:
            check_int("train.max_steps_per_epoch", t.max_steps_per_epoch, 1, maximum=MAX_STEPS)
        check_int("train.seed", t.seed, 0, maximum=MAX_TRAIN_SEED)
        if t.mode == "tail" and mdl.frozen_stages < 1:
            raise ValueError(
                "train.mode=tail trains the stages after model.frozen_stages on their cached input: "
                "set model.frozen_stages >= 1"
            )
        if t.mode == "tail" and mdl.backbone.startswith("timm:"):
            raise ValueError(
                f"train.mode=tail cuts a named backbone into its children; model.backbone={mdl.backbone} trains "
                "with train.mode end_to_end or head (model.frozen_stages works in either)"
            )
        from plmetric.evaluation.selection import SELECTION_RULES

        check_choice("train.select", t.select, SELECTION_RULES)
        check_int("train.select_images", t.select_images, 3, maximum=MAX_ITEMS)
        check_int("train.select_k", t.select_k, 1, maximum=MAX_NEIGHBOURS)
        if t.method == "supervised" and t.batch_size % self.supervised.per_class:
            raise ValueError(
                f"train.batch_size ({t.batch_size}) must be divisible by supervised.per_class "
                f"({self.supervised.per_class})"
            )


def check_finite_fields(cfg: Config) -> None:
    """Raise ValueError naming the first float option of any section that holds NaN or ±inf."""
    for sec in dataclasses.fields(cfg):
        section = getattr(cfg, sec.name)
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{sec.name}.{f.name} must be a finite number, got {shown(value)}")


def valid_keys(cfg: Config | None = None) -> list[str]:
    """All dotted keys a config accepts."""
    cfg = cfg or Config()
    return [
        f"{sec.name}.{f.name}" for sec in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, sec.name))
    ]


def _convert(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the field's annotated type."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() in {"none", "null", ""})
        if is_none and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "yes", "1", "on", "false", "no", "0", "off"}:
            return value.lower() in {"true", "yes", "1", "on"}
        raise ValueError(f"{key}: expected true or false, got {shown(str(value))}")
    if annotation in (int, float) and isinstance(value, bool):
        raise ValueError(f"{key}: expected {annotation.__name__}, got {shown(str(value))}")
    if annotation in (int, float, str):
        try:
            if annotation is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            converted = annotation(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: expected {annotation.__name__}, got {shown(str(value))}") from None
        if annotation is float and not math.isfinite(converted):
            raise ValueError(f"{key}: expected a finite number, got {shown(value)}")
        return converted
    return value


def set_value(cfg: Config, key: str, value: Any) -> None:
    """Set a dotted key, converting the value; unknown keys list the valid ones."""
    section, _, name = key.partition(".")
    sec = getattr(cfg, section, None) if section in {f.name for f in dataclasses.fields(cfg)} else None
    fields = {f.name: f for f in dataclasses.fields(sec)} if sec is not None else {}
    if name not in fields:
        import difflib

        keys = valid_keys(cfg)
        close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ValueError(f"unknown config key '{_one_line_text(key)}'; {hint}valid keys: {', '.join(keys)}")
    setattr(sec, name, _convert(value, typing.get_type_hints(type(sec))[name], key))


def from_dict(data: dict[str, Any], base: Config | None = None, source: str = "config") -> Config:
    """Build a config from a nested dict (as read from YAML) over ``base`` or the defaults."""
    cfg = base or Config()
    if not isinstance(data, dict):
        sections = ", ".join(f.name for f in dataclasses.fields(cfg))
        raise ValueError(f"{source}: expected a mapping of sections ({sections})")
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ValueError(
                f"{source}: section '{section}' must be a mapping; valid keys: {', '.join(valid_keys(cfg))}"
            )
        for name, value in values.items():
            set_value(cfg, f"{section}.{name}", value)
    return cfg


PRESET_SUFFIX = ".yaml"
MAX_CONFIG_BYTES = 1 << 20  # a config is a few kB; a larger file (or --set value) is not one
STRING_TAG = "tag:yaml.org,2002:str"


def preset_names() -> tuple[str, ...]:
    """The names of the presets shipped in ``plmetric/config/presets/`` (sorted)."""
    folder = importlib.resources.files(__package__) / "presets"
    return tuple(sorted(p.name[: -len(PRESET_SUFFIX)] for p in folder.iterdir() if p.name.endswith(PRESET_SUFFIX)))


def is_preset_name(value: str | os.PathLike) -> bool:
    """True for a bare name (no folder, no ``.yaml``/``.yml``): ``--config cub200`` names a preset."""
    text = os.fspath(value)
    return bool(text) and os.sep not in text and "/" not in text and not text.endswith((".yaml", ".yml"))


def read_config_source(source: str | os.PathLike) -> tuple[str, str]:
    """The YAML text of a preset name or a config file, and how to name it in messages.

    A bare name (:func:`is_preset_name`) is a preset; if no preset has that name, an existing file of
    that name is read; anything else is a file path.

    Raises:
        FileNotFoundError: neither a preset nor a file (the message lists the presets).
        ValueError: the file is not UTF-8 text.
    """
    if is_preset_name(source):
        name = os.fspath(source)
        if name in preset_names():
            resource = importlib.resources.files(__package__) / "presets" / f"{name}{PRESET_SUFFIX}"
            return resource.read_text(encoding="utf-8"), f"preset {name}"
        if not Path(name).is_file():
            raise FileNotFoundError(
                f"config '{name}' is neither a preset ({', '.join(preset_names())}) nor a file"
            )
    path = Path(source)
    require_regular_file(path, "config file")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"config file {path}: {size:,} bytes; a config holds at most {MAX_CONFIG_BYTES:,}")
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except UnicodeDecodeError as err:
        raise ValueError(f"config file {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def load_config(source: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Read a preset (by name, e.g. ``"cub200"``) or a YAML file, or start from the defaults; then
    apply ``key=value`` overrides and check the result."""
    cfg = Config()
    if source is not None:
        text, where = read_config_source(source)
        data = parse_yaml(text, f"config file {where}")
        cfg = from_dict(data or {}, cfg, source=where)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set '{_one_line_text(item)}' must look like key=value (e.g. train.epochs=30)")
        parsed = parse_yaml(value, f"--set {_one_line_text(key.strip())}") if value.strip() else None
        set_value(cfg, key.strip(), parsed)
    cfg.validate()
    return cfg


class RefusedYAMLError(yaml.MarkedYAMLError):
    """YAML that is valid but not accepted in a config: an anchor or alias, or a key that is not a string."""


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's ``SafeLoader`` for configs: plain trees of scalars, lists and string-keyed mappings.

    Refused (:class:`RefusedYAMLError`, with the line and column): anchors and aliases (``&a``,
    ``*a``, so no "billion laughs" expansion and no shared sub-trees), merge keys (``<<``), mapping
    keys that are not strings (``1: x``, ``null: x``, ``[a]: b``), a key given twice, and lists or
    mappings nested deeper than :data:`plmetric.core.validation.MAX_NESTING_DEPTH` (refused as the
    composer, which recurses once per level, reaches the first one too deep: never a RecursionError).
    """

    _depth = 0  # lists and mappings open around the node being composed

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:  # noqa: D102
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise RefusedYAMLError(
                None, None, f"aliases (*{event.anchor}) are not allowed in a config", event.start_mark
            )
        if getattr(event, "anchor", None) is not None:
            raise RefusedYAMLError(
                None, None, f"anchors (&{event.anchor}) are not allowed in a config", event.start_mark
            )
        if not isinstance(event, yaml.CollectionStartEvent):
            return super().compose_node(parent, index)
        if self._depth >= MAX_NESTING_DEPTH:
            raise RefusedYAMLError(
                None,
                None,
                f"lists and mappings nested deeper than {MAX_NESTING_DEPTH} levels are not allowed in a config",
                event.start_mark,
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:  # noqa: D102
        seen: set[str] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != STRING_TAG:
                scalar = isinstance(key_node, yaml.ScalarNode)
                got = repr(_one_line_text(key_node.value)) if scalar else f"a {key_node.id}"
                raise RefusedYAMLError(None, None, f"keys must be strings, got {got}", key_node.start_mark)
            if key_node.value in seen:
                raise RefusedYAMLError(None, None, f"key {key_node.value!r} is given twice", key_node.start_mark)
            seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, where: str) -> Any:
    """The data of a config's YAML text, read with :class:`ConfigLoader` (the one YAML reader of configs).

    Raises:
        ValueError: not valid YAML, or YAML a config refuses; one line naming ``where`` and the
            line and column.
    """
    if len(text) > MAX_CONFIG_BYTES:
        raise ValueError(f"{where}: {len(text):,} characters; a config holds at most {MAX_CONFIG_BYTES:,} bytes")
    try:
        return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 (a SafeLoader subclass)
    except RefusedYAMLError as err:
        raise ValueError(f"{where}: {_yaml_problem(err)}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{where}: not valid YAML ({_yaml_problem(err)})") from None
    except ValueError as err:  # a scalar PyYAML cannot convert, e.g. an integer over Python's 4,300 digits
        raise ValueError(f"{where}: {_one_line_text(str(err), 200)}") from None


def _one_line_text(text: str, width: int = 60) -> str:
    """``text`` on one line (newlines as ``\\n``), at most ``width`` characters."""
    flat = text.replace("\r", "\\r").replace("\n", "\\n")
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line from a YAML error: the problem and its line/column."""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(problem)


class _PlainDumper(yaml.SafeDumper):
    """``SafeDumper`` that never writes anchors or aliases (:class:`ConfigLoader` refuses them)."""

    def ignore_aliases(self, data: Any) -> bool:  # noqa: D102
        return True


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (no anchors or aliases), atomically."""
    from plmetric.core.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, yaml.dump(cfg.to_dict(), Dumper=_PlainDumper, sort_keys=False).encode())
