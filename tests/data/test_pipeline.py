"""Tests for plmetric.data.pipeline: the uint8 image cache, crop sampling, device augmentation, the loader."""

from __future__ import annotations

import math
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as TF

from plmetric.data.datasets import ImageDataset, UnreadableImageWarning
from plmetric.data.backbones import backbone_spec, build_transform
from plmetric.data.pipeline import (
    MAX_BYTES_ENV,
    CachedBatchLoader,
    CacheFallbackWarning,
    CacheTooLargeError,
    DeviceAugment,
    ImageCache,
    cached_or_streaming,
    default_cache_size,
    resized_shape,
    resolve_max_bytes,
    sample_crop_params,
)

S = 32  # network input side
CACHE = default_cache_size(S)  # 37, the eval resize
BACKBONE = "efficientnet_lite0"  # mean = std = 0.5: normalised pixels lie in [-1, 1]
SPEC = backbone_spec(BACKBONE)


def _pixels(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth gradients plus texture and noise: natural-ish, with detail for the resampling to disagree on."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack(
        [127 + 100 * np.sin(x / (3 + c) + y / (5 + 2 * c) + seed) + rng.normal(0, 12, (h, w)) for c in range(3)],
        axis=-1,
    )
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture
def image_set(tmp_path: Path) -> ImageDataset:
    """Six images: JPEG/PNG, RGB/grayscale/RGBA, portrait/landscape/square; item 3 is corrupt."""
    specs = [  # name, (h, w), mode
        ("a.jpg", (48, 64), "RGB"),
        ("b.png", (70, 50), "L"),
        ("c.png", (40, 40), "RGBA"),
        ("bad.jpg", None, None),
        ("e.jpg", (30, 90), "RGB"),
        ("f.png", (37, 52), "RGB"),  # shorter side already the cache size
    ]
    paths = []
    for k, (name, size, mode) in enumerate(specs):
        path = tmp_path / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if size is None:
            path.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG" + bytes(range(256)))
        else:
            image = Image.fromarray(_pixels(*size, seed=k))
            image = image.convert(mode) if mode != "RGB" else image
            if name.endswith(".jpg"):
                image.save(path, quality=95)
            else:
                image.save(path)
        paths.append(path)
    return ImageDataset(paths, [10, 11, 12, 13, 14, 15], name="synthetic")


def build_cache(dataset: ImageDataset, **kwargs) -> ImageCache:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableImageWarning)
        return ImageCache.build(
            dataset, kwargs.pop("cache_size", CACHE), num_workers=kwargs.pop("num_workers", 0), **kwargs
        )


def pil_of(tensor: torch.Tensor) -> Image.Image:
    return Image.fromarray(tensor.permute(1, 2, 0).contiguous().numpy())


NORMALISE = transforms.Compose([transforms.ToTensor(), transforms.Normalize(SPEC.mean, SPEC.std)])


# ----------------------------------------------------------------------------- the cache


def test_cache_contents_missing_mask_and_single_warning(image_set):
    with pytest.warns(UnreadableImageWarning, match="bad.jpg") as record:
        cache = ImageCache.build(image_set, CACHE, num_workers=2)
    assert len([w for w in record if issubclass(w.category, UnreadableImageWarning)]) == 1
    assert cache.missing.tolist() == [False, False, False, True, False, False]
    assert cache.labels.tolist() == image_set.labels.tolist()
    for i in np.flatnonzero(~cache.missing):
        expected = np.asarray(TF.resize(image_set.load_image(int(i)), [CACHE]))  # transforms.Resize(CACHE)
        got = cache.get(int(i))
        assert got.dtype == torch.uint8 and got.shape == (3, *expected.shape[:2])
        assert min(got.shape[1:]) == CACHE
        assert tuple(got.shape[1:]) == resized_shape(*image_set.load_image(int(i)).size[::-1], CACHE)
        np.testing.assert_array_equal(got.permute(1, 2, 0).numpy(), expected)
    with pytest.raises(KeyError, match="missing"):
        cache.get(3)
    assert cache.nbytes == sum(3 * h * w for h, w in cache.shapes)
    assert "1 missing" in repr(cache)


def test_cache_from_in_memory_arrays():
    arrays = np.stack([_pixels(20, 30, seed=s)[..., 0] for s in range(3)])  # grayscale (N, H, W)
    dataset = ImageDataset(arrays, [0, 1, 2], name="mem")
    cache = build_cache(dataset, cache_size=12)
    assert not cache.missing.any()
    for i in range(3):
        expected = np.asarray(TF.resize(dataset.load_image(i), [12]))
        np.testing.assert_array_equal(cache.get(i).permute(1, 2, 0).numpy(), expected)


def test_memmap_round_trip_atomic_files_and_reuse(image_set, tmp_path, monkeypatch):
    in_memory = build_cache(image_set)
    path = tmp_path / "cache" / "train.npy"
    on_disk = build_cache(image_set, path=path, num_workers=2)
    assert on_disk.path == path and isinstance(on_disk.data, np.memmap)
    assert sorted(p.name for p in path.parent.iterdir()) == ["train.npy", "train.npy.meta.npz"]  # no temp files
    loaded = ImageCache.load(path)
    for cache in (on_disk, loaded):
        np.testing.assert_array_equal(cache.missing, in_memory.missing)
        np.testing.assert_array_equal(cache.shapes, in_memory.shapes)
        np.testing.assert_array_equal(cache.labels, in_memory.labels)
        for i in np.flatnonzero(~in_memory.missing):
            assert torch.equal(cache.get(int(i)), in_memory.get(int(i)))
    # A second build with the same files reuses the file without decoding anything ...
    monkeypatch.setattr(image_set, "load_image", lambda i: (_ for _ in ()).throw(AssertionError("decoded")))
    with pytest.warns(UnreadableImageWarning, match="bad.jpg"):  # the missing image is still reported
        reused = ImageCache.build(image_set, CACHE, path=path)
    assert torch.equal(reused.get(0), in_memory.get(0))
    np.testing.assert_array_equal(reused.missing, in_memory.missing)
    # ... but another cache size does not.
    with pytest.raises(AssertionError, match="decoded"):
        build_cache(image_set, path=path, cache_size=CACHE + 1)
    assert sorted(p.name for p in path.parent.iterdir()) == ["train.npy", "train.npy.meta.npz"]  # cleaned up


def test_too_large_falls_back_to_streaming_with_a_warning(image_set, monkeypatch):
    with pytest.raises(CacheTooLargeError) as info:
        build_cache(image_set, max_bytes=1000)
    assert info.value.max_bytes == 1000 and info.value.estimated_bytes > 1000
    with pytest.warns(CacheFallbackWarning, match=r"max_bytes=1,000 bytes.*PLMETRIC_CACHE_MAX_BYTES"):
        assert cached_or_streaming(image_set, S, max_bytes=1000, num_workers=0) is None
    monkeypatch.setenv(MAX_BYTES_ENV, "1K")
    assert resolve_max_bytes() == 1024
    with pytest.warns(CacheFallbackWarning, match=r"max_bytes=1,024 bytes"):
        assert cached_or_streaming(image_set, cache_size=CACHE, num_workers=0) is None
    monkeypatch.setenv(MAX_BYTES_ENV, "1M")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableImageWarning)
        assert isinstance(cached_or_streaming(image_set, S, num_workers=0), ImageCache)
    assert resolve_max_bytes("16GiB") == 16 * 2**30 and resolve_max_bytes(5) == 5
    with pytest.raises(ValueError, match="not a size"):
        resolve_max_bytes("lots")


def test_quick_estimate_rejects_before_a_full_scan(monkeypatch):
    arrays = np.zeros((600, 50, 40), dtype=np.uint8)
    dataset = ImageDataset(arrays, None, name="many")
    expected = 600 * 3 * math.prod(resized_shape(50, 40, CACHE))
    with pytest.raises(CacheTooLargeError, match="about") as info:
        ImageCache.build(dataset, CACHE, max_bytes=expected - 1, num_workers=0)
    assert info.value.estimated_bytes == expected


# ----------------------------------------------------------------------------- crop sampling


def _fallback_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's fallback after 10 failed tries: the centre crop clamped to the ratio range."""
    if width / height < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif width / height > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def test_crop_sampler_bounds_distribution_and_determinism():
    scale, ratio = (0.16, 1.0), (3 / 4, 4 / 3)
    n = 4000
    heights = torch.randint(20, 200, (n,))
    widths = torch.randint(20, 200, (n,))
    boxes = sample_crop_params(heights, widths, scale, ratio, torch.Generator().manual_seed(1))
    top, left, h, w = boxes.T
    assert boxes.dtype == torch.int64 and boxes.shape == (n, 4)
    assert bool(((top >= 0) & (left >= 0) & (h > 0) & (w > 0)).all())
    assert bool(((top + h <= heights) & (left + w <= widths)).all())
    # Non-fallback draws: area and aspect ratio in range, up to the rounding of h and w to integers.
    fallback_boxes = torch.tensor(
        [_fallback_box(int(hh), int(ww), ratio) for hh, ww in zip(heights, widths, strict=True)]
    )
    drawn = (boxes != fallback_boxes).any(dim=1)
    assert drawn.float().mean() > 0.9
    area_frac = (h * w).double() / (heights * widths).double()
    side = torch.sqrt((heights * widths).double())
    slack = 2 / side + 1 / side**2  # (sqrt(A f) + 0.5)^2 / A - f, loosely
    assert bool((area_frac[drawn] >= scale[0] - 2 * slack[drawn]).all())
    assert bool((area_frac[drawn] <= scale[1] + 2 * slack[drawn]).all())
    aspect = w.double() / h.double()
    tol = 1.0 / torch.minimum(h, w).double()  # relative rounding of w / h
    assert bool((aspect[drawn] >= ratio[0] * (1 - 2 * tol[drawn])).all())
    assert bool((aspect[drawn] <= ratio[1] * (1 + 2 * tol[drawn])).all())
    # Same seed, same boxes.
    again = sample_crop_params(heights, widths, scale, ratio, torch.Generator().manual_seed(1))
    assert torch.equal(boxes, again)
    assert not torch.equal(boxes, sample_crop_params(heights, widths, scale, ratio, torch.Generator().manual_seed(2)))


def test_crop_sampler_matches_torchvision_distribution():
    h_img, w_img, n = 60, 90, 3000
    scale, ratio = (0.16, 1.0), (3 / 4, 4 / 3)
    torch.manual_seed(0)
    image = torch.zeros(1, h_img, w_img)
    ref = torch.tensor([transforms.RandomResizedCrop.get_params(image, scale, ratio) for _ in range(n)]).double()
    ours = sample_crop_params(
        torch.full((n,), h_img), torch.full((n,), w_img), scale, ratio, torch.Generator().manual_seed(3)
    ).double()
    for stats in (
        lambda b: (b[:, 2] * b[:, 3]) / (h_img * w_img),  # relative area
        lambda b: torch.log(b[:, 3] / b[:, 2]),  # log aspect
        lambda b: b[:, 0] / h_img,  # top
        lambda b: b[:, 1] / w_img,  # left
        lambda b: (b[:, 3] == w_img).double(),  # full width (often the fallback or a clipped draw)
    ):
        a, b = stats(ref), stats(ours)
        se = math.sqrt(a.var().item() / n + b.var().item() / n)
        assert abs(a.mean().item() - b.mean().item()) < 4 * se + 1e-9
        assert abs(a.std().item() - b.std().item()) < 0.1 * a.std().item() + 1e-9


def test_crop_sampler_fallback_equals_torchvision():
    for h_img, w_img in ((10, 1000), (1000, 10), (5, 5)):
        image = torch.zeros(1, h_img, w_img)
        scale = (0.9, 1.0) if h_img != w_img else (2.0, 3.0)  # every try fails
        expected = transforms.RandomResizedCrop.get_params(image, scale, (3 / 4, 4 / 3))
        got = sample_crop_params(h_img, w_img, scale, (3 / 4, 4 / 3))
        assert tuple(got[0].tolist()) == expected


# ----------------------------------------------------------------------------- device augmentation


@pytest.mark.parametrize("uint8_resize", [True, False])
def test_train_augment_matches_pil_for_the_same_crops(image_set, uint8_resize):
    cache = build_cache(image_set)
    augment = DeviceAugment.from_backbone(BACKBONE, S, train=True, crop_scale_min=0.16)
    augment.uint8_resize = uint8_resize
    gen = torch.Generator().manual_seed(0)
    diffs = []
    for i in np.flatnonzero(~cache.missing):
        img = cache.get(int(i))
        boxes, flips = augment.sample_params([img.shape[1]] * 6, [img.shape[2]] * 6, gen)
        boxes[0] = torch.tensor([0, 0, img.shape[1], img.shape[2]])  # whole image
        flips[:2] = torch.tensor([True, False])
        got = augment([img] * 6, boxes, flips)
        assert got.shape == (6, 3, S, S) and got.dtype == torch.float32 and got.is_contiguous()
        for b in range(6):
            top, left, h, w = boxes[b].tolist()
            crop = TF.resized_crop(pil_of(img), top, left, h, w, [S, S])
            expected = NORMALISE(TF.hflip(crop) if flips[b] else crop)
            diffs.append((got[b] - expected).abs())
    diffs = torch.stack(diffs)
    max_diff, mean_diff = diffs.max().item(), diffs.mean().item()
    print(f"train, uint8_resize={uint8_resize}: max |diff| {max_diff:.4f}, mean |diff| {mean_diff:.5f}")
    assert max_diff < 0.05 and mean_diff < 0.01
    if uint8_resize:  # the CPU uint8 kernel is Pillow's: off by at most one level, rarely
        assert max_diff <= 2 / 255 + 1e-6 and mean_diff < 0.001


def test_train_augment_draws_its_own_params_when_not_given(image_set):
    cache = build_cache(image_set)
    augment = DeviceAugment.from_backbone(BACKBONE, S, train=True)
    images = [cache.get(int(i)) for i in np.flatnonzero(~cache.missing)]
    a = augment(images, generator=torch.Generator().manual_seed(5))
    b = augment(images, generator=torch.Generator().manual_seed(5))
    assert a.shape == (len(images), 3, S, S) and torch.equal(a, b)
    assert a.min() >= -1.0 and a.max() <= 1.0
    assert augment([]).shape == (0, 3, S, S)


@pytest.mark.parametrize("uint8_resize", [True, False])
def test_eval_augment_matches_build_transform(image_set, uint8_resize):
    cache = build_cache(image_set)  # cache size == eval resize: the device only centre-crops
    augment = DeviceAugment.from_backbone(BACKBONE, S, train=False)
    augment.uint8_resize = uint8_resize
    reference = build_transform(BACKBONE, S, train=False)
    keep = [int(i) for i in np.flatnonzero(~cache.missing)]
    got = augment([cache.get(i) for i in keep])
    expected = torch.stack([reference(image_set.load_image(i)) for i in keep])
    assert got.shape == expected.shape == (len(keep), 3, S, S)
    max_diff = (got - expected).abs().max().item()
    print(f"eval, uint8_resize={uint8_resize}: max |diff| {max_diff:.2e}")
    assert max_diff < 1e-5


def test_eval_augment_from_a_larger_cache_is_close(image_set):
    cache = build_cache(image_set, cache_size=2 * CACHE)  # the device resizes again: close, not equal
    augment = DeviceAugment.from_backbone(BACKBONE, S, train=False)
    reference = build_transform(BACKBONE, S, train=False)
    keep = [int(i) for i in np.flatnonzero(~cache.missing)]
    diff = (
        augment([cache.get(i) for i in keep]) - torch.stack([reference(image_set.load_image(i)) for i in keep])
    ).abs()
    print(f"eval from a 2x cache: max |diff| {diff.max().item():.4f}, mean |diff| {diff.mean().item():.5f}")
    assert diff.mean().item() < 0.03


def test_eval_augment_of_the_whole_rule_resizes_the_whole_cached_image(image_set):
    """``data.eval_resize=whole`` on the decode-once cache: the cached image (shorter side
    ``round(S * 256 / 224)``) resized whole to ``S x S``; a resize of a resize, so close to the PIL
    transform's ``Resize((S, S))`` of the original (the same bound as a larger cache above), and far
    from the centre crop on the wide and tall images."""
    cache = build_cache(image_set)
    augment = DeviceAugment.from_backbone(BACKBONE, S, train=False, eval_resize="whole")
    keep = [int(i) for i in np.flatnonzero(~cache.missing)]
    got = augment([cache.get(i) for i in keep])
    whole = build_transform(BACKBONE, S, train=False, eval_resize="whole")
    crop = build_transform(BACKBONE, S, train=False)
    to_whole = (got - torch.stack([whole(image_set.load_image(i)) for i in keep])).abs().mean().item()
    to_crop = (got - torch.stack([crop(image_set.load_image(i)) for i in keep])).abs().mean().item()
    print(f"eval whole from the cache: mean |diff| {to_whole:.4f} to Resize((S, S)), {to_crop:.4f} to the crop")
    assert got.shape == (len(keep), 3, S, S) and to_whole < 0.03 and to_crop > 3 * to_whole
    with pytest.raises(ValueError, match="eval_rule must be center_crop or whole"):
        DeviceAugment.from_backbone(BACKBONE, S, train=False, eval_resize="stretch")


# ----------------------------------------------------------------------------- the loader


@pytest.mark.parametrize("prefetch", [0, 2])
def test_loader_order_labels_missing_and_empty_batches(image_set, prefetch):
    cache = build_cache(image_set)
    batches = [[5, 0, 2], [3], [1, 3, 4], [0, 0]]  # item 3 is unreadable
    augment = DeviceAugment.from_backbone(BACKBONE, S, train=True)
    loader = CachedBatchLoader(cache, batches, augment, "cpu", prefetch=prefetch)
    assert len(loader) == 4
    out = list(loader)
    assert out[1] is None
    expected = [[5, 0, 2], None, [1, 4], [0, 0]]
    for got, want in zip(out, expected, strict=True):
        if want is None:
            continue
        images, labels, index = got
        assert index.tolist() == want
        assert labels.tolist() == image_set.labels[want].tolist()
        assert images.shape == (len(want), 3, S, S) and images.dtype == torch.float32
        assert images.abs().max() <= 1.0
    # Seeded: the same global seed gives the same crops, as with a DataLoader.
    torch.manual_seed(7)
    first = list(loader)[0][0]
    torch.manual_seed(7)
    assert torch.equal(first, list(loader)[0][0])


def test_loader_eval_equals_the_transform_and_streaming_path(image_set):
    cache = build_cache(image_set)
    augment = DeviceAugment.from_backbone(BACKBONE, S, train=False)
    reference = build_transform(BACKBONE, S, train=False)
    images, labels, index = next(iter(CachedBatchLoader(cache, [[4, 1, 3, 0]], augment)))
    assert index.tolist() == [4, 1, 0]
    expected = torch.stack([reference(image_set.load_image(i)) for i in (4, 1, 0)])
    assert (images - expected).abs().max().item() < 1e-5


def test_loader_train_equals_augment_on_the_same_draws(image_set):
    cache = build_cache(image_set)
    augment = DeviceAugment.from_backbone(BACKBONE, S, train=True)
    images, _, index = next(
        iter(CachedBatchLoader(cache, [[0, 4, 5]], augment, generator=torch.Generator().manual_seed(9)))
    )
    shapes = torch.from_numpy(cache.shapes[[0, 4, 5]])
    boxes, flips = augment.sample_params(shapes[:, 0], shapes[:, 1], torch.Generator().manual_seed(9))
    expected = augment([cache.get(i) for i in (0, 4, 5)], boxes, flips)
    assert torch.equal(images, expected)


def test_loader_errors_propagate_and_early_stop_ends_the_thread(image_set):
    cache = build_cache(image_set)
    augment = DeviceAugment.from_backbone(BACKBONE, S, train=True)
    with pytest.raises(IndexError, match="out of range"):
        list(CachedBatchLoader(cache, [[0], [99]], augment))
    before = threading.active_count()
    it = iter(CachedBatchLoader(cache, [[0, 1]] * 50, augment, prefetch=2))
    next(it)
    it.close()
    assert threading.active_count() == before


def test_loader_staged_path_equals_the_in_thread_path(image_set):
    """The accelerator path (crops packed into one buffer, augmented by the consumer), run on the CPU."""
    cache = build_cache(image_set)
    for train in (True, False):
        augment = DeviceAugment.from_backbone(BACKBONE, S, train=train)
        outputs = []
        for in_thread in (True, False):
            loader = CachedBatchLoader(cache, [[0, 4, 3], [5, 1]], augment, generator=torch.Generator().manual_seed(4))
            loader._augment_in_thread = in_thread
            outputs.append(list(loader))
        for a, b in zip(*outputs, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_teacher_view_is_the_eval_transform_of_the_same_images(tmp_path):
    from plmetric.data.datasets import ImageDataset
    from plmetric.data.pipeline import CachedBatchLoader, DeviceAugment, ImageCache

    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 256, size=(6, 20, 24, 3), dtype=np.uint8)
    dataset = ImageDataset(arrays, np.arange(6))
    cache = ImageCache.build(dataset, 14, num_workers=0)
    train_aug = DeviceAugment(12, (0.5,) * 3, (0.5,) * 3, train=True)
    eval_aug = DeviceAugment(12, (0.5,) * 3, (0.5,) * 3, train=False)
    batches = [[0, 1, 2], [3, 4, 5]]
    paired = list(CachedBatchLoader(cache, batches, train_aug, teacher_augment=eval_aug, prefetch=0))
    alone = list(CachedBatchLoader(cache, batches, eval_aug, prefetch=0))
    for (views, labels, index), (eval_images, eval_labels, eval_index) in zip(paired, alone, strict=True):
        student, teacher = views
        assert student.shape == teacher.shape == (3, 3, 12, 12)
        assert torch.equal(teacher, eval_images) and torch.equal(index, eval_index)
        assert torch.equal(labels, eval_labels)
        assert not torch.equal(student, teacher)


def test_the_cache_holds_exif_rotated_images_upright_and_reloads_them(tmp_path):
    """The header gives the stored size; Orientation 6 and 8 swap it. The cache keeps the decoded
    (upright) shape, in memory and in the file it reloads from."""
    paths = []
    for k, orientation in enumerate((6, 1, 8)):
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = tmp_path / f"o{orientation}.png"
        Image.fromarray(_pixels(45, 80, seed=k)).save(path, exif=exif)  # stored landscape
        paths.append(path)
    dataset = ImageDataset(paths, [0, 1, 2], name="turned")
    file = tmp_path / "cache.npy"
    for cache in (ImageCache.build(dataset, CACHE, path=file, num_workers=2), ImageCache.load(file)):
        assert not cache.missing.any()
        for i, upright in enumerate((True, False, True)):
            expected = np.asarray(TF.resize(dataset.load_image(i), [CACHE]))
            got = cache.get(i).permute(1, 2, 0).numpy()
            assert (got.shape[0] > got.shape[1]) == upright  # portrait once turned
            np.testing.assert_array_equal(got, expected)
