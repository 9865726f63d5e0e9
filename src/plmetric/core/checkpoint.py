"""Safe, atomic persistence: embedding-model checkpoints (safetensors + JSON) and result files.

A model checkpoint is one ``.safetensors`` file whose header metadata holds a JSON document
(backbone, dimensions, image size, the run's config, the git revision), plus a readable copy of
that JSON beside it. Loading never executes code: safetensors only stores tensors.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError

from plmetric.core.files import require_regular_file

if TYPE_CHECKING:  # torch is imported by the functions that store tensors: the file helpers stay torch-free
    import torch

METADATA_KEY = "plmetric"
FORMAT_VERSION = 1


TEMP_SUFFIX = ".tmp"


def temporary_path(path: Path) -> Path:
    """A fresh temporary file ``.NAME.XXXX.tmp`` beside ``path`` (created empty, usual permissions).

    :func:`remove_stale_temporaries` recognises these names after a crash.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, file_mode())  # mkstemp creates 0600; give the file the usual permissions
    return Path(tmp)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that an interrupted atomic write left in ``folder``; return them."""
    removed = []
    for tmp in Path(folder).glob(f".*{TEMP_SUFFIX}"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def file_mode() -> int:
    """The permissions a new file gets from the umask (0644 under the usual umask 022)."""
    return 0o666 & ~_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder, then rename.

    A crash mid-write leaves the previous file (if any) intact, and a temporary file that
    :func:`remove_stale_temporaries` removes.
    """
    from plmetric.core import faults
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as handle:
            half = len(data) // 2
            handle.write(data[:half])
            handle.flush()
            faults.reached(f"write:{path.name}")
            handle.write(data[half:])
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_figure(fig: Any, path: str | os.PathLike, dpi: int = 100, software: str | None = None) -> Path:
    """Render a matplotlib figure as PNG, write it atomically and close the figure. ``software`` is
    written as the PNG's ``Software`` text (how a command recognises a grid it may replace)."""
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": software} if software else None)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def git_revision() -> str | None:
    """The git commit of the checkout this package runs from, or None when it is installed (a wheel).

    Asked of the package's own folder, and believed only when that folder is the checkout's
    ``src/plmetric``: a wheel installed in a virtual environment inside some other repository
    must not record that repository's commit.
    """
    package = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "-C", str(package), "rev-parse", "--show-toplevel", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split()
    if len(lines) != 2 or (Path(lines[0]) / "src" / "plmetric").resolve() != package:
        return None
    return lines[1]


def save_model(path: str | os.PathLike, model: torch.nn.Module, metadata: dict[str, Any]) -> Path:
    """Save an embedding model's weights as safetensors with its metadata, atomically.

    Args:
        path: Target ``.safetensors`` file; a ``.json`` copy of the metadata is written beside it.
        model: The model (``EmbeddingModel``); its ``state_dict`` is stored.
        metadata: JSON-serialisable description; must hold ``backbone`` and ``embedding_dim``.

    Returns:
        The path written.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"checkpoint path must end in .safetensors, got {path}")
    for key in ("backbone", "embedding_dim"):
        if key not in metadata:
            raise ValueError(f"checkpoint metadata needs '{key}'")
    meta = {"format_version": FORMAT_VERSION, "git_revision": git_revision(), **metadata}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_save_safetensors(path, tensors, {METADATA_KEY: json.dumps(meta)})
    atomic_write_json(path.with_suffix(".json"), meta)
    return path


def atomic_save_safetensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> Path:
    """``safetensors.torch.save_file`` to a temporary file beside ``path``, then rename; the file gets
    the umask's permissions (safetensors itself creates 0600 files)."""
    from safetensors.torch import save_file

    from plmetric.core import faults
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, file_mode())
        faults.reached(f"write:{path.name}")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in 4 MiB blocks)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Return the plmetric metadata stored in a model checkpoint's header."""
    from safetensors import safe_open

    path = existing_checkpoint(path)
    try:
        with safe_open(str(path), framework="np") as handle:  # the header only: no torch (the query path)
            raw = (handle.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors checkpoint: {err}") from err
    if raw is None:
        raise ValueError(f"{path} has no '{METADATA_KEY}' metadata: not a plmetric model checkpoint")
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as err:  # RecursionError: nested too deep to decode
        reason = err if isinstance(err, json.JSONDecodeError) else "nested too deeply"
        raise ValueError(
            f"{path}: its '{METADATA_KEY}' metadata is not valid JSON ({reason}): not a plmetric model checkpoint"
        ) from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: its '{METADATA_KEY}' metadata is not a JSON object: not a plmetric model checkpoint")
    for key, kind in (("backbone", str), ("embedding_dim", int)):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise ValueError(
                f"{path}: its metadata lacks a valid '{key}' ({kind.__name__}): not a plmetric model checkpoint"
            )
    return meta


def tensor_shapes(path: str | os.PathLike, names: tuple[str, ...] | None = None) -> dict[str, list[int]]:
    """The shapes of a safetensors file's tensors (those of ``names`` it holds, or all), read from its
    header alone: no tensor data is read or allocated (safetensors checks on opening that the header's
    offsets lie inside the file, so the shapes describe data that is there).

    Raises:
        ValueError: not a readable safetensors file (the message names it).
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as handle:
            held = set(handle.keys())
            wanted = held if names is None else held.intersection(names)
            return {name: [int(n) for n in handle.get_slice(name).get_shape()] for name in sorted(wanted)}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors checkpoint: {err}") from None


def existing_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` as a Path; FileNotFoundError naming it when it is missing, ValueError when it is a folder,
    a FIFO or a device (:func:`plmetric.core.files.require_regular_file`)."""
    path = Path(path)
    require_regular_file(path, "checkpoint")
    return path
