"""Export a checkpoint's embedding model to ONNX or TorchScript, its preprocessing recorded inside.

The exported model is what ``plmetric embed`` and ``plmetric index`` run
(:func:`plmetric.retrieval.index.load_embedding_model`): backbone, GAP + GMP pooling, the embedding layer
and L2 normalisation. Input ``images``: float32 ``(batch, 3, S, S)`` (NCHW, dynamic batch) after
the preprocessing of :func:`plmetric.data.backbones.build_transform`; output ``embeddings``: float32
``(batch, D)`` with unit rows, exactly as ``embed`` writes them.

The metadata (:func:`export_metadata`) names the backbone, image size, the exact preprocessing rule
(resize with its rounding, filter and antialiasing, crop offsets, scaling, mean/std, channel order
and layout: enough to reproduce the input bit for bit with Pillow and NumPy), the dimensions, the
checkpoint's SHA-256 and the plmetric version. It is stored in the model (ONNX:
``metadata_props``, every top-level field as a string plus the whole JSON under
:data:`METADATA_KEY`; TorchScript: the extra file :data:`EXTRA_FILE`) and in a sidecar
``FILE.json`` that also holds the exported file's SHA-256. Before writing, the exported model is
run on a probe batch and compared with PyTorch's output.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from plmetric.core.checkpoint import atomic_write_bytes, atomic_write_json, file_sha256
from plmetric.data.backbones import fixed_size_model
from plmetric.retrieval.index import load_embedding_model

FORMATS: dict[str, tuple[str, ...]] = {"onnx": (".onnx",), "torchscript": (".pt", ".torchscript")}
EXPORT_FORMAT = "plmetric-export"
EXPORT_VERSION = 1
METADATA_KEY = "plmetric_export"  # ONNX metadata_props key of the whole JSON document
EXTRA_FILE = "plmetric.json"  # TorchScript _extra_files name
INPUT_NAME, OUTPUT_NAME = "images", "embeddings"
ONNX_OPSET = 17
INSTALL_HINT = 'pip install "plmetric[export]"'
TRACE_BATCH, PROBE_BATCH = 2, 3  # the probe batch differs from the traced one: the batch axis is dynamic
# Largest |exported - PyTorch| accepted on the probe batch (unit-norm rows: entries lie in [-1, 1]).
# ONNX Runtime uses its own kernels (and folds BatchNorm into the convolutions), so float32 sums are
# reordered: a sum of n terms differs by about sqrt(n)·2^-24 relative, ≤ 4e-6 for n ≤ 4608 (ResNet-50's
# 3×3×512); over ~50 layers that is ~3e-5 when the layers' errors are independent, 1e-4 leaves room.
# TorchScript runs PyTorch's own kernels on the same batch: 1e-5 (0 seen).
TOLERANCE = {"onnx": 1e-4, "torchscript": 1e-5}


class ExportDependencyError(ImportError):
    """onnx or onnxruntime, needed for ``--format onnx``, is not installed."""


def sidecar_path(out: str | os.PathLike) -> Path:
    """The JSON beside an exported file: ``model.onnx`` -> ``model.onnx.json``."""
    out = Path(out)
    return out.with_name(out.name + ".json")


def require_backend(fmt: str) -> None:
    """Check that the packages ``fmt`` needs are importable.

    Raises:
        ValueError: unknown format.
        ExportDependencyError: onnx/onnxruntime missing (the message says how to install them).
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError as err:
            raise ExportDependencyError(
                f"--format onnx needs the onnx and onnxruntime packages ({err.name or err} is missing): {INSTALL_HINT}"
            ) from None


def read_sidecar(path: str | os.PathLike) -> dict[str, Any] | None:
    """The sidecar JSON written by :func:`export_model`, or None when ``path`` is some other file."""
    try:
        meta = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # RecursionError: JSON nested too deeply to decode
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == EXPORT_FORMAT else None


def is_export(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a model file this command wrote (its sidecar records its SHA-256): one
    ``plmetric export`` may replace."""
    meta = read_sidecar(sidecar_path(path))
    return meta is not None and meta.get("file_sha256") == file_sha256(path)


_PIL_FILTERS = {"bilinear": "Image.Resampling.BILINEAR", "bicubic": "Image.Resampling.BICUBIC"}


def preprocessing_rule(prep: dict[str, Any], size: int) -> dict[str, Any]:
    """The exact eval preprocessing of :func:`plmetric.data.backbones.build_transform` as data and words,
    for the checkpoint's rule (``eval_resize``, :data:`plmetric.data.backbones.EVAL_RESIZE_RULES`).

    The rule (torchvision's ``Resize`` + ``CenterCrop`` on PIL images, then ``ToTensor`` +
    ``Normalize``): decode to 8-bit RGB; ``center_crop``: resize the shorter side to ``R`` and the longer
    one to ``int(R * long / short)`` (truncated, evaluated in double precision; a square image counts its
    width as the shorter side) with Pillow's antialiased filter (``Image.resize``; skipped when the
    size is already right); crop ``S x S`` at ``top = int(round((h - S) / 2.0))``, ``left =
    int(round((w - S) / 2.0))`` (Python's ``round``: halves to even); ``whole`` (``Resize((S, S))``):
    resize the whole image to ``S x S`` with that filter (the aspect ratio not kept), no crop; then
    ``x = pixel / 255`` and ``(x - mean) / std`` per channel in float32; RGB, CHW, batched as NCHW.

    Args:
        prep: :func:`plmetric.retrieval.index.preprocessing`'s fields (resize_shorter_side and
            center_crop, or resize "whole" and resize_to; interpolation, mean, std).
        size: the input side ``S``.
    """
    interpolation = str(prep["interpolation"])
    mean, std = [float(v) for v in prep["mean"]], [float(v) for v in prep["std"]]
    signed_unit = all(v == 0.5 for v in (*mean, *std))
    scaling = "[-1, 1] scaling" if signed_unit else "per-channel standardisation"
    whole = prep.get("resize") == "whole"
    geometry, words = (_whole_steps if whole else _crop_steps)(prep, size, interpolation)
    return {
        **prep,
        "eval_resize": "whole" if whole else "center_crop",
        "decode": "the upright image (input_orientation) as 8-bit RGB (Pillow's Image.convert('RGB') for 8-bit "
        "modes), then the steps below in order",
        **geometry,
        "scaling": f"x = pixel / 255 in float32 (values in [0, 1]), then (x - mean) / std per channel: {scaling}",
        "channel_order": "RGB",
        "layout": "CHW per image, stacked to NCHW float32",
        "rule": (
            f"decode to upright 8-bit RGB; {words}; x = pixel / 255; "
            f"(x - mean) / std per channel with mean={mean}, std={std}; RGB channels, NCHW float32"
        ),
    }


def _crop_steps(prep: dict[str, Any], size: int, interpolation: str) -> tuple[dict[str, Any], str]:
    """The ``resize`` and ``crop`` steps of the ``center_crop`` rule, as data and in words."""
    shorter = int(prep["resize_shorter_side"])
    steps = {
        "resize": {
            "side": "shorter",
            "shorter_side": shorter,
            "longer_side": "int(shorter_side * long / short), truncated toward zero (torchvision Resize); "
            "for a square image (w == h) both sides become shorter_side",
            "interpolation": interpolation,
            "antialias": True,
            "pillow": f"image.resize((new_w, new_h), {_PIL_FILTERS.get(interpolation, interpolation)}); "
            "not applied when (new_w, new_h) equals the image's size",
        },
        "crop": {
            "size": int(size),
            "top": "int(round((new_h - size) / 2.0))",
            "left": "int(round((new_w - size) / 2.0))",
            "rounding": "Python round(): halves to even, e.g. round(4.5) == 4",
        },
    }
    words = (
        f"resize so the shorter side is {shorter} and the longer int({shorter} * long / short) (truncated) with "
        f"Pillow's antialiased {interpolation} filter; crop {size}x{size} at top=int(round((h - {size}) / 2.0)), "
        f"left=int(round((w - {size}) / 2.0))"
    )
    return steps, words


def _whole_steps(prep: dict[str, Any], size: int, interpolation: str) -> tuple[dict[str, Any], str]:
    """The ``resize`` step of the ``whole`` rule (nothing cropped), as data and in words."""
    steps = {
        "resize": {
            "side": "whole",
            "width": int(size),
            "height": int(size),
            "aspect_ratio": "not kept: the whole image is stretched to width x height (torchvision Resize((S, S)))",
            "interpolation": interpolation,
            "antialias": True,
            "pillow": f"image.resize(({int(size)}, {int(size)}), {_PIL_FILTERS.get(interpolation, interpolation)}); "
            "not applied when the image already has that size",
        },
        "crop": None,
    }
    words = (
        f"resize the whole image to {size}x{size} (the aspect ratio not kept) with Pillow's antialiased "
        f"{interpolation} filter; no crop"
    )
    return steps, words


def export_metadata(description: dict[str, Any], fmt: str) -> dict[str, Any]:
    """The exported model's metadata, from a :func:`plmetric.retrieval.index.load_embedding_model` description.

    ``preprocessing`` holds the exact rule (:func:`preprocessing_rule`).
    """
    from plmetric import __version__

    size, dim = int(description["image_size"]), int(description["output_dim"])
    prep = preprocessing_rule(dict(description["preprocessing"]), size)
    meta: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "model_format": fmt,
        "plmetric_version": __version__,
        "torch_version": torch.__version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "checkpoint": Path(description["checkpoint"]).name,
        "checkpoint_sha256": description["checkpoint_sha256"],
        "backbone": description["backbone"],
        "embedding_dim": int(description["embedding_dim"]),
        "output_dim": dim,
        "image_size": size,
        "preprocessing": prep,
        "input_orientation": "upright: apply the EXIF Orientation tag before preprocessing (Pillow's "
        "ImageOps.exif_transpose), as every plmetric command does (plmetric.data.images.open_image)",
        "input": {"name": INPUT_NAME, "dtype": "float32", "layout": "NCHW", "shape": ["batch", 3, size, size]},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", dim], "l2_normalized": True},
    }
    if fmt == "onnx":
        meta["onnx_opset"] = ONNX_OPSET
    return meta


def probe_batch(description: dict[str, Any], batch: int = PROBE_BATCH) -> torch.Tensor:
    """``batch`` seeded random-noise images of odd sizes (larger and smaller than the input, both
    orientations) preprocessed by the checkpoint's own rule (:func:`plmetric.data.backbones.description_transform`):
    the check compares the exported model with PyTorch on inputs as ``embed`` makes them.

    Raises:
        RuntimeError: the preprocessing the export records (``description["preprocessing"]``, followed
            with Pillow and NumPy by :func:`plmetric.data.preprocess.eval_input`) does not give the
            transform's input bit for bit.
    """
    import numpy as np
    from PIL import Image

    from plmetric.data.backbones import description_transform
    from plmetric.data.preprocess import EvalPreprocessing, eval_input

    size = int(description["image_size"])
    transform = description_transform(description)
    recorded = EvalPreprocessing.from_record(description["preprocessing"], size)
    rng = np.random.default_rng(0)
    sides = [(2 * size + 1, size + 7), (size + 3, 2 * size - 1), (size // 2 + 1, size // 2 + 4)]
    inputs = []
    for n in range(batch):
        width, height = sides[n % len(sides)]
        image = Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
        x = transform(image)
        if not np.array_equal(eval_input(image, recorded), x.numpy()):
            raise RuntimeError(f"the recorded preprocessing is not the eval transform on a {width}x{height} image")
        inputs.append(x)
    return torch.stack(inputs)


def onnx_bytes(model: torch.nn.Module, example: torch.Tensor, metadata: dict[str, Any]) -> bytes:
    """Serialise ``model`` as ONNX (opset :data:`ONNX_OPSET`, dynamic batch) with ``metadata`` in metadata_props."""
    import onnx

    # The TorchScript-based exporter (dynamo=False): it needs no onnxscript (the dynamo exporter's extra
    # dependency), marks the batch axis dynamic with dynamic_axes, and traces these convolutional models
    # (no data-dependent control flow) exactly; torch 2.14 still ships it, with a DeprecationWarning.
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation notice and tracer warnings about shape arithmetic
        torch.onnx.export(
            model,
            (example,),
            buffer,
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=ONNX_OPSET,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    props = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    props[METADATA_KEY] = json.dumps(metadata)
    onnx.helper.set_model_props(proto, props)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def torchscript_bytes(model: torch.nn.Module, example: torch.Tensor, metadata: dict[str, Any]) -> bytes:
    """Serialise ``model`` as a traced TorchScript archive with ``metadata`` as the extra file :data:`EXTRA_FILE`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice and tracer warnings
        traced = torch.jit.trace(model, (example,), check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files={EXTRA_FILE: json.dumps(metadata)})
    return buffer.getvalue()


def run_exported(data: bytes, fmt: str, images: torch.Tensor) -> torch.Tensor:
    """Run serialised model bytes of format ``fmt`` on ``images`` (CPU): the embeddings."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(io.BytesIO(data), map_location="cpu")
    with torch.no_grad():
        return loaded(images)


def export_model(
    checkpoint: str | os.PathLike, out: str | os.PathLike, fmt: str, image_size: int = 224
) -> dict[str, Any]:
    """Export a checkpoint's embedding model to ``out`` (and ``out.json``), atomically.

    Args:
        checkpoint: a ``.safetensors`` model written by ``plmetric train`` (it names its backbone,
            dimensions and image size).
        out: the exported file; the caller has checked its name (``plmetric.cli.common.check_output``).
        fmt: ``onnx`` or ``torchscript``.
        image_size: input side when the checkpoint records none.

    Returns:
        The sidecar's content: :func:`export_metadata` plus ``check`` (probe batch, max abs
        difference) and ``file``/``file_sha256``.

    Raises:
        FileNotFoundError, ValueError: missing or unreadable checkpoint, unknown format.
        ExportDependencyError: onnx/onnxruntime missing.
        RuntimeError: the exported model disagrees with PyTorch on the probe batch.
    """
    require_backend(fmt)
    if not checkpoint:
        raise ValueError("export needs a checkpoint: a random embedding layer is never exported")
    # with a checkpoint its own metadata names the backbone and dimensions: the two are ignored
    model, description = load_embedding_model(checkpoint, backbone="", embedding_dim=0, image_size=image_size)
    model = model.cpu().eval()
    metadata = export_metadata(description, fmt)
    probe = probe_batch(description)
    # a timm ViT that resamples its position embedding per input size is traced as a fixed-size copy
    # (ONNX has no antialiased bicubic resize); the probe check compares it with the model itself
    traced = fixed_size_model(model, int(description["image_size"]))
    with torch.no_grad():
        expected = model(probe)
        example = probe[:TRACE_BATCH]
        data = (onnx_bytes if fmt == "onnx" else torchscript_bytes)(traced, example, metadata)
    diff = float((run_exported(data, fmt, probe) - expected).abs().max())
    if not diff <= TOLERANCE[fmt]:
        raise RuntimeError(
            f"the exported {fmt} model differs from PyTorch by {diff:.2e} (> {TOLERANCE[fmt]:.0e}) on a probe "
            f"batch of {PROBE_BATCH}: nothing written to {out}"
        )
    out = Path(out)
    atomic_write_bytes(out, data)
    inputs = f"random-noise images of odd sizes preprocessed by the {metadata['preprocessing']['eval_resize']} rule"
    sidecar = {**metadata, "check": {"batch": PROBE_BATCH, "max_abs_diff": diff, "inputs": inputs}}
    sidecar.update(file=out.name, file_sha256=file_sha256(out))
    atomic_write_json(sidecar_path(out), sidecar)
    return sidecar


def read_export_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata stored inside an exported file (ONNX metadata_props or the TorchScript extra file).

    Reads TorchScript archives as zip files: no code is loaded.

    Raises:
        ValueError: ``path`` holds no plmetric export metadata.
    """
    import zipfile

    path = Path(path)
    raw = None
    if path.suffix == ".onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        raw = props.get(METADATA_KEY)
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith(f"/extra/{EXTRA_FILE}")), None)
            raw = archive.read(name).decode() if name else None
    if raw is None:
        raise ValueError(f"{path} holds no plmetric export metadata")
    return json.loads(raw)
