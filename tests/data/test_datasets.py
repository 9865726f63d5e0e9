"""Tests for plmetric.data.datasets: official layouts, zero-shot splits, bad input, unreadable images."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from plmetric.data.datasets import (
    DATASET_NAMES,
    DatasetSplits,
    ImageDataset,
    SkippedFilesWarning,
    UnreadableImageWarning,
    collate_skip_none,
    find_images,
    load_cars196,
    load_cub200,
    load_dataset,
    load_digits,
    load_labelled_folder,
    load_sop,
    load_unlabelled_folder,
    scan_images,
)
from image_trees import deadline, make_hostile_tree, write_noise_image

TO_TENSOR = transforms.ToTensor()


def write_image(path: Path, value: int = 128, size: tuple[int, int] = (6, 5)) -> Path:
    """Write a small solid-colour RGB image (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}[path.suffix.lower()]
    Image.new("RGB", size, (value, 255 - value, 7)).save(path, format=fmt)
    return path


# ----------------------------------------------------------------------------- real CUB subset


def test_real_cub_subset_counts_and_decoding(cub_root):
    transform = transforms.Compose([transforms.Resize((64, 64)), transforms.ToTensor()])
    splits = load_cub200(cub_root, transform, transform)
    assert (len(splits.train), splits.train.num_classes) == (2949, 50)
    assert (len(splits.test), splits.test.num_classes) == (2953, 50)
    assert set(splits.train.labels.tolist()) == set(range(1, 51))
    assert set(splits.test.labels.tolist()) == set(range(51, 101))
    assert splits.summary() == ("cub200: train 2,949 images / 50 classes | test 2,953 images / 50 classes")
    for i in (0, 1, 1000, 2947, 2948):
        image, label, index = splits.train[i]
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32
        assert (label, index) == (splits.train.labels[i], i)
    assert splits.test[0][1] == 51
    # Root may also be CUB_200_2011 itself.
    assert len(load_cub200(cub_root / "CUB_200_2011").test) == 2953


# ----------------------------------------------------------------------------- tiny CUB


def make_cub(root: Path, classes=(1, 2, 3, 4), per_class: int = 2) -> Path:
    """Write a tiny CUB_200_2011 tree under root; image ids 1..N in class order."""
    base = root / "CUB_200_2011"
    image_lines, label_lines, split_lines, class_lines = [], [], [], []
    image_id = 0
    for c in classes:
        class_lines.append(f"{c} {c:03d}.Bird{c}")
        for k in range(per_class):
            image_id += 1
            rel = f"{c:03d}.Bird{c}/img_{k}.jpg"
            write_image(base / "images" / rel, value=10 * c + k)
            image_lines.append(f"{image_id} {rel}")
            label_lines.append(f"{image_id} {c}")
            split_lines.append(f"{image_id} {k % 2}")
    (base / "images.txt").write_text("\n".join(image_lines) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(label_lines) + "\n")
    (base / "classes.txt").write_text("\n".join(class_lines) + "\n")
    (base / "train_test_split.txt").write_text("\n".join(split_lines) + "\n")
    return base


def test_tiny_cub_split_by_class(tmp_path):
    base = make_cub(tmp_path, classes=(3, 7, 11, 20, 21), per_class=2)
    for root in (tmp_path, base):
        splits = load_cub200(root, test_transform=TO_TENSOR)
        # 5 classes: first 5 // 2 = 2 train, 3 test; official train_test_split.txt ignored.
        assert splits.train.labels.tolist() == [3, 3, 7, 7]
        assert splits.test.labels.tolist() == [11, 11, 20, 20, 21, 21]
        assert Path(splits.test.paths[2]) == base / "images" / "020.Bird20" / "img_0.jpg"
        image, label, index = splits.test[2]
        assert image.shape == (3, 5, 6) and (label, index) == (20, 2)
        assert splits.train.load_image(1).mode == "RGB"
    # Consistent ids with a changed class only move that image to another class.
    labels_txt = base / "image_class_labels.txt"
    labels_txt.write_text(labels_txt.read_text().replace("\n2 3\n", "\n2 21\n"))
    assert load_cub200(tmp_path).test.labels.tolist() == [21, 11, 11, 20, 20, 21, 21]


def test_cub_missing_root_and_index_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="Expected layout") as err:
        load_cub200(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value)
    base = make_cub(tmp_path)
    (base / "images.txt").unlink()
    with pytest.raises(FileNotFoundError) as err:
        load_cub200(tmp_path)
    message = str(err.value)
    assert str(base / "images.txt") in message and "image_class_labels.txt" in message
    assert "CUB_200_2011/" in message  # the layout sketch


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda lines: [lines[1], lines[0]] + lines[2:], r"line 1 has image id 1 but .* line 1 has image id 2"),
        (lambda lines: lines[:2] + ["30 1"] + lines[3:], r"line 3 has image id 3 but .* line 3 has image id 30"),
        (
            lambda lines: lines[:-2],
            r"lists 8 images but image_class_labels.txt lists 6; first unmatched: images.txt line 7, image id 7",
        ),
        (lambda lines: lines + ["9 4"], r"lists 9; first unmatched: image_class_labels.txt line 9, image id 9"),
    ],
    ids=["order", "different-id", "labels-shorter", "labels-longer"],
)
def test_cub_images_and_labels_disagree(tmp_path, edit, expected):
    base = make_cub(tmp_path)
    labels_txt = base / "image_class_labels.txt"
    labels_txt.write_text("\n".join(edit(labels_txt.read_text().splitlines())) + "\n")
    with pytest.raises(ValueError, match=expected):
        load_cub200(tmp_path)


def test_cub_malformed_and_duplicate_lines(tmp_path):
    base = make_cub(tmp_path)
    images_txt = base / "images.txt"
    good = images_txt.read_text()
    images_txt.write_text(good.replace("3 002.Bird2/img_0.jpg", "three 002.Bird2/img_0.jpg"))
    with pytest.raises(ValueError, match=r"images\.txt, line 3: expected 'image_id path'") as err:
        load_cub200(tmp_path)
    assert str(images_txt) in str(err.value)
    images_txt.write_text(good.replace("5 003.Bird3/img_0.jpg", "5"))
    with pytest.raises(ValueError, match=r"line 5: expected"):
        load_cub200(tmp_path)
    images_txt.write_text(good.replace("5 003.Bird3/img_0.jpg", "4 003.Bird3/img_0.jpg"))
    labels_txt = base / "image_class_labels.txt"
    labels_txt.write_text(labels_txt.read_text().replace("5 3\n", "4 3\n"))
    with pytest.raises(ValueError, match=r"images\.txt, line 5: duplicate image id 4"):
        load_cub200(tmp_path)
    (base / "image_class_labels.txt").write_text("1 1\n2 1 extra\n")
    with pytest.raises(ValueError, match=r"image_class_labels\.txt, line 2: expected 'image_id class_id'"):
        load_cub200(tmp_path)


# ----------------------------------------------------------------------------- Cars-196


CARS_FIELDS = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")


def make_cars(root: Path, classes: list[int]) -> Path:
    """Write car_ims/ and a cars_annos.mat shaped like the real one (1xN struct array)."""
    annotations = np.zeros((1, len(classes)), dtype=[(f, "O") for f in CARS_FIELDS])
    for k, c in enumerate(classes):
        rel = f"car_ims/{k + 1:06d}.jpg"
        write_image(root / rel, value=c)
        annotations[0, k] = (rel, 1, 2, 5, 4, np.uint8(c), np.uint8(k % 2))
    class_names = np.array([f"Car {c}" for c in range(1, 5)], dtype=object)
    scipy.io.savemat(root / "cars_annos.mat", {"annotations": annotations, "class_names": class_names})
    return root / "cars_annos.mat"


def test_tiny_cars_matches_real_structure_and_splits(tmp_path):
    mat_path = make_cars(tmp_path, [1, 4, 2, 3, 1, 4])
    raw = scipy.io.loadmat(mat_path)
    assert raw["annotations"].shape == (1, 6) and raw["annotations"].dtype.names == CARS_FIELDS
    splits = load_cars196(tmp_path, TO_TENSOR, TO_TENSOR)
    assert splits.train.labels.tolist() == [1, 2, 1] and splits.test.labels.tolist() == [4, 3, 4]
    assert [Path(p).name for p in splits.train.paths] == ["000001.jpg", "000003.jpg", "000005.jpg"]
    image, label, index = splits.test[1]
    assert image.shape == (3, 5, 6) and (label, index) == (3, 1)
    assert splits.summary() == "cars196: train 3 images / 2 classes | test 3 images / 2 classes"


def test_cars_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cars_annos\.mat not found|not found: .*cars_annos\.mat") as err:
        load_cars196(tmp_path)
    assert "car_ims/" in str(err.value)
    scipy.io.savemat(tmp_path / "cars_annos.mat", {"something": np.zeros(3)})
    with pytest.raises(ValueError, match=r"no 'annotations' variable.*something"):
        load_cars196(tmp_path)
    bad = np.zeros((1, 2), dtype=[("relative_im_path", "O"), ("label", "O")])
    bad[0, 0], bad[0, 1] = ("car_ims/a.jpg", 1), ("car_ims/b.jpg", 2)
    scipy.io.savemat(tmp_path / "cars_annos.mat", {"annotations": bad})
    with pytest.raises(ValueError, match=r"annotation 0: expected fields .*'class'.*label"):
        load_cars196(tmp_path)
    (tmp_path / "cars_annos.mat").write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(ValueError, match=r"cannot read .*cars_annos\.mat"):
        load_cars196(tmp_path)


# ----------------------------------------------------------------------------- SOP


def make_sop(root: Path) -> Path:
    base = root / "Stanford_Online_Products"
    header = "image_id class_id super_class_id path\n"
    rows = {
        "train": [(1, 1, "bicycle_final/a_0.JPG"), (1, 1, "bicycle_final/a_1.jpg"), (2, 2, "chair_final/b_0.jpg")],
        "test": [(5, 1, "bicycle_final/c_0.jpg"), (6, 2, "chair_final/d_0.jpg"), (6, 2, "chair_final/d_1.jpg")],
    }
    image_id = 0
    for split, items in rows.items():
        lines = []
        for class_id, super_id, rel in items:
            image_id += 1
            write_image(base / rel, value=class_id)
            lines.append(f"{image_id} {class_id} {super_id} {rel}")
        (base / f"Ebay_{split}.txt").write_text(header + "\n".join(lines) + "\n")
    return base


def test_tiny_sop_uses_its_own_split(tmp_path):
    base = make_sop(tmp_path)
    for root in (tmp_path, base):
        splits = load_sop(root, TO_TENSOR, TO_TENSOR)
        assert splits.train.labels.tolist() == [1, 1, 2] and splits.test.labels.tolist() == [5, 6, 6]
        assert Path(splits.train.paths[0]) == base / "bicycle_final" / "a_0.JPG"
        image, label, index = splits.test[2]
        assert image.shape == (3, 5, 6) and (label, index) == (6, 2)


def test_sop_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="Ebay_train.txt"):
        load_sop(tmp_path)
    base = make_sop(tmp_path)
    (base / "Ebay_test.txt").unlink()
    with pytest.raises(FileNotFoundError) as err:
        load_sop(tmp_path)
    assert str(base / "Ebay_test.txt") in str(err.value) and "Expected layout" in str(err.value)
    (base / "Ebay_test.txt").write_text("image_id class_id super_class_id path\n1 2 bicycle_final/x.jpg\n")
    with pytest.raises(ValueError, match=r"Ebay_test\.txt, line 2: expected 'image_id class_id super_class_id path'"):
        load_sop(tmp_path)


# ----------------------------------------------------------------------------- folders


def test_labelled_folder_recursive_split(tmp_path):
    write_image(tmp_path / "apple" / "1.png")
    write_image(tmp_path / "apple" / "deep" / "er" / "2.JPG")
    write_image(tmp_path / "banana" / "1.jpeg")
    (tmp_path / "banana" / "notes.txt").write_text("not an image")
    (tmp_path / "empty_class").mkdir()
    write_image(tmp_path / "cherry" / "x.png")
    write_image(tmp_path / "cherry" / "y.PNG")
    write_image(tmp_path / "stray.png")  # not in a class folder: ignored
    splits = load_dataset("folder", tmp_path, TO_TENSOR, TO_TENSOR, verbose=False)
    # Classes with images, sorted: apple=0, banana=1, cherry=2 -> 3 // 2 = 1 train class.
    assert splits.train.labels.tolist() == [0, 0] and splits.test.labels.tolist() == [1, 2, 2]
    assert [Path(p).name for p in splits.train.paths] == ["1.png", "2.JPG"]
    assert [splits.test[i][2] for i in range(3)] == [0, 1, 2]


def test_unlabelled_nested_folder(tmp_path, capsys):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "x" / "b.jpg")
    write_image(tmp_path / "x" / "y" / "z" / "c.JPEG")
    write_image(tmp_path / ".hidden" / "d.png")
    (tmp_path / "x" / "readme.md").write_text("hi")
    splits = load_dataset("images", tmp_path, TO_TENSOR)
    assert splits.test is None and len(splits.train) == 3
    assert splits.train.labels.tolist() == [-1, -1, -1] and splits.train.num_classes == 0
    assert [Path(p).name for p in splits.train.paths] == ["a.png", "b.jpg", "c.JPEG"]
    image, label, index = splits.train[2]
    assert image.shape == (3, 5, 6) and (label, index) == (-1, 2)
    assert f"images:{tmp_path.name}: train 3 images / unlabelled | no test set" in capsys.readouterr().out


def test_empty_folders(tmp_path):
    (tmp_path / "cls_a").mkdir()
    (tmp_path / "cls_a" / "notes.txt").write_text("x")
    for loader in (load_labelled_folder, load_unlabelled_folder):
        with pytest.raises(ValueError, match="holds no images") as err:
            loader(tmp_path)
        assert str(tmp_path) in str(err.value)
        with pytest.raises(FileNotFoundError, match="missing_dir"):
            loader(tmp_path / "missing_dir")
    write_image(tmp_path / "cls_a" / "only.png")
    with pytest.raises(ValueError, match="at least 2 classes, found 1"):
        load_labelled_folder(tmp_path)


# ----------------------------------------------------------------------------- digits


def test_digits():
    splits = load_digits(TO_TENSOR, TO_TENSOR)
    # scikit-learn digits per class: 178 182 177 183 181 | 182 181 179 174 180.
    assert (len(splits.train), len(splits.test)) == (901, 896)
    assert set(splits.train.labels.tolist()) == {0, 1, 2, 3, 4}
    assert set(splits.test.labels.tolist()) == {5, 6, 7, 8, 9}
    assert splits.train.arrays.dtype == np.uint8 and splits.train.arrays.max() == 255
    pil = splits.test.load_image(0)
    assert pil.mode == "RGB" and pil.size == (8, 8)
    image, label, index = splits.test[0]
    assert image.shape == (3, 8, 8) and label >= 5 and index == 0
    assert torch.equal(image[0], image[2])  # grayscale replicated to RGB
    assert load_dataset("digits", None, verbose=False).summary() == (
        "digits: train 901 images / 5 classes | test 896 images / 5 classes"
    )


# ----------------------------------------------------------------------------- dispatcher, dataset


def test_load_dataset_errors():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'") as err:
        load_dataset("mnist", None)
    assert all(name in str(err.value) for name in DATASET_NAMES)
    with pytest.raises(ValueError, match="'cub200' needs a root"):
        load_dataset("cub200", None)


def test_image_dataset_validation():
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        ImageDataset(["a.png", "b.png", "c.png"], [0, 1])
    with pytest.raises(ValueError, match=r"\(N, H, W\) or \(N, H, W, 3\)"):
        ImageDataset(np.zeros((2, 4, 4, 2), dtype=np.uint8), None)
    rgb = ImageDataset(np.zeros((2, 4, 3, 3), dtype=np.uint8), [7, 7], TO_TENSOR)
    assert rgb[1][0].shape == (3, 4, 3) and rgb.num_classes == 1


# ----------------------------------------------------------------------------- unreadable images


def test_corrupt_images_are_skipped_by_loader(tmp_path):
    good = [write_image(tmp_path / f"good{k}.png", value=k) for k in range(3)]
    truncated = write_image(tmp_path / "truncated.jpg", size=(64, 64))
    truncated.write_bytes(truncated.read_bytes()[:200])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG not really" + bytes(range(256)))
    missing = tmp_path / "missing.jpg"
    paths = [good[0], truncated, good[1], garbage, missing, good[2]]
    dataset = ImageDataset(paths, [0, 1, 2, 3, 4, 5], TO_TENSOR, "corrupt")
    with pytest.raises(ValueError, match=r"cannot read image .*truncated\.jpg"):
        dataset.load_image(1)
    loader = DataLoader(dataset, batch_size=2, num_workers=0, collate_fn=collate_skip_none)
    with pytest.warns(UnreadableImageWarning) as record:
        batches = list(loader)
    messages = [str(w.message) for w in record if issubclass(w.category, UnreadableImageWarning)]
    assert len(messages) == 3
    for bad in (truncated, garbage, missing):
        assert sum(str(bad) in m for m in messages) == 1
    assert dataset.skipped == 3
    assert torch.cat([b[2] for b in batches]).tolist() == [0, 2, 5]
    assert torch.cat([b[1] for b in batches]).tolist() == [0, 2, 5]
    assert all(b[0].shape[1:] == (3, 5, 6) for b in batches)
    # A second epoch warns no more (once per file) and does not recount.
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnreadableImageWarning)
        assert len(list(loader)) == 3
    assert dataset.skipped == 3
    # A batch of only unreadable items collates to None.
    all_bad = DataLoader(dataset, batch_size=2, sampler=[1, 3], collate_fn=collate_skip_none)
    assert list(all_bad) == [None]


def test_collate_skip_none_shapes():
    items = [(torch.zeros(3, 2, 2), 4, 0), None, (torch.ones(3, 2, 2), 5, 2)]
    images, labels, indices = collate_skip_none(items)
    assert images.shape == (2, 3, 2, 2) and labels.tolist() == [4, 5] and indices.tolist() == [0, 2]
    assert collate_skip_none([None, None]) is None
    assert isinstance(DatasetSplits("x", ImageDataset([], None), None).summary(), str)


def test_feature_dataset_items_and_errors():
    from plmetric.data.datasets import FeatureDataset

    feats = np.arange(12, dtype=np.float64).reshape(4, 3)
    ds = FeatureDataset(feats, [0, 1, 1, 2], name="f")
    x, label, index = ds[2]
    assert x.dtype == torch.float32 and x.tolist() == [6.0, 7.0, 8.0] and (label, index) == (1, 2)
    assert len(ds) == 4 and ds.num_classes == 3
    assert FeatureDataset(feats, None).num_classes == 0
    with pytest.raises(ValueError, match="labels"):
        FeatureDataset(feats, [0, 1])
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        FeatureDataset(np.zeros(3), None)


def test_unreadable_items_reported_from_workers_are_skipped_without_decoding(tmp_path, monkeypatch):
    """What DataLoader workers found unreadable is told back to the data set (embed_dataset does
    it); from then on those items are skipped without touching the file, also in shallow copies."""
    import copy

    from plmetric.evaluation.metrics import embed_dataset

    good = [write_image(tmp_path / f"g{k}.png", value=k) for k in range(3)]
    bad = tmp_path / "bad.jpg"
    bad.write_text("text, not a JPEG")
    dataset = ImageDataset([good[0], bad, good[1], good[2]], None, TO_TENSOR, "mixed")
    twin = copy.copy(dataset)  # as training.with_transform makes them

    class Mean(torch.nn.Module):
        embedding_dim = 3

        def forward(self, x):
            return x.mean(dim=(2, 3))

    with warnings.catch_warnings():  # the warning is printed in the worker process, out of pytest's reach
        warnings.simplefilter("ignore", UnreadableImageWarning)
        _, _, index = embed_dataset(Mean(), dataset, batch_size=2, num_workers=2)
    assert index.tolist() == [0, 2, 3] and dataset.unreadable == [1] and twin.skipped == 1
    in_process = ImageDataset([good[0], bad], None, TO_TENSOR, "mixed")
    with pytest.warns(UnreadableImageWarning, match=r"skipping unreadable image .*bad\.jpg") as record:
        embed_dataset(Mean(), in_process, batch_size=2, num_workers=0)
    assert "np.str_" not in str(record[0].message) and in_process.unreadable == [1]
    opened = []
    monkeypatch.setattr(ImageDataset, "load_image", lambda self, i: opened.append(i))
    assert twin[1] is None and opened == []
    assert dataset.describe(1) == str(bad) and isinstance(dataset.describe(1), str)


def test_layout_errors_carry_a_one_line_hint(tmp_path):
    from plmetric.data.datasets import DataLayoutError

    with pytest.raises(DataLayoutError, match="CUB-200-2011 root folder not found") as err:
        load_cub200(tmp_path / "nowhere")
    assert "\n" not in err.value.layout_hint and "images.txt" in err.value.layout_hint
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataLayoutError, match="image folder is a file, not a folder"):
        load_unlabelled_folder(tmp_path / "file")


def test_view_feature_dataset_pairs_a_random_augmented_view_with_the_clean_one():
    from plmetric.data.datasets import ViewFeatureDataset, with_transform

    views = torch.arange(3 * 4 * 2, dtype=torch.float16).view(3, 4, 2)  # 3 views of 4 items
    dataset = ViewFeatureDataset(views, [0, 0, 1, 1])
    torch.manual_seed(0)
    seen = set()
    for _ in range(20):
        (student, teacher), label, index = dataset[2]
        assert torch.equal(teacher, views[0, 2].float()) and student.dtype == torch.float32
        seen.add(int(student[0]))
        assert (label, index) == (1, 2)
    assert seen == {int(views[1, 2, 0]), int(views[2, 2, 0])}  # only the augmented views, both of them
    clean = with_transform(dataset, None)
    assert torch.equal(clean[1][0], views[0, 1].float()) and dataset.num_classes == 2
    with pytest.raises(ValueError, match="views must be a float"):
        ViewFeatureDataset(torch.zeros(3, 4, dtype=torch.int64), None)


# ----------------------------------------------------------------------------- the folder walk

needs_posix_links = pytest.mark.skipif(
    not hasattr(os, "mkfifo") or not hasattr(os, "symlink"), reason="POSIX links and FIFOs"
)


def test_the_walk_lists_top_down_sorted_and_skips_hidden_entries(tmp_path):
    rng = np.random.default_rng(0)
    for rel in ("b.jpg", "A.PNG", "z/1.jpg", "z/y/2.webp", "c/3.jpeg", ".h/4.jpg", "z/.5.jpg", "notes.txt"):
        write_noise_image(tmp_path / rel, 1, rng)
    expected = ["A.PNG", "b.jpg", "c/3.jpeg", "z/1.jpg", "z/y/2.webp"]  # a folder's files, then its sub-folders'
    with warnings.catch_warnings():
        warnings.simplefilter("error", SkippedFilesWarning)  # nothing hostile: nothing to name
        assert [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)] == expected


@needs_posix_links
def test_the_walk_survives_cycles_self_links_and_fifos_and_lists_each_image_once(tmp_path):
    images, hostile = make_hostile_tree(tmp_path, np.random.default_rng(0))
    with deadline(30), pytest.warns(SkippedFilesWarning) as record:
        found = find_images(tmp_path)
    assert found == images
    messages = [str(w.message) for w in record if issubclass(w.category, SkippedFilesWarning)]
    assert len(messages) == 1  # one line for the whole walk
    assert "left out 6 entries" in messages[0]
    for name in ("fifo.jpg", "broken.jpg", "twin.jpg", "self", "again", "a/b/up"):
        assert name in messages[0], name
    scan = scan_images(tmp_path)
    assert {reason: sorted(p.name for p in entries) for reason, entries in scan.skipped.items()} == {
        "not regular files": ["fifo.jpg"],
        "broken links or entries that cannot be read": ["broken.jpg"],
        "links to a file listed under another name": ["twin.jpg"],
        "folders reached again through a link": ["again", "self", "up"],
    }


@needs_posix_links
def test_loaders_walk_hostile_folders_once(tmp_path):
    rng = np.random.default_rng(0)
    images, _ = make_hostile_tree(tmp_path / "pile", rng)
    with deadline(30), pytest.warns(SkippedFilesWarning):
        splits = load_unlabelled_folder(tmp_path / "pile")
    assert list(splits.train.paths) == [str(p) for p in images]

    labelled = tmp_path / "labelled"
    a = [write_noise_image(labelled / "cls_a" / f"{k}.jpg", 1, rng) for k in range(2)]
    b = [write_noise_image(labelled / "cls_b" / f"{k}.jpg", 2, rng) for k in range(2)]
    d = [write_noise_image(labelled / "cls_d" / "sub" / "0.jpg", 3, rng)]
    (labelled / "cls_a" / "root").symlink_to("..", target_is_directory=True)  # back to the root
    (labelled / "cls_b" / "to_d").symlink_to(Path("..") / "cls_d", target_is_directory=True)  # into another class
    (labelled / "cls_c").symlink_to("cls_b", target_is_directory=True)  # a class folder twice
    (labelled / "loop").symlink_to(".", target_is_directory=True)  # the root as a class
    os.mkfifo(labelled / "cls_d" / "fifo.jpg")
    with deadline(30), pytest.warns(SkippedFilesWarning) as record:
        splits = load_labelled_folder(labelled)
    paths = [*splits.train.paths, *splits.test.paths]
    assert sorted(paths) == sorted(str(p) for p in a + b + d)  # each image once, in its own class only
    assert len(set(paths)) == len(paths)
    messages = [str(w.message) for w in record if issubclass(w.category, SkippedFilesWarning)]
    assert len(messages) == 1
    reached_again = "folders reached again through a link: 4 (cls_c, loop, cls_a/root, +1 more)"
    assert f"left out 5 entries: {reached_again}" in messages[0]
    assert "not regular files: 1 (cls_d/fifo.jpg)" in messages[0]  # cls_b/to_d is the "+1 more"


def test_too_large_images_in_a_folder_are_skipped_and_named(tmp_path, monkeypatch):
    from plmetric.data import images

    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100)
    write_image(tmp_path / "small.png", size=(10, 10))
    write_image(tmp_path / "large.png", size=(11, 10))
    dataset = load_unlabelled_folder(tmp_path, TO_TENSOR).train
    with pytest.warns(UnreadableImageWarning, match=r"large\.png .*too large to decode: 11 x 10 = 110 pixels"):
        items = [dataset[i] for i in range(len(dataset))]
    assert [item is None for item in items] == [True, False]  # large.png, small.png
    assert dataset.unreadable == [0]
