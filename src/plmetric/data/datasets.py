"""Image data sets in their official layouts, split for zero-shot retrieval.

Every loader returns a :class:`DatasetSplits` whose ``train`` and ``test`` parts are
:class:`ImageDataset` objects yielding ``(transform(image), label, index)``.

Zero-shot protocol (CUB-200-2011, Cars-196, labelled folders, digits): the distinct class ids are
sorted and the first ``n // 2`` classes train, the remaining classes test, so train and test share
no class. Labels keep the original class ids (they are compared for equality only, never used as
indices). Stanford Online Products uses its own ``Ebay_train.txt`` / ``Ebay_test.txt``.

Unreadable images (missing, truncated, garbage bytes) never crash an epoch: ``__getitem__`` returns
``None`` with a warning and :func:`collate_skip_none` drops such items.
"""

from __future__ import annotations

import os
import stat
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torch.utils.data.dataloader import default_collate

from plmetric.core.names import shown
from plmetric.data.images import open_image

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
DATASET_NAMES = ("cub200", "cars196", "sop", "folder", "images", "digits")

# Errors decoding a file raises: open_image's (FileNotFoundError and PermissionError are OSErrors;
# undecodable, too large or not a regular file are ValueErrors), and PIL's for a direct use.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

_CUB_LAYOUT = """\
<root>/CUB_200_2011/              (or <root> is CUB_200_2011 itself)
    images.txt                    <image_id> <relative path>
    image_class_labels.txt        <image_id> <class_id>
    classes.txt
    images/001.Black_footed_Albatross/Black_Footed_Albatross_0001_796111.jpg ..."""
_CARS_LAYOUT = """\
<root>/
    cars_annos.mat                struct array 'annotations' (relative_im_path, class, ...)
    car_ims/000001.jpg ..."""
_SOP_LAYOUT = """\
<root>/                           (or <root>/Stanford_Online_Products/)
    Ebay_train.txt                header, then <image_id> <class_id> <super_class_id> <path>
    Ebay_test.txt
    bicycle_final/111085122871_0.JPG ..."""
_LABELLED_LAYOUT = """\
<root>/
    <class_a>/img1.jpg, sub/dir/img2.png ...
    <class_b>/..."""
_UNLABELLED_LAYOUT = """\
<root>/
    img1.jpg, any/sub/dir/img2.png ..."""


class DataLayoutError(FileNotFoundError):
    """A data set file or folder is missing; ``layout_hint`` is a one-line summary of the layout
    (the message itself ends with the full expected tree)."""

    def __init__(self, message: str, layout_hint: str) -> None:
        super().__init__(message)
        self.layout_hint = layout_hint


def _one_line(layout: str) -> str:
    """The layout tree as one line: its entries, comments dropped."""
    entries = [line.strip().split("  ")[0] for line in layout.splitlines() if line.strip()]
    return ", ".join(entry for entry in entries if entry)


class UnreadableImageWarning(UserWarning):
    """An image file could not be decoded and its item was skipped."""


class ImageDataset(Dataset):
    """Images with integer labels; items are ``(transform(image), label, index)``.

    Args:
        images: file paths (decoded by :func:`plmetric.data.images.open_image`) or an in-memory ``uint8`` array of
            shape ``(N, H, W)`` (grayscale) or ``(N, H, W, 3)`` (RGB).
        labels: one integer class id per image, or ``None`` for unlabelled data (all labels -1).
        transform: applied to the RGB PIL image; assignable after construction.
        name: shown in messages and summaries.

    Attributes:
        labels: ``int64`` array, -1 = unlabelled.
        paths: ``str`` array of file paths, or ``None`` for in-memory images.
        skipped: number of distinct items known to be unreadable in this process (found by a
            read here, or reported back with :meth:`mark_unreadable` after a pass in workers, as
            :func:`plmetric.evaluation.metrics.embed_dataset` does).
    """

    def __init__(
        self,
        images: Sequence[str | os.PathLike] | np.ndarray,
        labels: Sequence[int] | np.ndarray | None,
        transform: Callable | None = None,
        name: str = "",
    ) -> None:
        self.name = name
        self.transform = transform
        if isinstance(images, np.ndarray) and images.dtype == np.uint8:
            if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
                raise ValueError(
                    f"ImageDataset {name!r}: in-memory images must have shape (N, H, W) or "
                    f"(N, H, W, 3), got {images.shape}"
                )
            self.arrays: np.ndarray | None = images
            self.paths: np.ndarray | None = None
        else:
            self.arrays = None
            # A numpy string array avoids per-item refcount copy-on-write in DataLoader workers.
            self.paths = np.array([os.fspath(p) for p in images], dtype=np.str_)
        n = len(self.arrays if self.arrays is not None else self.paths)
        if labels is None:
            self.labels = np.full(n, -1, dtype=np.int64)
        else:
            self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
            if len(self.labels) != n:
                raise ValueError(f"ImageDataset {name!r}: {n} images but {len(self.labels)} labels")
        # Items found unreadable, shared by shallow copies (``with_transform``) and inherited by
        # DataLoader workers started after :meth:`mark_unreadable`: each file is decoded (and
        # warned about) once, then skipped without reading it again.
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        """Number of distinct labels >= 0."""
        return int(np.unique(self.labels[self.labels >= 0]).size)

    @property
    def skipped(self) -> int:
        """Number of distinct items known to be unreadable (found here or via :meth:`mark_unreadable`)."""
        return len(self._bad)

    @property
    def unreadable(self) -> list[int]:
        """Sorted indices of the items known to be unreadable."""
        return sorted(self._bad)

    def mark_unreadable(self, indices: Iterable[int]) -> None:
        """Record items found unreadable elsewhere (e.g. in DataLoader workers): they are skipped
        from now on without being decoded or warned about again."""
        self._bad.update(int(i) for i in indices)

    def describe(self, i: int) -> str:
        """The file path of item ``i`` (a plain string), or ``in-memory item i``."""
        return str(self.paths[i]) if self.paths is not None else f"in-memory item {i}"

    def load_image(self, i: int) -> Image.Image:
        """Return image ``i`` as an RGB PIL image, untransformed (:func:`plmetric.data.images.open_image`:
        EXIF orientation applied, any mode as 8-bit RGB); raises one of :data:`DECODE_ERRORS` if it
        cannot be decoded, is over the pixel limit or is not a regular file."""
        if self.arrays is not None:
            return Image.fromarray(self.arrays[i]).convert("RGB")
        return open_image(str(self.paths[i]))  # upright 8-bit RGB, within MAX_IMAGE_PIXELS

    def __getitem__(self, i: int) -> tuple[Any, int, int] | None:
        """Return ``(transform(image), label, i)``, or ``None`` if the image cannot be decoded.

        The first failure of an item warns (:class:`UnreadableImageWarning`, naming the file);
        later requests for it return ``None`` without touching the file.
        """
        i = int(i)
        if i in self._bad:
            return None
        try:
            image = self.load_image(i)
        except DECODE_ERRORS as err:
            self._bad.add(i)
            warnings.warn(
                shown(f"skipping unreadable image {self.describe(i)} ({type(err).__name__}: {err})"),
                UnreadableImageWarning,
                stacklevel=2,
            )
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[i]), i

    def __repr__(self) -> str:
        return f"ImageDataset({self.name!r}, {len(self)} images, {self.num_classes} classes)"


def collate_skip_none(batch: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Drop ``None`` items (unreadable images) and default-collate the rest.

    Returns:
        ``(images, labels, indices)``, or ``None`` when every item of the batch was unreadable;
        a training loop using this collate must skip ``None`` batches.
    """
    batch = [item for item in batch if item is not None]
    if not batch:
        return None
    images, labels, indices = default_collate(batch)
    return images, labels, indices


class PairedViews:
    """A transform giving two views of one image: ``(student_transform(img), teacher_transform(img))``.

    Collated batches then hold ``[student_images, teacher_images]``; the trainer feeds the first to
    the student and the second to the teacher (``train.teacher_view``).
    """

    def __init__(self, student_transform: Callable, teacher_transform: Callable) -> None:
        self.student_transform = student_transform
        self.teacher_transform = teacher_transform

    def __call__(self, image: Any) -> tuple[Any, Any]:
        return self.student_transform(image), self.teacher_transform(image)


def with_transform(dataset: Any, transform: Any) -> Any:
    """A shallow copy of ``dataset`` that applies another transform (images, labels and the record
    of unreadable items are shared)."""
    import copy

    clone = copy.copy(dataset)
    clone.transform = transform
    return clone


class FeatureDataset(Dataset):
    """Precomputed feature vectors with labels; items are ``(feature (D,), label, index)``.

    The head-only setting: with a :func:`plmetric.data.backbones.feature_model` the trainer learns the
    embedding layer on cached pooled backbone features (no images decoded, no backbone pass),
    which makes recipe studies cheap. ``transform`` exists for interface compatibility and is ignored.
    """

    def __init__(self, features: torch.Tensor | np.ndarray, labels: Sequence[int] | np.ndarray | None, name: str = ""):
        self.name = name
        self.features = torch.as_tensor(np.asarray(features, dtype=np.float32))
        if self.features.dim() != 2:
            raise ValueError(f"FeatureDataset {name!r}: features must be (N, D), got {tuple(self.features.shape)}")
        n = self.features.shape[0]
        self.labels = np.full(n, -1, dtype=np.int64) if labels is None else np.asarray(labels, np.int64).reshape(-1)
        if len(self.labels) != n:
            raise ValueError(f"FeatureDataset {name!r}: {n} feature rows but {len(self.labels)} labels")
        self.transform: Callable | None = None
        self.skipped = 0
        self.unreadable: list[int] = []

    def mark_unreadable(self, indices: Iterable[int]) -> None:
        """Feature vectors are always readable; nothing to record."""

    def describe(self, i: int) -> str:
        return f"feature row {i}"

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        """Number of distinct labels >= 0."""
        return int(np.unique(self.labels[self.labels >= 0]).size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        i = int(i)
        return self.features[i], int(self.labels[i]), i


class ViewFeatureDataset(Dataset):
    """Precomputed network inputs of several views of every image: ``views[0]`` the deterministic
    (clean) view, ``views[1:]`` augmentations (random crops and flips) computed once. A cheap
    stand-in for augmenting images every epoch (the cached settings of the studies).

    With ``transform == ViewFeatureDataset.PAIRED`` items are ``((one of the augmented views drawn
    at random, the clean view), label, index)``: the student gets the augmentation, the teacher
    the clean view, as ``train.teacher_view=clean`` does with images; with any other transform
    (the deterministic copy the trainer makes for the bank and the evaluation) ``(clean view,
    label, index)``. Views are stored in any float dtype (e.g. float16) and returned as float32.

    Args:
        views: (V, N, ...) tensor, V >= 1.
        labels: (N,) class ids, or None (unlabelled).
        paths: the N images' files (what :meth:`describe` names), or None.
    """

    PAIRED = "paired views"

    def __init__(
        self,
        views: torch.Tensor,
        labels: Sequence[int] | np.ndarray | None,
        name: str = "",
        paths: Sequence[str] | None = None,
    ):
        self.name = name
        self.views = torch.as_tensor(views)
        if self.views.dim() < 3 or not self.views.is_floating_point():
            raise ValueError(f"ViewFeatureDataset {name!r}: views must be a float (V, N, ...) tensor")
        n = self.views.shape[1]
        self.labels = np.full(n, -1, dtype=np.int64) if labels is None else np.asarray(labels, np.int64).reshape(-1)
        if len(self.labels) != n:
            raise ValueError(f"ViewFeatureDataset {name!r}: {n} items but {len(self.labels)} labels")
        if paths is not None and len(paths) != n:
            raise ValueError(f"ViewFeatureDataset {name!r}: {n} items but {len(paths)} paths")
        self.paths = list(paths) if paths is not None else None
        self.transform: Any = self.PAIRED if self.views.shape[0] > 1 else None
        self.skipped = 0
        self.unreadable: list[int] = []

    @property
    def features(self) -> torch.Tensor:
        """The clean views (N, ...)."""
        return self.views[0]

    def mark_unreadable(self, indices: Iterable[int]) -> None:
        """Precomputed views are always readable; nothing to record."""

    def describe(self, i: int) -> str:
        """The file of item ``i`` when known, else ``view row i``."""
        return str(self.paths[i]) if self.paths is not None else f"view row {i}"

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        """Number of distinct labels >= 0."""
        return int(np.unique(self.labels[self.labels >= 0]).size)

    def __getitem__(self, i: int) -> tuple[Any, int, int]:
        i = int(i)
        clean = self.views[0, i].float()
        if self.transform == self.PAIRED and self.views.shape[0] > 1:
            view = int(torch.randint(1, self.views.shape[0], ()))
            return (self.views[view, i].float(), clean), int(self.labels[i]), i
        return clean, int(self.labels[i]), i


@dataclass
class DatasetSplits:
    """A named train/test pair; ``test`` is ``None`` for an unlabelled folder."""

    name: str
    train: ImageDataset
    test: ImageDataset | None

    def summary(self) -> str:
        """One line such as ``cub200: train 2,949 images / 50 classes | test ...``."""

        def part(ds: ImageDataset) -> str:
            classes = f"{ds.num_classes:,} classes" if ds.num_classes else "unlabelled"
            return f"{len(ds):,} images / {classes}"

        test = f"test {part(self.test)}" if self.test is not None else "no test set"
        return f"{self.name}: train {part(self.train)} | {test}"


# ----------------------------------------------------------------------------- helpers


def _require(path: Path, what: str, layout: str) -> Path:
    """Return ``path`` if it exists, else raise FileNotFoundError showing the expected layout."""
    if not path.exists():
        raise DataLayoutError(f"{what} not found: {path}\nExpected layout:\n{layout}", _one_line(layout))
    return path


def _read_int_table(path: Path, columns: str, skip_header: bool = False) -> list[tuple[int, list[str]]]:
    """Parse a whitespace table whose leading columns are integers and whose last may be a path.

    Args:
        path: the text file.
        columns: space-separated column names, e.g. ``"image_id class_id path"``; a last column
            named ``path`` is kept as a string (it may contain spaces), all others must be ints.
        skip_header: ignore the first line.

    Returns:
        ``(line_number, fields)`` for every non-blank line, fields as strings (ints validated).
    """
    names = columns.split()
    has_path = names[-1] == "path"
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); expected '{columns}' lines"
        ) from None
    for lineno, line in enumerate(lines, start=1):
        if (skip_header and lineno == 1) or not line.strip():
            continue
        fields = line.split(maxsplit=len(names) - 1) if has_path else line.split()
        int_fields = fields[:-1] if has_path else fields
        if len(fields) != len(names) or not all(_is_int(x) for x in int_fields):
            raise ValueError(f"{path}, line {lineno}: expected '{columns}', got {line.rstrip()!r}")
        if has_path:
            fields[-1] = fields[-1].strip()
        rows.append((lineno, fields))
    return rows


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _zero_shot(
    name: str,
    images: Sequence[str | os.PathLike] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    train_transform: Callable | None,
    test_transform: Callable | None,
) -> DatasetSplits:
    """Split by class: the first ``n // 2`` of the sorted distinct class ids train, the rest test."""
    labels = np.asarray(labels, dtype=np.int64)
    classes = np.unique(labels)
    if classes.size < 2:
        raise ValueError(f"{name}: a zero-shot split needs at least 2 classes, found {classes.size}")
    is_train = np.isin(labels, classes[: classes.size // 2])
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8):
        images = np.array([os.fspath(p) for p in images], dtype=np.str_)
    return DatasetSplits(
        name,
        ImageDataset(images[is_train], labels[is_train], train_transform, f"{name}/train"),
        ImageDataset(images[~is_train], labels[~is_train], test_transform, f"{name}/test"),
    )


class SkippedFilesWarning(UserWarning):
    """The folder walk left entries out: files named as images that are not regular files (a FIFO,
    a device), broken links, folders reached again through a link, folders it could not list."""


@dataclass
class ImageScan:
    """What :func:`scan_images` found under ``root``: the image files, and what it left out by reason."""

    root: Path
    paths: list[Path]
    skipped: dict[str, list[Path]]

    def summary(self, names: int = 3) -> str | None:
        """One line naming what was left out, e.g. ``image folder F: left out 2 entries: not regular
        files: 1 (fifo.jpg); ...`` (a count per reason and its first ``names`` entries, relative to
        ``root``), or None when nothing was."""
        if not self.skipped:
            return None
        total = sum(len(v) for v in self.skipped.values())
        parts = []
        for reason, entries in self.skipped.items():
            listed = [_relative(p, self.root) for p in entries[:names]]
            more = f", +{len(entries) - names} more" if len(entries) > names else ""
            parts.append(f"{reason}: {len(entries)} ({', '.join(listed)}{more})")
        entries = f"{total} entr{'y' if total == 1 else 'ies'}"
        return shown(f"image folder {self.root}: left out {entries}: " + "; ".join(parts))


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _identity(st: os.stat_result) -> tuple[int, int] | None:
    """``(st_dev, st_ino)``, or None where the file system reports no inode numbers (0)."""
    return (st.st_dev, st.st_ino) if st.st_ino else None


def scan_images(folder: str | os.PathLike, avoid: Iterable[tuple[int, int]] = ()) -> ImageScan:
    """Walk ``folder`` for image files (by extension, :data:`IMAGE_EXTENSIONS`), safely.

    * Each real folder is walked once, by ``(st_dev, st_ino)``: links to folders are followed, but
      a folder reached again (a link cycle, a self-link ``loop -> .``, a second link to a folder) is
      left out, so nothing loops and no image is listed twice through links.
    * Only regular files are listed (``stat``, which never opens them): a FIFO or device named
      ``x.jpg`` is left out, never read. A file is listed under one name: a link to a file listed
      under its own name (or a hard link to it) is left out.
    * Hidden files and folders (a leading ``.``) are skipped silently, as are files of other
      extensions; broken links and folders that cannot be listed are left out and named.

    Order: top-down, names sorted in each folder (a folder's files before its sub-folders'); a folder
    reached twice is walked where the walk first reaches it.
    ``avoid``: ``(st_dev, st_ino)`` of folders never to enter (e.g. the other class folders).
    """
    root = Path(folder)
    scan = ImageScan(root, [], {})

    def skip(reason: str, path: Path) -> None:
        scan.skipped.setdefault(reason, []).append(path)

    try:
        root_identity = _identity(os.stat(root))
    except OSError:
        return scan
    seen_dirs = set(avoid) | ({root_identity} if root_identity else set())
    files: list[tuple[Path, tuple[int, int] | None, bool]] = []  # (path, identity, is a link)
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(directory) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError:
            skip("folders that could not be listed", directory)
            continue
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = directory / entry.name
            is_image_name = Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS
            try:
                st = entry.stat()  # follows links; never opens the file
            except OSError:
                if is_image_name or entry.is_symlink():
                    skip("broken links or entries that cannot be read", path)
                continue
            identity = _identity(st)
            if stat.S_ISDIR(st.st_mode):
                if identity is not None and identity in seen_dirs:
                    skip("folders reached again through a link", path)
                    continue
                if identity is not None:
                    seen_dirs.add(identity)
                subdirs.append(path)
            elif is_image_name:
                if not stat.S_ISREG(st.st_mode):
                    skip("not regular files", path)
                else:
                    files.append((path, identity, entry.is_symlink()))
        stack.extend(reversed(subdirs))
    # one name per file: the first that is not itself a link, else the first
    keep: dict[tuple[int, int], int] = {}
    for k, (_, identity, is_link) in enumerate(files):
        if identity is not None and (identity not in keep or (files[keep[identity]][2] and not is_link)):
            keep[identity] = k
    for k, (path, identity, _) in enumerate(files):
        if identity is None or keep[identity] == k:
            scan.paths.append(path)
        else:
            skip("links to a file listed under another name", path)
    return scan


def find_images(folder: str | os.PathLike) -> list[Path]:
    """All image files under ``folder``, by :func:`scan_images` (each real folder once, regular
    files only, hidden entries skipped); what it left out is named in one
    :class:`SkippedFilesWarning`."""
    scan = scan_images(folder)
    summary = scan.summary()
    if summary:
        warnings.warn(summary, SkippedFilesWarning, stacklevel=1)  # one place: a second walk warns once
    return scan.paths


def _require_dir(root: str | os.PathLike, what: str, layout: str) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        kind = "is a file, not a folder" if root.exists() else "not found"
        raise DataLayoutError(f"{what} {kind}: {root}\nExpected layout:\n{layout}", _one_line(layout))
    return root


# ----------------------------------------------------------------------------- loaders


def load_cub200(
    root: str | os.PathLike,
    train_transform: Callable | None = None,
    test_transform: Callable | None = None,
) -> DatasetSplits:
    """CUB-200-2011 in its official layout, split by class (first half of class ids trains).

    ``root`` is the folder holding ``CUB_200_2011/`` or ``CUB_200_2011`` itself. The official
    ``train_test_split.txt`` is ignored. ``images.txt`` and ``image_class_labels.txt`` must list
    the same image ids in the same order.
    """
    root = _require_dir(root, "CUB-200-2011 root folder", _CUB_LAYOUT)
    base = root / "CUB_200_2011" if (root / "CUB_200_2011").is_dir() else root
    images_txt = _require(base / "images.txt", "CUB-200-2011 index file", _CUB_LAYOUT)
    labels_txt = _require(base / "image_class_labels.txt", "CUB-200-2011 label file", _CUB_LAYOUT)
    images = _read_int_table(images_txt, "image_id path")
    labels = _read_int_table(labels_txt, "image_id class_id")
    for (line_i, (id_i, _)), (line_l, (id_l, _)) in zip(images, labels, strict=False):  # lengths checked below
        if int(id_i) != int(id_l):
            raise ValueError(
                f"CUB-200-2011: {images_txt.name} line {line_i} has image id {id_i} but "
                f"{labels_txt.name} line {line_l} has image id {id_l}; both files must list the "
                f"same ids in the same order ({base})"
            )
    if len(images) != len(labels):
        longer, rows = (images_txt, images) if len(images) > len(labels) else (labels_txt, labels)
        line, (extra_id, _) = rows[min(len(images), len(labels))]
        raise ValueError(
            f"CUB-200-2011: {images_txt.name} lists {len(images)} images but {labels_txt.name} "
            f"lists {len(labels)}; first unmatched: {longer.name} line {line}, image id {extra_id} "
            f"({base})"
        )
    seen: set[int] = set()
    for line, (image_id, _) in images:
        if int(image_id) in seen:
            raise ValueError(f"CUB-200-2011: {images_txt}, line {line}: duplicate image id {image_id}")
        seen.add(int(image_id))
    paths = [base / "images" / fields[1] for _, fields in images]
    return _zero_shot("cub200", paths, [int(f[1]) for _, f in labels], train_transform, test_transform)


def load_cars196(
    root: str | os.PathLike,
    train_transform: Callable | None = None,
    test_transform: Callable | None = None,
) -> DatasetSplits:
    """Stanford Cars-196 from ``cars_annos.mat``, split by class (classes 1-98 train, 99-196 test).

    The ``test`` field of the annotations (the official classification split) is ignored.
    """
    import scipy.io

    root = _require_dir(root, "Cars-196 root folder", _CARS_LAYOUT)
    mat_path = _require(root / "cars_annos.mat", "Cars-196 annotation file", _CARS_LAYOUT)
    try:
        mat = scipy.io.loadmat(mat_path, squeeze_me=True, struct_as_record=False)
    except Exception as err:  # scipy raises several unrelated types for a bad file
        raise ValueError(f"Cars-196: cannot read {mat_path} as a MATLAB file: {err}") from err
    if "annotations" not in mat:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise ValueError(f"Cars-196: {mat_path} has no 'annotations' variable (found {keys})")
    # squeeze_me turns a 1-element struct array into a bare mat_struct; atleast_1d undoes that.
    annotations = np.atleast_1d(mat["annotations"])
    paths, labels = [], []
    for k, ann in enumerate(annotations):
        try:
            rel, cls = ann.relative_im_path, getattr(ann, "class")
            paths.append(root / str(rel))
            labels.append(int(cls))
        except (AttributeError, TypeError, ValueError) as err:
            fields = getattr(ann, "_fieldnames", None)
            raise ValueError(
                f"Cars-196: {mat_path}, annotation {k}: expected fields 'relative_im_path' and an "
                f"integer 'class', found fields {fields} ({err})"
            ) from err
    return _zero_shot("cars196", paths, labels, train_transform, test_transform)


def load_sop(
    root: str | os.PathLike,
    train_transform: Callable | None = None,
    test_transform: Callable | None = None,
) -> DatasetSplits:
    """Stanford Online Products, split by its own ``Ebay_train.txt`` / ``Ebay_test.txt``."""
    root = _require_dir(root, "Stanford Online Products root folder", _SOP_LAYOUT)
    if not (root / "Ebay_train.txt").exists() and (root / "Stanford_Online_Products").is_dir():
        root = root / "Stanford_Online_Products"
    parts = []
    for split, transform in (("train", train_transform), ("test", test_transform)):
        txt = _require(root / f"Ebay_{split}.txt", "Stanford Online Products index file", _SOP_LAYOUT)
        rows = _read_int_table(txt, "image_id class_id super_class_id path", skip_header=True)
        if not rows:
            raise ValueError(f"Stanford Online Products: {txt} lists no images")
        parts.append(
            ImageDataset(
                [root / fields[3] for _, fields in rows],
                [int(fields[1]) for _, fields in rows],
                transform,
                f"sop/{split}",
            )
        )
    return DatasetSplits("sop", parts[0], parts[1])


def load_labelled_folder(
    root: str | os.PathLike,
    train_transform: Callable | None = None,
    test_transform: Callable | None = None,
) -> DatasetSplits:
    """One sub-folder per class (images searched recursively inside each), split by class.

    Class ids are the positions of the class folders in sorted name order, counting only folders
    that hold at least one image; the first half of them trains. Files directly in ``root`` are
    ignored.
    """
    root = _require_dir(root, "labelled image folder", _LABELLED_LAYOUT)
    left_out: dict[str, list[Path]] = {}
    # class folders: each real folder once (a link to the root or to another class is left out),
    # and no class walks into the root or another class through a link
    class_dirs, identities = [], {_identity(root.stat())} - {None}
    for d in sorted(root.iterdir()):
        if d.name.startswith(".") or not d.is_dir():
            continue
        identity = _identity(d.stat())
        if identity is not None and identity in identities:
            left_out.setdefault("folders reached again through a link", []).append(d)
            continue
        identities.add(identity)
        class_dirs.append((d, identity))
    paths, labels = [], []
    for class_dir, identity in class_dirs:
        scan = scan_images(class_dir, identities - {identity, None})  # one warning for all, below
        for reason, entries in scan.skipped.items():
            left_out.setdefault(reason, []).extend(entries)
        if scan.paths:
            labels += [labels[-1] + 1 if labels else 0] * len(scan.paths)
            paths += scan.paths
    summary = ImageScan(root, paths, left_out).summary()
    if summary:
        warnings.warn(summary, SkippedFilesWarning, stacklevel=2)
    if not paths:
        exts = " ".join(sorted(IMAGE_EXTENSIONS))
        raise ValueError(
            f"labelled image folder {root} holds no images in class sub-folders "
            f"(extensions {exts})\nExpected layout:\n{_LABELLED_LAYOUT}"
        )
    return _zero_shot(f"folder:{root.name}", paths, labels, train_transform, test_transform)


def load_unlabelled_folder(
    root: str | os.PathLike,
    train_transform: Callable | None = None,
    test_transform: Callable | None = None,
) -> DatasetSplits:
    """Every image under ``root``, recursively, as an unlabelled train set (labels -1, no test).

    ``test_transform`` is accepted for a uniform signature and unused.
    """
    del test_transform
    root = _require_dir(root, "image folder", _UNLABELLED_LAYOUT)
    paths = find_images(root)
    if not paths:
        exts = " ".join(sorted(IMAGE_EXTENSIONS))
        raise ValueError(f"image folder {root} holds no images (extensions {exts})")
    name = f"images:{root.name}"
    return DatasetSplits(name, ImageDataset(paths, None, train_transform, f"{name}/train"), None)


def load_digits(
    train_transform: Callable | None = None,
    test_transform: Callable | None = None,
) -> DatasetSplits:
    """scikit-learn's embedded 8x8 digits (1,797 images, no download); digits 0-4 train, 5-9 test.

    Pixel values 0..16 are scaled to uint8 as ``round(v * 255 / 16)``; items decode to 8x8 RGB.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return _zero_shot("digits", images, digits.target, train_transform, test_transform)


_LOADERS: dict[str, Callable[..., DatasetSplits]] = {
    "cub200": load_cub200,
    "cars196": load_cars196,
    "sop": load_sop,
    "folder": load_labelled_folder,
    "images": load_unlabelled_folder,
}


def load_dataset(
    name: str,
    root: str | os.PathLike | None,
    train_transform: Callable | None = None,
    test_transform: Callable | None = None,
    verbose: bool = True,
) -> DatasetSplits:
    """Load a data set by name (one of :data:`DATASET_NAMES`).

    ``"folder"`` is a labelled folder (one sub-folder per class), ``"images"`` an unlabelled
    folder. ``root`` is required except for ``"digits"`` (where it is ignored). Prints
    ``splits.summary()`` when ``verbose``.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASET_NAMES)}")
    if name == "digits":
        splits = load_digits(train_transform, test_transform)
    elif root is None:
        raise ValueError(f"dataset {name!r} needs a root folder (root=None given)")
    else:
        splits = _LOADERS[name](root, train_transform, test_transform)
    if verbose:
        print(splits.summary())
    return splits
