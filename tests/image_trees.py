"""Small on-disk image trees in every supported layout, with unreadable files planted in them.

Images are 16x16 class-coloured noise (readable by any backbone transform at a small size). The
three kinds of unreadable file a user's folder really holds: a zero-byte ``.jpg``, a truncated
JPEG and a text file named ``.jpg``.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

BAD_KINDS = ("zero", "truncated", "text")


def write_noise_image(path: Path, colour: int, rng: np.random.Generator, size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    base = np.array([colour * 37 % 256, colour * 91 % 256, colour * 53 % 256], dtype=float)
    pixels = np.clip(base + rng.normal(0, 30, size=(size, size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)
    return path


def write_bad_image(path: Path, kind: str) -> Path:
    """Overwrite ``path`` with an unreadable file of the given kind (see :data:`BAD_KINDS`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "zero":
        path.write_bytes(b"")
    elif kind == "truncated":
        buffer = Path(str(path) + ".full.jpg")
        write_noise_image(buffer, 3, np.random.default_rng(0), size=64)
        data = buffer.read_bytes()
        buffer.unlink()
        path.write_bytes(data[: len(data) // 3])
    elif kind == "text":
        path.write_text("this is a text file, not a JPEG\n")
    else:
        raise ValueError(kind)
    return path


def _items(classes: int, per_class: int) -> list[tuple[int, int]]:
    return [(c, k) for c in range(1, classes + 1) for k in range(per_class)]


def make_tree(layout: str, root: Path, *, classes: int = 8, per_class: int = 8, bad: int = 3, seed: int = 0):
    """Write a tree in ``layout`` (cub200, cars196, sop, folder, images) under ``root``.

    The first ``bad`` images of the *training* half (classes 1 .. classes/2; SOP: its train file)
    are replaced by unreadable files, one of each kind in turn.

    Returns:
        ``(root, bad_paths)``: the data set root to give the loader and the unreadable files.
    """
    rng = np.random.default_rng(seed)
    items = _items(classes, per_class)
    train_classes = classes // 2
    bad_paths: list[Path] = []

    def image(path: Path, c: int) -> Path:
        write_noise_image(path, c, rng)
        if c <= train_classes and len(bad_paths) < bad:
            write_bad_image(path, BAD_KINDS[len(bad_paths) % len(BAD_KINDS)])
            bad_paths.append(path)
        return path

    if layout == "cub200":
        base = root / "CUB_200_2011"
        images, labels = [], []
        for n, (c, k) in enumerate(items, start=1):
            rel = f"{c:03d}.Bird{c}/img_{k}.jpg"
            image(base / "images" / rel, c)
            images.append(f"{n} {rel}")
            labels.append(f"{n} {c}")
        (base / "images.txt").write_text("\n".join(images) + "\n")
        (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
        (base / "classes.txt").write_text("\n".join(f"{c} {c:03d}.Bird{c}" for c in range(1, classes + 1)) + "\n")
        return root, bad_paths
    if layout == "cars196":
        fields = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")
        annotations = np.zeros((1, len(items)), dtype=[(f, "O") for f in fields])
        for n, (c, _) in enumerate(items):
            rel = f"car_ims/{n + 1:06d}.jpg"
            image(root / rel, c)
            annotations[0, n] = (rel, 1, 1, 15, 15, np.uint8(c), np.uint8(n % 2))
        scipy.io.savemat(root / "cars_annos.mat", {"annotations": annotations})
        return root, bad_paths
    if layout == "sop":
        base = root / "Stanford_Online_Products"
        header = "image_id class_id super_class_id path\n"
        n = 0
        for split, wanted in (("train", range(1, train_classes + 1)), ("test", range(train_classes + 1, classes + 1))):
            lines = []
            for c, k in items:
                if c in wanted:
                    n += 1
                    rel = f"thing{c}_final/{c}_{k}.JPG"
                    image(base / rel, c)
                    lines.append(f"{n} {c} 1 {rel}")
            (base / f"Ebay_{split}.txt").write_text(header + "\n".join(lines) + "\n")
        return root, bad_paths
    if layout in ("folder", "images"):
        for c, k in items:
            image(root / f"class_{c:02d}" / f"img_{k}.jpg", c)
        return root, bad_paths
    raise ValueError(layout)


# ----------------------------------------------------------------------------- hostile folders


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail with TimeoutError (instead of hanging the suite) when the body runs over ``seconds``.

    SIGALRM interrupts a blocking ``open`` of a FIFO as well as a Python loop (POSIX, main thread)."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s: it hangs")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def make_hostile_tree(root: Path, rng: np.random.Generator) -> tuple[list[Path], dict[str, Path]]:
    """A folder a careless walk hangs in or lists images of many times (POSIX: links and a FIFO).

    ``root/a/1.jpg``, ``root/a/b/2.jpg`` are the only images; beside them: ``a/b/up -> ../..`` (a
    cycle back to the root), ``self -> .`` (a self-link), ``again -> a`` (a second way into ``a``),
    ``fifo.jpg`` (a FIFO: opening it would wait for a writer forever), ``twin.jpg -> a/1.jpg`` (a
    second name of a listed file), ``broken.jpg -> nowhere.jpg`` and ``.hidden/3.jpg``.

    Returns:
        ``(images, hostile)``: the image paths a walk must list (once each, in this order) and the
        hostile entries by name.
    """
    images = [write_noise_image(root / "a" / "1.jpg", 1, rng), write_noise_image(root / "a" / "b" / "2.jpg", 2, rng)]
    write_noise_image(root / ".hidden" / "3.jpg", 3, rng)
    hostile = {
        "up": root / "a" / "b" / "up",
        "self": root / "self",
        "again": root / "again",
        "fifo.jpg": root / "fifo.jpg",
        "twin.jpg": root / "twin.jpg",
        "broken.jpg": root / "broken.jpg",
    }
    hostile["up"].symlink_to(Path("..") / "..", target_is_directory=True)
    hostile["self"].symlink_to(".", target_is_directory=True)
    hostile["again"].symlink_to("a", target_is_directory=True)
    os.mkfifo(hostile["fifo.jpg"])
    hostile["twin.jpg"].symlink_to(Path("a") / "1.jpg")
    hostile["broken.jpg"].symlink_to("nowhere.jpg")
    return images, hostile
