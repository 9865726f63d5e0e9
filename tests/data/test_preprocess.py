"""The torch-free eval preprocessing (plmetric.data.preprocess) against the eval transform of
plmetric.data.backbones.build_transform (torchvision) on real photos of odd sizes, and its checks of a
recorded preprocessing.

Bound: the port makes the same Pillow resize call on the same 8-bit image, the same crop, and then the
same two float32 operations per value (``/ 255``, then ``- mean`` and ``/ std``, each correctly rounded
in IEEE arithmetic, in torch and in NumPy alike): the inputs are equal bit for bit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from plmetric.data.backbones import build_transform
from plmetric.data.preprocess import EvalPreprocessing, eval_input, resized_size
from plmetric.retrieval.index import preprocessing

# (width, height): narrower and wider than tall by an odd amount, one pixel off square, a sliver whose
# longer side truncates (1000 * 256 / 3 = 85333.3), and a size whose crop offset is a half (round to even)
ODD_SIZES = [(69, 61), (61, 69), (225, 224), (1000, 3), (257, 300), (333, 251)]


def _real_photos(cub_root: Path, folder: Path) -> list[Path]:
    """CUB photos as they are, and cut and scaled to odd sizes (saved losslessly)."""
    species = sorted((cub_root / "CUB_200_2011" / "images").iterdir())
    originals = [sorted(s.iterdir())[0] for s in species[:3]]
    folder.mkdir()
    out = list(originals)
    for n, (w, h) in enumerate(ODD_SIZES):
        with Image.open(originals[n % len(originals)]) as img:
            rgb = img.convert("RGB")
            box = (n, 2 * n, min(rgb.width, n + max(w, 8)), min(rgb.height, 2 * n + max(h, 8)))
            piece = rgb.crop(box).resize((w, h), Image.Resampling.BILINEAR)
        out.append(folder / f"{w}x{h}.png")
        piece.save(out[-1])
    with Image.open(originals[0]) as img:  # a greyscale photo: converted to RGB first, as the transform does
        out.append(folder / "grey.png")
        img.convert("L").save(out[-1])
    return out


@pytest.mark.parametrize("eval_resize", ["center_crop", "whole"])
@pytest.mark.parametrize(
    ("backbone", "size"),
    [("efficientnet_lite0", 224), ("efficientnet_lite0", 97), ("timm:test_efficientnet", 64), ("resnet50", 80)],
)
def test_eval_input_equals_the_eval_transform_on_real_photos_of_odd_sizes(
    backbone, size, eval_resize, cub_root, tmp_path
):
    transform = build_transform(backbone, image_size=size, train=False, eval_resize=eval_resize)
    rule = EvalPreprocessing.from_record(preprocessing(backbone, size, eval_resize), size)
    assert rule.resize == eval_resize and rule.image_size == size
    for path in _real_photos(cub_root, tmp_path / "photos"):
        with Image.open(path) as img:
            img.load()
            expected = transform(img).numpy()
            got = eval_input(img, rule)
        assert got.dtype == np.float32 and got.shape == (3, size, size) and got.flags["C_CONTIGUOUS"]
        assert np.array_equal(got, expected), f"{path.name}: max |diff| {np.abs(got - expected).max():.2e}"


def test_the_longer_side_is_truncated_like_torchvision():
    assert resized_size(69, 61, 73) == (82, 73)  # 73 * 69 / 61 = 82.57 -> 82
    assert resized_size(61, 69, 73) == (73, 82)
    assert resized_size(50, 50, 73) == (73, 73)
    assert resized_size(1000, 3, 256) == (85333, 256)


def test_a_recorded_preprocessing_is_checked():
    good = preprocessing("efficientnet_lite0", 96)
    rule = EvalPreprocessing.from_record(good, 96)
    assert (rule.resize_shorter_side, rule.center_crop, rule.interpolation) == (110, 96, "bilinear")
    bad = [
        ({**good, "center_crop": 95}, "crops 95"),
        ({**good, "resize_shorter_side": 96}, "resizes to 96"),
        ({**good, "resize_shorter_side": True}, "resize_shorter_side must be a positive integer"),
        ({**good, "interpolation": "lanczos"}, "interpolation must be bilinear or bicubic"),
        ({**good, "std": [0.5, 0.0, 0.5]}, "std must be a list of 3 positive finite numbers"),
        ({**good, "mean": [0.5, float("nan"), 0.5]}, "mean must be a list of 3 finite numbers"),
        ({**good, "mean": [0.5, 0.5]}, "mean must be a list of 3"),
        ("not a mapping", "must be a JSON object"),
    ]
    for record, message in bad:
        with pytest.raises(ValueError, match=message):
            EvalPreprocessing.from_record(record, 96)
    with pytest.raises(ValueError, match="crops 96"):  # the record of another size
        EvalPreprocessing.from_record(good, 128)


def test_a_recorded_whole_image_preprocessing_is_checked_field_by_field():
    good = preprocessing("efficientnet_lite0", 96, "whole")
    assert {k: good[k] for k in ("resize", "resize_to")} == {"resize": "whole", "resize_to": [96, 96]}
    assert "center_crop" not in good and "resize_shorter_side" not in good
    # the centre crop's record is today's, field for field: indexes made before the choice read the same
    assert preprocessing("efficientnet_lite0", 96) == preprocessing("efficientnet_lite0", 96, "center_crop") == {
        "resize_shorter_side": 110, "center_crop": 96, "interpolation": "bilinear", "mean": [0.5] * 3,
        "std": [0.5] * 3, "color": "RGB",
    }
    rule = EvalPreprocessing.from_record(good, 96)
    assert (rule.resize, rule.image_size, rule.resize_shorter_side, rule.center_crop) == ("whole", 96, None, None)
    crop = preprocessing("efficientnet_lite0", 96)
    bad = [
        ({**good, "resize_to": [96, 95]}, "resizes the whole image to 96x95 px"),
        ({**good, "resize_to": [96]}, "resize_to must be a list of 2 positive integers"),
        ({**good, "resize_to": "96x96"}, "resize_to must be a list of 2 positive integers"),
        ({**good, "resize_to": [96, True]}, "resize_to must be a positive integer, got True"),
        ({**good, "resize_to": None}, "resize_to must be a list of 2"),
        ({**good, "center_crop": 96}, "resizes the whole image but also records center_crop"),
        ({**good, "resize": "stretch"}, "resize must be whole \\(or absent: the centre crop\\), got 'stretch'"),
        ({**good, "resize": ["whole"] * 10_000}, "characters\\)$"),  # a hostile value: one short line
        ({**crop, "resize_to": [96, 96]}, "records resize_to .* but no resize 'whole'"),
        ({**good, "interpolation": "nearest"}, "interpolation must be bilinear or bicubic"),
        ({**good, "std": [0.5, -1, 0.5]}, "std must be a list of 3 positive finite numbers"),
    ]
    for record, message in bad:
        with pytest.raises(ValueError, match=message) as err:
            EvalPreprocessing.from_record(record, 96)
        assert len(str(err.value)) < 200 and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="to 96x96 px; for inputs of 128 px"):  # the record of another size
        EvalPreprocessing.from_record(good, 128)


def test_the_whole_rule_of_a_square_image_of_the_input_size_is_not_resized():
    """Pillow's resize to the same size copies the pixels, as torchvision's Resize((S, S)) leaves them."""
    pixels = np.random.default_rng(1).integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
    rule = EvalPreprocessing.from_record(preprocessing("efficientnet_lite0", 40, "whole"), 40)
    got = eval_input(Image.fromarray(pixels), rule)
    assert np.array_equal(got, ((pixels.astype(np.float32) / np.float32(255) - 0.5) / 0.5).transpose(2, 0, 1))


def test_the_module_imports_no_torch():
    import subprocess

    code = "import sys, plmetric.data.preprocess; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
