"""Inference without gradients through the fastest CPU runtime: ONNX Runtime, or PyTorch.

Every forward pass that needs no gradient (``embed``, ``index``, ``search`` queries, ``serve``
uploads, the frozen part's caching in ``train.mode=head|tail``, the studies' caches, the evaluation
passes) goes through :func:`inference_model`. On a CPU, ONNX Runtime runs the same network several
times faster than PyTorch's eager kernels (EfficientNet-Lite0 at 224 px on two cores: about 5x, see
``benchmarks/inference_speed.py``): it folds BatchNorm into the convolutions, fuses the activations
and picks blocked convolution kernels for the machine.

``runtime``: ``torch`` runs the module itself; ``onnxruntime`` exports it to ONNX (the TorchScript
tracer, opset :data:`ONNX_OPSET`, dynamic batch) and runs an ``InferenceSession`` on the CPU;
``auto`` is ``onnxruntime`` on a CPU device when onnxruntime is installed and the module exports
and checks, else ``torch`` with one line saying why.

Cache: the exported model is written once to ``<cache>/onnx/<key>.onnx`` (:func:`cache_dir`:
``$PLMETRIC_CACHE``, else ``$XDG_CACHE_HOME/plmetric``, else ``~/.cache/plmetric``), where ``key``
is the SHA-256 of everything the graph depends on: every parameter and buffer (names, dtypes,
shapes, bytes), the module's structure (``repr``), the input shape, and the versions of plmetric,
torch and onnxruntime. A checkpoint met again therefore loads its session in well under a second
instead of being exported again (about 2 s for Lite0); a changed weight, another input size or an
upgraded runtime makes a new key. Modules that change every epoch (training's evaluation passes)
are exported in memory only (``cache=False``).

Check: before a session is used for the first time, it and the module run a probe batch and must
agree within :func:`tolerance` (float32 rounding through the network; see there); otherwise
``auto`` falls back to PyTorch with one line and ``onnxruntime`` is an error.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from plmetric.core.checkpoint import atomic_write_bytes, atomic_write_json
from plmetric.core.names import shown
from plmetric.core.options import INFERENCE_RUNTIMES
from plmetric.core.runtime_cache import CACHE_ENV, INPUT_NAME, OUTPUT_NAME, cache_dir, entry_files, read_check

__all__ = [
    "ONNX_OPSET",
    "RUNTIMES",
    "OrtModule",
    "RuntimeUnavailableError",
    "cache_dir",
    "inference_model",
    "model_key",
    "onnxruntime_version",
    "runtime_of",
    "tolerance",
]

RUNTIMES = INFERENCE_RUNTIMES
ONNX_OPSET = 17
# Rows per session.run: on two cores EfficientNet-Lite0 at 224 px ran about 40 images/s in runs of 8 and
# 23-27 in runs of 32-64 (larger activations fall out of the caches); benchmarks/inference_speed.py measures it.
ORT_ROWS_PER_RUN = 8
PROBE_ROWS = 3
# Relative accuracy of float32 inference through a network: a dot product of n terms computed in another
# order differs by at most about sqrt(n) * 2^-24 relative (random-walk rounding; n <= 4608 for ResNet-50's
# 3x3x512: <= 4e-6), and BatchNorm folded into the convolution weights adds one rounding per weight. Over
# the ~50 layers of these networks the per-layer errors add up: at most L * 4e-6 = 2e-4 if all had the same
# sign, about sqrt(L) * 4e-6 = 3e-5 when independent. 1e-4 of the output's scale (its largest |value|,
# at least 1) sits between the two: the observed maximum is recorded beside it (OrtModule.check_error).
RELATIVE_TOLERANCE = 1e-4


class RuntimeUnavailableError(ValueError):
    """``--runtime onnxruntime`` was asked for and cannot be used (not installed, not a CPU, export failed)."""


def tolerance(reference: Tensor) -> float:
    """The largest ``|onnxruntime - torch|`` accepted for outputs ``reference`` (float32 rounding):
    ``RELATIVE_TOLERANCE * max(1, max |reference|)``."""
    scale = float(reference.detach().abs().max()) if reference.numel() else 0.0
    return RELATIVE_TOLERANCE * max(1.0, scale)


def onnxruntime_version() -> str | None:
    """The installed onnxruntime's version, or None when it is missing (nothing else is imported)."""
    from importlib import metadata

    for name in ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def model_key(module: nn.Module, input_shape: tuple[int, ...]) -> str:
    """SHA-256 (hex) of what an exported graph of ``module`` on inputs ``(batch, *input_shape)`` depends on:
    every parameter and buffer (name, dtype, shape, bytes), ``repr(module)``, the input shape and the
    versions of plmetric, torch and onnxruntime."""
    from plmetric import __version__

    digest = hashlib.sha256()
    header = {
        "format": "plmetric-onnx-cache",
        "opset": ONNX_OPSET,
        "plmetric": __version__,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime_version(),
        "input_shape": [int(s) for s in input_shape],
        "module": type(module).__qualname__,
        "structure": repr(module),
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"\n{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _export_onnx(module: nn.Module, example: Tensor) -> bytes:
    """``module`` traced on ``example`` as ONNX bytes (batch axis dynamic)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice, tracer warnings
        torch.onnx.export(
            module,
            (example,),
            buffer,
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=ONNX_OPSET,
        )
    return buffer.getvalue()


def _session(model: bytes | str) -> Any:
    """An onnxruntime CPU session using as many threads as torch would (``OMP_NUM_THREADS`` honoured)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: no per-node placement notes on stderr
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])


class OrtModule(nn.Module):
    """An ONNX Runtime session behind the call shape of the module it was exported from.

    ``forward(x)`` takes a float32 CPU tensor ``(B, *input_shape)`` and returns the module's output as a
    float32 tensor, in runs of at most :data:`ORT_ROWS_PER_RUN` rows. It has no parameters and no
    gradient; ``embedding_dim`` is copied from the source module when it has one.

    Attributes:
        input_shape: the traced input shape without the batch axis.
        check_error: ``max |onnxruntime - torch|`` on the probe batch; ``check_bound``: the bound it met.
        key: the cache key (:func:`model_key`); ``cache_file``: the cached ``.onnx`` (None: in memory).
    """

    runtime = "onnxruntime"

    def __init__(self, session: Any, input_shape: tuple[int, ...], source: nn.Module, key: str,
                 cache_file: Path | None) -> None:
        super().__init__()
        self.session = session
        self.input_shape = tuple(int(s) for s in input_shape)
        self.key, self.cache_file = key, cache_file
        self.check_error, self.check_bound = float("nan"), float("nan")
        if hasattr(source, "embedding_dim"):
            self.embedding_dim = source.embedding_dim
        self.train(False)

    def train(self, mode: bool = True) -> OrtModule:
        """Always in inference mode: the session has no training behaviour (the call is accepted)."""
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"the onnxruntime model was exported for inputs (batch, {', '.join(map(str, self.input_shape))}), "
                f"got {tuple(x.shape)}"
            )
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        outputs = [
            self.session.run([OUTPUT_NAME], {INPUT_NAME: array[start : start + ORT_ROWS_PER_RUN]})[0]
            for start in range(0, len(array), ORT_ROWS_PER_RUN)
        ]
        if not outputs:
            shape = self.session.get_outputs()[0].shape[1:]
            return torch.empty(0, *[int(s) for s in shape])
        return torch.from_numpy(outputs[0] if len(outputs) == 1 else np.concatenate(outputs))


def _probe(input_shape: tuple[int, ...]) -> Tensor:
    """A fixed probe batch: standard-normal values (what normalised pixels look like), seed 0."""
    return torch.randn(PROBE_ROWS, *input_shape, generator=torch.Generator().manual_seed(0))


def _say(line: str) -> None:
    print(f"plmetric: {shown(line)}", file=sys.stderr, flush=True)


def inference_model(
    module: nn.Module,
    input_shape: tuple[int, ...],
    runtime: str = "auto",
    device: str | torch.device = "cpu",
    *,
    cache: bool = True,
    what: str = "the network",
) -> nn.Module:
    """``module`` (in eval mode) as the fastest runtime that gives the same numbers.

    Args:
        module: a network without data-dependent control flow, inputs ``(B, *input_shape)`` float32.
        input_shape: the input's shape without the batch axis (fixed: images of one size).
        runtime: ``auto`` | ``torch`` | ``onnxruntime`` (see the module docstring).
        device: where the pass runs; onnxruntime is used on a CPU only.
        cache: keep the exported model on disk under :func:`cache_dir` (False: export in memory).
        what: names the network in the one line printed on a fallback.

    Returns:
        ``module`` itself (PyTorch) or an :class:`OrtModule`; the runtime used is its ``runtime``
        attribute for an OrtModule, else ``torch`` (:func:`runtime_of`).

    Raises:
        RuntimeUnavailableError: ``runtime="onnxruntime"`` when it cannot be used (the message says why).
        ValueError: an unknown ``runtime``.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if isinstance(module, OrtModule):
        return module  # already the runtime's model
    module.eval()
    if runtime == "torch":
        return module
    explicit = runtime == "onnxruntime"
    if torch.device(device).type != "cpu":
        if explicit:
            raise RuntimeUnavailableError(
                f"--runtime onnxruntime runs on the CPU; with --device {device} use --runtime torch or auto"
            )
        return module
    if onnxruntime_version() is None:
        reason = "onnxruntime is not installed (pip install onnxruntime)"
        if explicit:
            raise RuntimeUnavailableError(f"--runtime onnxruntime: {reason}")
        _say(f"{reason}: running {what} with PyTorch, several times slower on a CPU")
        return module
    try:
        return _ort_module(module, tuple(int(s) for s in input_shape), cache)
    except Exception as err:  # noqa: BLE001 - any failure to export or check: PyTorch computes the same function
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if explicit:
            raise RuntimeUnavailableError(f"--runtime onnxruntime: {what} could not be run by onnxruntime: {reason}") from err
        _say(f"{what} could not be run by onnxruntime ({reason[:200]}): running it with PyTorch")
        return module


def runtime_of(module: nn.Module) -> str:
    """The runtime a module returned by :func:`inference_model` runs on: ``onnxruntime`` or ``torch``."""
    return OrtModule.runtime if isinstance(module, OrtModule) else "torch"


def _cached_session(path: Path) -> tuple[Any, dict[str, Any]] | None:
    """The session of a cached export and its recorded check, or None (missing, damaged or unchecked)."""
    check = read_check(path.with_suffix(".json")) if path.is_file() else None
    if check is None:
        return None
    try:
        return _session(str(path)), check
    except Exception:  # noqa: BLE001 - a damaged cache entry is exported again
        return None


def _ort_module(module: nn.Module, input_shape: tuple[int, ...], cache: bool) -> OrtModule:
    """The cached export of ``module`` (checked when it was written), or a new export checked on a probe
    batch against ``module`` and then cached (the ``.onnx`` and a ``.json`` with the check's result)."""
    module = module.cpu()
    key = model_key(module, input_shape)
    path = entry_files(key)[0] if cache else None
    hit = _cached_session(path) if path is not None else None
    if hit is not None:
        out = OrtModule(hit[0], input_shape, module, key, path)
        out.check_error, out.check_bound = float(hit[1]["error"]), float(hit[1]["bound"])
        return out
    probe = _probe(input_shape)
    with torch.no_grad():
        data = _export_onnx(module, probe[:2])
        expected = module(probe).float()
    out = OrtModule(_session(data), input_shape, module, key, None)
    got = out(probe)
    bound = tolerance(expected)
    error = float((got - expected).abs().max()) if got.shape == expected.shape else float("inf")
    if not error <= bound:  # also NaN
        raise RuntimeError(f"onnxruntime differs from PyTorch by {error:.2e} (> {bound:.1e}) on a probe batch")
    out.check_error, out.check_bound = error, bound
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, data)
            atomic_write_json(path.with_suffix(".json"), {"error": error, "bound": bound, "input_shape": list(input_shape)})
            out.cache_file = path
        except OSError as err:  # a read-only home: the session works, it is only exported again next time
            _say(f"could not cache the onnxruntime model in {path.parent} ({err.strerror or err}); set {CACHE_ENV}")
    return out
