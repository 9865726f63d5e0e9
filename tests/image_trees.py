"""Small on-disk image trees in every supported layout, with unreadable files planted in them.

Images are 16x16 class-coloured noise (readable by any backbone transform at a small size). The
three kinds of unreadable file a user's folder really holds: a zero-byte ``.jpg``, a truncated
JPEG and a text file named ``.jpg``.
"""

from __future__ import annotations

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
