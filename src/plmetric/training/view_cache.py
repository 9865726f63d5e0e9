"""The cached modes' views on disk, in chunks: an interrupted caching pass resumes where it stopped.

The caching pass of ``train.mode=head|tail`` (:mod:`plmetric.training.cached`) passes every image's
views once through the frozen backbone. With a run folder it stores them in
``RUN/view-cache/SPLIT-NNNNN.safetensors``, one file per :data:`CHUNK_IMAGES` consecutive images of
the listing, each written atomically (a temporary file beside it, flushed and fsynced, then renamed:
a kill mid-write leaves the previous state, never a half file under the chunk's name). A later call
on the same folder (``--resume``, ``--overwrite``, a resume after some epochs) loads every chunk that
still fits and computes only the rest.

A chunk fits when its header names this chunk's key, the SHA-256 of: the frozen network's weights,
the backbone, the preprocessing and the views (each transform's repr, ``train.seed``), the runtime,
the device, the stored dtype and output shape, plmetric's and PyTorch's versions, the chunk's place
in the listing, and each of its images' path, size and modification time (in-memory images: their
bytes); and when its tensors are exactly ``views`` (V, m, ...) of the stored dtype and shape and
``rows`` (m,) int64, strictly increasing within the chunk's range (m: its readable images). Any other
file under a chunk's name (stale, damaged, crafted) is computed again and replaced.

Every image's random views come from a generator seeded by ``(train.seed, its index)``
(:class:`SeededViews`), and the network sees the same batches (each chunk's images in pieces of the
pass's batch), so a chunk computed after an interruption holds the bits an uninterrupted pass gives,
whatever ``data.num_workers``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from plmetric.core.checkpoint import atomic_write_bytes, remove_stale_temporaries

__all__ = [
    "CACHE_FOLDER",
    "CHUNK_IMAGES",
    "FrozenViews",
    "SeededViews",
    "SplitCache",
    "chunk_bounds",
    "image_identities",
    "image_seed",
    "ViewStack",
    "setup_key",
    "weights_digest",
]

CACHE_FOLDER = "view-cache"  # inside the run folder
# Images per chunk file: at most one chunk's work is lost to an interrupt (EfficientNet-Lite0 at 224 px on two
# CPU cores: ~40 images/s, so about 6 s), and a 100,000-image pile is a few hundred files (head mode, 5 views of
# 1,280 float32 features: 6.6 MB a chunk).
CHUNK_IMAGES = 256
FORMAT_VERSION = 1
METADATA_KEY = "plmetric_view_cache"


class ViewStack:
    """A transform that turns one decoded image into ``V`` views stacked ``(V, 3, H, W)``."""

    def __init__(self, transforms: Sequence[Callable[[Any], Tensor]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Any) -> Tensor:
        return torch.stack([transform(image) for transform in self.transforms])


class FrozenViews(nn.Module):
    """The frozen part applied to every view of a batch: ``(B, V, 3, H, W) -> (B, V * prod(out))``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        batch, views = x.shape[:2]
        return self.net(x.flatten(0, 1)).reshape(batch, -1)


def image_seed(seed: int, index: int) -> int:
    """The seed of image ``index``'s random views: a 64-bit word of NumPy's ``SeedSequence([seed, index])``
    (independent streams for neighbouring indices and seeds)."""
    words = np.random.SeedSequence([seed % 2**64, index]).generate_state(1, dtype=np.uint64)
    return int(words[0])


class SeededViews(Dataset):
    """``dataset``'s items with the random draws of item ``i``'s transform taken from a generator seeded
    by :func:`image_seed` ``(seed, i)``: the same views whichever process, batch or order decodes it
    (the global generator of the calling process is left as it was)."""

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        # the CPU generator the transforms draw from, seeded for this image and restored after (about 25 us;
        # torch.manual_seed and fork_rng, which also visit every other device's generator, took 330 us)
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(image_seed(self.seed, int(i)))
        try:
            return self.dataset[i]
        finally:
            generator.set_state(state)


def chunk_bounds(num_images: int, chunk_images: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each chunk of ``chunk_images`` consecutive images (the last may be shorter)."""
    return [(start, min(start + chunk_images, num_images)) for start in range(0, num_images, chunk_images)]


def weights_digest(net: nn.Module, skip_prefix: str | None = None) -> str:
    """SHA-256 of ``net``'s state (names, dtypes, shapes and bytes of every tensor, in name order), leaving
    out the entries whose name starts with ``skip_prefix`` (a part that does not reach the cached output)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        if skip_prefix is not None and name.startswith(skip_prefix):
            continue
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}\0{flat.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def setup_key(fields: dict[str, Any], transforms: Sequence[Callable]) -> str:
    """SHA-256 of what makes a split's views (``fields``: network digest, backbone, runtime, device,
    dtype, output shape, seed, ...) and of each view's transform (its repr: sizes, interpolation, crop
    scale, mean and std)."""
    import plmetric

    record = {
        **fields,
        "format": FORMAT_VERSION,
        "plmetric": plmetric.__version__,
        "torch": torch.__version__,
        "transforms": [repr(transform) for transform in transforms],
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def image_identities(dataset: Any) -> list[str]:
    """What identifies each image of ``dataset`` for the cache: ``path, size, mtime`` of a file (``-1``
    for a file that cannot be examined: unreadable now, and a different image once it can be), or the
    SHA-256 of an in-memory image's bytes."""
    paths = getattr(dataset, "paths", None)
    if paths is None:
        arrays = dataset.arrays
        return [hashlib.sha256(np.ascontiguousarray(arrays[i]).tobytes()).hexdigest() for i in range(len(arrays))]
    identities = []
    for path in paths.tolist():
        try:
            info = os.stat(path)
            identities.append(f"{path}\0{info.st_size}\0{info.st_mtime_ns}")
        except (OSError, ValueError):
            identities.append(f"{path}\0-1\0-1")
    return identities


class SplitCache:
    """One split's caching pass: the chunks kept from before (loaded and checked on construction), then
    :meth:`run` computes the others, storing each as it completes.

    Args:
        net: the frozen part, already the runtime's model (:func:`plmetric.data.runtime.inference_model`).
        dataset: the split's :class:`~plmetric.data.datasets.ImageDataset`; its transform becomes the views.
        transforms: one per view (view 0 the clean one).
        out_shape: ``net``'s output shape for one view (without the batch axis).
        batch_images: images per batch of the pass (a chunk is cut into such batches).
        seed: ``train.seed`` (:class:`SeededViews`).
        store_dtype: the dtype the views are kept in.
        folder: where the chunk files live; None: nothing on disk (the whole pass in memory).
        split: names the files (``train``, ``test``).
        key: the split's :func:`setup_key`.
        writable: whether this process writes chunks (rank 0); others only read the ones that fit.
    """

    def __init__(
        self,
        net: nn.Module,
        dataset: Any,
        transforms: Sequence[Callable],
        out_shape: tuple[int, ...],
        *,
        batch_images: int,
        seed: int,
        store_dtype: torch.dtype,
        folder: Path | None,
        split: str,
        key: str,
        writable: bool = True,
    ) -> None:
        self.net, self.dataset, self.split = net, dataset, split
        self.views, self.out_shape, self.store_dtype = len(transforms), tuple(out_shape), store_dtype
        self.batch_images, self.seed, self.folder, self.writable = batch_images, seed, folder, writable
        dataset.transform = ViewStack(transforms)
        self.bounds = chunk_bounds(len(dataset), CHUNK_IMAGES)
        self.done: dict[int, tuple[Tensor, Tensor]] = {}  # chunk -> (views (V, m, ...), rows (m,))
        self.computed_images = 0  # images this pass decoded (set by run)
        self.kept_chunks = self.kept_images = 0  # chunks (and their images) loaded from before
        self.on_disk: set[int] = set()  # chunks whose file holds them (kept from before, or stored now)
        self.keys: list[str] = []
        if folder is None:
            return
        identities = image_identities(dataset)
        for start, end in self.bounds:
            chunk = hashlib.sha256(f"{key}\0{split}\0{start}\0{end}\0".encode())
            chunk.update("\n".join(identities[start:end]).encode())
            self.keys.append(chunk.hexdigest())
        if writable:
            folder.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(folder)
            self._remove_chunks_from(len(self.bounds))
        for c in range(len(self.bounds)):
            loaded = self._load(c)
            if loaded is not None:
                self.done[c] = loaded
                self.on_disk.add(c)
        self.kept_chunks = len(self.done)
        self.kept_images = self.images_in(self.done)

    @property
    def chunks(self) -> int:
        """The number of chunks of the split."""
        return len(self.bounds)

    @property
    def remaining_images(self) -> int:
        """The images of the chunks not done yet."""
        return len(self.dataset) - self.images_in(self.done)

    def images_in(self, chunks: Any) -> int:
        """The images (readable or not) the chunks ``chunks`` cover."""
        return sum(self.bounds[c][1] - self.bounds[c][0] for c in chunks)

    def path(self, c: int) -> Path:
        """The file of chunk ``c``."""
        assert self.folder is not None
        return self.folder / f"{self.split}-{c:05d}.safetensors"

    def _remove_chunks_from(self, count: int) -> None:
        """Remove this split's chunk files numbered ``count`` and above (a pile that shrank)."""
        assert self.folder is not None
        pattern = re.compile(rf"{re.escape(self.split)}-(\d{{5,}})\.safetensors")
        for path in self.folder.iterdir():
            match = pattern.fullmatch(path.name)
            if match and int(match.group(1)) >= count and path.is_file():
                path.unlink(missing_ok=True)

    def _load(self, c: int) -> tuple[Tensor, Tensor] | None:
        """Chunk ``c`` from its file when the file is this chunk's (its key) and holds what it should
        (names, dtypes, shapes, rows); None otherwise (missing, stale, damaged)."""
        from safetensors import safe_open

        path, (start, end) = self.path(c), self.bounds[c]
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = json.loads((handle.metadata() or {}).get(METADATA_KEY, "null"))
                expected = self._metadata(c)
                if not isinstance(meta, dict) or any(meta.get(name) != value for name, value in expected.items()):
                    return None
                if set(handle.keys()) != {"views", "rows"}:
                    return None
                rows_shape = handle.get_slice("rows").get_shape()
                views_shape = handle.get_slice("views").get_shape()
                if len(rows_shape) != 1 or not 0 <= rows_shape[0] <= end - start:
                    return None
                if list(views_shape) != [self.views, rows_shape[0], *self.out_shape]:
                    return None
                views, rows = handle.get_tensor("views"), handle.get_tensor("rows")
        except Exception:  # noqa: BLE001 - any file that does not read as a chunk is computed again
            return None
        if views.dtype != self.store_dtype or rows.dtype != torch.int64:
            return None
        if rows.numel() and (int(rows[0]) < start or int(rows[-1]) >= end or not bool((rows[1:] > rows[:-1]).all())):
            return None
        return views, rows

    def _metadata(self, c: int) -> dict[str, Any]:
        """What chunk ``c``'s header says: the format, the split, its range of the listing, its key."""
        start, end = self.bounds[c]
        return {"format": FORMAT_VERSION, "split": self.split, "chunk": c, "start": start, "end": end, "key": self.keys[c]}

    def _store(self, c: int, views: Tensor, rows: Tensor) -> None:
        """Write chunk ``c`` atomically (temporary file, fsync, rename). A write that fails (a full disk,
        a read-only folder) warns once and the pass goes on in memory, storing nothing more."""
        from safetensors.torch import save

        data = save({"views": views, "rows": rows}, metadata={METADATA_KEY: json.dumps(self._metadata(c))})
        try:
            atomic_write_bytes(self.path(c), data)
            self.on_disk.add(c)
        except OSError as err:
            self.writable = False
            warnings.warn(
                f"cannot store cached views in {self.folder} ({type(err).__name__}: {err}); caching goes on in "
                "memory only, so an interruption from now on loses the chunks computed since",
                stacklevel=2,
            )

    def run(
        self, device: torch.device, num_workers: int, progress: bool, on_chunk: Callable[[], None] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Compute the chunks not done yet (each stored as it completes, then ``on_chunk()``), and return
        ``(views (V, M, ...), rows (M,))`` over the split's M readable images, in listing order."""
        from tqdm import tqdm  # not tqdm.auto: its asyncio tqdm calls iter(loader), a 2nd worker pool

        from plmetric.core import faults
        from plmetric.data.datasets import collate_skip_none

        todo = [c for c in range(len(self.bounds)) if c not in self.done]
        batches, owners = [], []
        for c in todo:
            start, end = self.bounds[c]
            for first in range(start, end, self.batch_images):
                batches.append(list(range(first, min(first + self.batch_images, end))))
                owners.append(c)
        loader = DataLoader(
            SeededViews(self.dataset, self.seed),
            batch_sampler=batches,
            num_workers=num_workers if batches else 0,
            collate_fn=collate_skip_none,
            pin_memory=device.type == "cuda",
        )
        frozen = FrozenViews(self.net).to(device).eval()
        self.net.eval()  # the frozen part: BatchNorm statistics fixed
        outputs: list[Tensor] = []
        indices: list[Tensor] = []
        bar = tqdm(
            total=len(self.dataset),
            initial=len(self.dataset) - self.remaining_images,
            desc=f"caching views ({self.split})",
            unit="img",
            disable=not progress,
            dynamic_ncols=True,
        )
        try:
            with torch.no_grad():
                for number, batch in enumerate(loader):
                    c = owners[number]
                    if batch is not None:
                        images, _, batch_indices = batch
                        outputs.append(frozen(images.to(device, non_blocking=True)).float().cpu())
                        indices.append(torch.as_tensor(batch_indices).long().cpu())
                    bar.update(len(batches[number]))
                    if number + 1 < len(batches) and owners[number + 1] == c:
                        continue
                    self._finish_chunk(c, outputs, indices)
                    outputs, indices = [], []
                    if on_chunk is not None:
                        on_chunk()
                    faults.reached("cache-chunk")
        finally:
            bar.close()
        self.computed_images = self.images_in(todo)
        if self.bounds:
            views = torch.cat([self.done[c][0] for c in range(len(self.bounds))], dim=1)
            rows = torch.cat([self.done[c][1] for c in range(len(self.bounds))])
        else:
            views = torch.zeros(self.views, 0, *self.out_shape, dtype=self.store_dtype)
            rows = torch.zeros(0, dtype=torch.int64)
        # the chunks' own tensors go (the split's hold their values): the cache is in memory once from here
        self.done = {c: (views.narrow(1, 0, 0), rows.narrow(0, 0, 0)) for c in self.done}
        unread = torch.ones(len(self.dataset), dtype=torch.bool)
        unread[rows] = False
        if bool(unread.any()) and hasattr(self.dataset, "mark_unreadable"):
            # later passes skip them without decoding them again
            self.dataset.mark_unreadable(unread.nonzero().flatten().tolist())
        return views, rows

    def _finish_chunk(self, c: int, outputs: list[Tensor], indices: list[Tensor]) -> None:
        """Shape the outputs of chunk ``c``'s batches as ``(V, m, ...)`` in the stored dtype, keep and store them."""
        if outputs:
            flat, rows = torch.cat(outputs), torch.cat(indices)
        else:  # every image of the chunk unreadable
            flat, rows = torch.zeros(0, self.views * int(np.prod(self.out_shape))), torch.zeros(0, dtype=torch.int64)
        views = flat.reshape(flat.shape[0], self.views, *self.out_shape).transpose(0, 1)
        views = views.to(self.store_dtype).contiguous()
        self.done[c] = (views, rows)
        if self.folder is not None and self.writable:
            self._store(c, views, rows)
