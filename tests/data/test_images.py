"""Tests for plmetric.data.images: EXIF orientation, every mode to 8-bit RGB, one pixel limit, regular files only."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from image_trees import deadline
from plmetric.data import images
from plmetric.data.images import (
    MAX_IMAGE_PIXELS,
    ImageTooLargeError,
    NotARegularFileError,
    image_size,
    open_image,
    require_regular_file,
    to_rgb8,
)

ORIENTATION = 0x0112

# What the EXIF specification says each Orientation value means: the stored pixels -> the picture
# as it is meant to be seen (numpy, independent of Pillow's table).
SHOWN = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # rotated 180
    4: lambda a: a[::-1],  # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # transposed (row 0 = visual left column)
    6: lambda a: np.rot90(a, -1),  # stored rotated 90 counter-clockwise: turn clockwise to show
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],  # transverse
    8: lambda a: np.rot90(a, 1),  # turn counter-clockwise to show
}
# How a camera stores an upright picture under each value: the inverse of SHOWN.
STORED = {**SHOWN, 6: lambda a: np.rot90(a, 1), 8: lambda a: np.rot90(a, -1)}


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return exif


def _upright_pixels(seed: int = 0, height: int = 30, width: int = 20) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG header that declares ``width`` × ``height`` pixels with almost no data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + data


# ----------------------------------------------------------------------------- orientation


def test_the_specification_tables_are_inverse():
    a = _upright_pixels()
    for value in SHOWN:
        assert np.array_equal(SHOWN[value](STORED[value](a)), a), value


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_every_exif_orientation_decodes_upright(tmp_path, orientation, fmt):
    """Lossless PNG: exactly the upright pixels. JPEG: the same pixels as a plain decode of the file
    turned by the specification's rule (only the turn is added, never a re-encoding)."""
    upright = _upright_pixels(orientation)
    path = tmp_path / f"o{orientation}.{fmt.lower()}"
    Image.fromarray(np.ascontiguousarray(STORED[orientation](upright))).save(path, fmt, exif=_exif(orientation))
    decoded = open_image(path)
    assert decoded.mode == "RGB" and decoded.size == (upright.shape[1], upright.shape[0])
    if fmt == "PNG":
        assert np.array_equal(np.asarray(decoded), upright)
    else:
        with Image.open(path) as raw:
            stored = np.asarray(raw.convert("RGB"))
        assert np.array_equal(np.asarray(decoded), SHOWN[orientation](stored))


def test_a_sideways_photo_and_its_upright_copy_embed_alike_in_index_embed_and_search(tmp_path, capsys):
    """A JPEG stored sideways with Orientation=6 and the upright PNG exported from it decode to the
    same pixels, so every command embeds them alike.

    Bound: bitwise-equal inputs through the same float32 network differ only by summation order
    (another batch size can pick another convolution blocking): at most 1e-4 per unit-norm component,
    the bound tests/retrieval/test_export.py derives for EfficientNet-Lite0 under any summation
    order. The cosine, taken in float64 with the norms divided out, is then
    1 - cos = |a - b|^2 / 2 <= d (1e-4)^2 / 2 = 8e-8 for d = 16: 1e-6 holds it with margin. The same
    photo read without its orientation scores far lower (checked, so the test can fail)."""
    from plmetric.cli import main
    from plmetric.core.checkpoint import save_model
    from plmetric.data.backbones import build_transform, create_model
    from plmetric.retrieval.index import load_embeddings

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    scene = np.clip(rng.normal(128, 60, (48, 64, 3)) + np.linspace(0, 90, 64)[None, :, None], 0, 255).astype(np.uint8)
    Image.fromarray(np.ascontiguousarray(STORED[6](scene))).save(photos / "sideways.jpg", quality=92, exif=_exif(6))
    with Image.open(photos / "sideways.jpg") as raw:  # the upright copy, turned by the specification's rule
        Image.fromarray(np.ascontiguousarray(SHOWN[6](np.asarray(raw.convert("RGB"))))).save(photos / "upright.png")
    for k in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(photos / f"other{k}.png")
    torch.manual_seed(0)
    ckpt = save_model(
        tmp_path / "model.safetensors",
        create_model("efficientnet_lite0", embedding_dim=16, pretrained=False),
        {"backbone": "efficientnet_lite0", "embedding_dim": 16, "image_size": 32},
    )
    transform = build_transform("efficientnet_lite0", image_size=32)
    assert torch.equal(transform(open_image(photos / "sideways.jpg")), transform(open_image(photos / "upright.png")))

    small = ["--checkpoint", str(ckpt), "--image-size", "32", "--no-progress", "--num-workers", "0"]
    bound = 1e-6

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a.double(), b.double()
        return float(a @ b / (a.norm() * b.norm()))

    index = tmp_path / "index.safetensors"
    assert main(["index", str(photos), "--out", str(index), *small]) == 0
    emb, _, paths, _ = load_embeddings(index)
    names = [Path(p).name for p in paths]
    side, up = emb[names.index("sideways.jpg")], emb[names.index("upright.png")]
    assert 1 - cos(side, up) <= bound, "index"

    embedded = tmp_path / "embedded.safetensors"
    assert main(["embed", "--images", str(photos), "--out", str(embedded), *small]) == 0
    emb2, _, paths2, _ = load_embeddings(embedded)
    names2 = [Path(p).name for p in paths2]
    assert 1 - cos(emb2[names2.index("sideways.jpg")], emb2[names2.index("upright.png")]) <= bound, "embed"
    assert 1 - cos(emb2[names2.index("upright.png")], up) <= bound, "embed and index alike"

    found = tmp_path / "found.json"
    query = ["search", str(photos / "sideways.jpg"), "--index", str(index), "--json", str(found), "--top-k", "2"]
    query.append("--include-self")  # the query is indexed itself: both copies, each at cosine 1
    assert main([*query, "--out", str(tmp_path / "grid.png")]) == 0
    results = json.loads(found.read_text())["queries"][0]["results"]
    # search reports float32 scores of unit vectors: normalising to norm 1 in float32 leaves
    # |norm - 1| <= d u (u = 2^-24), so a float32 score may read 1 - 2 d u lower: 16 * 6e-8 * 2 < 2e-6
    assert {Path(r["path"]).name for r in results} == {"upright.png", "sideways.jpg"}, "search"
    assert all(1 - r["score"] <= bound + 2e-6 for r in results), "search"

    # the test can fail: the stored (sideways) pixels embed far from the upright ones
    from plmetric.retrieval.index import model_from_description

    _, _, _, description = load_embeddings(index)
    model = model_from_description(description, index).eval()
    with Image.open(photos / "sideways.jpg") as raw:
        stored = raw.convert("RGB")
    with torch.no_grad():
        unturned = model(transform(stored).unsqueeze(0))[0]
    assert 1 - cos(unturned, up) > 1000 * bound
    capsys.readouterr()


def test_unparsable_exif_leaves_the_image_as_stored(tmp_path):
    upright = _upright_pixels()
    path = tmp_path / "odd_exif.png"
    Image.fromarray(upright).save(path, exif=b"Exif\x00\x00II*\x00\xff\xff\xff\xff garbage")
    assert np.array_equal(np.asarray(open_image(path)), upright)


# ----------------------------------------------------------------------------- modes


def test_sixteen_bit_grey_rounds_v_over_257_in_every_byte_order(tmp_path):
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    expected = np.floor(values / 257.0 + 0.5).astype(np.uint8)  # no ties: 257 is odd
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as raw:
        assert raw.mode == "I;16"
    decoded = np.asarray(open_image(tmp_path / "deep.png"))
    assert np.array_equal(decoded, np.repeat(expected[..., None], 3, axis=2))
    for mode, dtype in (("I;16B", ">u2"), ("I;16L", "<u2"), ("I;16N", "=u2")):
        image = Image.frombytes(mode, (256, 256), values.astype(dtype).tobytes())
        assert np.array_equal(np.asarray(to_rgb8(image))[..., 0], expected), mode
    # 8-bit values stored as 16-bit (k * 257) come back unchanged; 16-bit is never all white
    assert np.array_equal(expected.reshape(-1)[np.arange(256) * 257], np.arange(256))
    assert 100 < decoded.mean() < 155


def test_thirty_two_bit_integers_are_sixteen_bit_samples_clipped():
    values = np.array([[-5, 0, 128, 129, 257, 32896, 65535, 70000, 2**31 - 1]], dtype=np.int32)
    expected = np.floor(np.clip(values[0], 0, 65535) / 257.0 + 0.5)
    assert np.array_equal(np.asarray(to_rgb8(Image.fromarray(values, "I")))[0, :, 1], expected)


def test_floats_are_stretched_from_their_own_finite_range():
    values = np.array([[0.25, 0.5, 1.25, np.nan, np.inf, 0.7]], dtype=np.float32)
    finite = values[np.isfinite(values)]
    stretched = (values[0].astype(np.float64) - finite.min()) * 255.0 / (finite.max() - finite.min())
    expected = np.where(np.isfinite(values[0]), np.floor(stretched + 0.5), 0)  # 63.75, 114.75: no ties
    assert np.array_equal(np.asarray(to_rgb8(Image.fromarray(values, "F")))[0, :, 2], expected)
    assert np.asarray(to_rgb8(Image.new("F", (3, 2), 7.0))).max() == 0


def _over_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255.0
    return colour.astype(np.float64) * a + 255.0 * (1 - a)


def test_transparency_is_composited_over_white_in_every_mode(tmp_path):
    """Within 1 level of ``c a / 255 + 255 (1 - a / 255)`` (Pillow's integer blend rounds once)."""
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    rgba[0, :, 3], rgba[1, :, 3] = 0, 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    got = np.asarray(open_image(tmp_path / "rgba.png")).astype(np.float64)
    assert np.abs(got - _over_white(rgba[..., :3], rgba[..., 3])).max() <= 1
    assert (got[0] == 255).all() and np.array_equal(got[1], rgba[1, :, :3])

    la = np.stack([rng.integers(0, 256, (8, 8)), rng.integers(0, 256, (8, 8))], axis=-1).astype(np.uint8)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    got = np.asarray(open_image(tmp_path / "la.png")).astype(np.float64)
    assert np.abs(got - _over_white(np.repeat(la[..., :1], 3, axis=2), la[..., 1])).max() <= 1

    palette = Image.new("P", (3, 1))
    palette.putpalette([10, 20, 30, 200, 100, 50, 0, 0, 0] + [0] * (256 * 3 - 9))
    palette.putdata([0, 1, 2])
    palette.save(tmp_path / "p.png", transparency=2)  # entry 2 is fully transparent
    with Image.open(tmp_path / "p.png") as raw:
        assert raw.mode == "P" and "transparency" in raw.info
    assert np.asarray(open_image(tmp_path / "p.png")).tolist() == [[[10, 20, 30], [200, 100, 50], [255, 255, 255]]]


def test_other_modes_convert_to_rgb(tmp_path):
    bits = Image.new("1", (2, 1))
    bits.putpixel((1, 0), 1)
    assert np.asarray(to_rgb8(bits)).tolist() == [[[0, 0, 0], [255, 255, 255]]]
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 100, 200, 50]]], dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    # Pillow's rule: channel = (255 - ink)(255 - K) / 255, within its integer rounding (1 level)
    expected = (255 - cmyk[..., :3].astype(float)) * (255 - cmyk[..., 3:].astype(float)) / 255
    assert np.abs(np.asarray(to_rgb8(Image.fromarray(cmyk, "CMYK"))) - expected).max() <= 1
    with Image.open(tmp_path / "cmyk.jpg") as raw:
        assert raw.mode == "CMYK"
    assert open_image(tmp_path / "cmyk.jpg").mode == "RGB"
    white = np.asarray(to_rgb8(Image.new("LAB", (1, 1), (255, 128, 128))))  # L* 100, a* = b* = 0
    assert white.min() >= 250


# ----------------------------------------------------------------------------- one pixel limit


def test_the_pixel_limit_holds_at_its_boundary(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 12 * 10)
    Image.new("RGB", (12, 10)).save(tmp_path / "at.png")
    Image.new("RGB", (11, 11)).save(tmp_path / "over.png")
    assert open_image(tmp_path / "at.png").size == (12, 10)
    assert image_size(tmp_path / "at.png") == (12, 10)
    for call in (open_image, image_size):
        with pytest.raises(ImageTooLargeError, match=r"over\.png is too large to decode: 11 x 11 = 121 pixels"):
            call(tmp_path / "over.png")


def test_the_limit_is_checked_on_the_header_and_admits_100_megapixels(tmp_path):
    """A header claiming 10000 × 10000 (100 MP, over Pillow's 89.5 MP warning) passes the limit and
    fails only for its missing data; 11000 × 11000 (121 MP) is refused before any decoding."""
    assert 100_000_000 <= MAX_IMAGE_PIXELS < 2 * Image.MAX_IMAGE_PIXELS
    (tmp_path / "100mp.png").write_bytes(png_claiming(10_000, 10_000))
    (tmp_path / "121mp.png").write_bytes(png_claiming(11_000, 11_000))
    assert image_size(tmp_path / "100mp.png") == (10_000, 10_000)
    with pytest.raises(ValueError, match="cannot read") as err:
        open_image(tmp_path / "100mp.png")
    assert not isinstance(err.value, ImageTooLargeError)
    with pytest.raises(ImageTooLargeError, match=f"121mp.png is too large to decode.*{MAX_IMAGE_PIXELS:,}"):
        open_image(tmp_path / "121mp.png")
    with pytest.raises(ImageTooLargeError, match="upload is too large"):
        open_image(png_claiming(40_000, 40_000), "upload")  # over Pillow's own bomb limit too


# ----------------------------------------------------------------------------- sources


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFOs")
def test_a_fifo_or_device_named_jpg_is_refused_without_waiting(tmp_path):
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)
    device = tmp_path / "device.jpg"
    device.symlink_to(os.devnull)
    with deadline(20):
        for path, kind in ((fifo, "a FIFO"), (device, "a device"), (tmp_path, "a folder")):
            for call in (open_image, image_size, require_regular_file):
                with pytest.raises(NotARegularFileError, match=f"{path.name} is {kind}, not a regular file"):
                    call(path)


def test_bytes_and_file_objects_decode_and_errors_name_them(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(_upright_pixels()).save(buffer, "PNG")
    assert np.array_equal(np.asarray(open_image(buffer.getvalue(), "upload")), _upright_pixels())
    buffer.seek(0)
    assert open_image(buffer, "upload").size == (20, 30) and not buffer.closed
    with pytest.raises(ValueError, match="^cannot read upload 'x.png': ") as err:
        open_image(b"not an image", "upload 'x.png'")
    assert "object at 0x" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="query image not found: .*gone.jpg"):
        open_image(tmp_path / "gone.jpg", "query image")
