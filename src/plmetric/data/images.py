"""The one image decoder: a file (or its bytes) -> an upright 8-bit RGB PIL image, within one pixel limit.

Every command decodes through :func:`open_image` (training and its decode-once cache, ``embed``,
``index``, ``search`` queries and grids, ``serve`` uploads and thumbnails, the training report), so
an image means the same pixels everywhere:

1. **Regular files only.** A path is opened without blocking (``O_NONBLOCK``) and checked with
   ``fstat``: a FIFO, device, socket or folder named ``x.jpg`` is refused at once, never read.
2. **One pixel limit**, :data:`MAX_IMAGE_PIXELS`, checked on the header before anything is decoded
   (:class:`ImageTooLargeError`); Pillow's own decompression-bomb warning is superseded by it.
3. **Upright**: the EXIF orientation is applied (Pillow's ``ImageOps.exif_transpose``), so a phone
   photo stored sideways with ``Orientation=6`` decodes to the same pixels as its upright copy.
4. **8-bit RGB** by the rules of :func:`to_rgb8` (16-bit samples rounded, transparency over white).
"""

from __future__ import annotations

import io
import os
import re
import stat
import struct
import warnings
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from plmetric.core.files import file_kind

MAX_IMAGE_PIXELS = 120_000_000
"""The largest image (width × height) any command decodes: 120 MP.

It admits the largest photos cameras and phones write (102 MP medium format, 108 MP phone
sensors, 61 MP full frame) and refuses what only a decompression bomb or a stitched panorama
reaches. Decoded, such an image takes at most 480 MB (Pillow holds RGB in 4 bytes a pixel); it is two thirds
of Pillow's hard limit (``2 * Image.MAX_IMAGE_PIXELS`` = 178,956,970 pixels, where Pillow raises),
whose warning at 89,478,485 pixels this limit replaces. Read at call time: one place to change."""

SIXTEEN_BIT_MAX = 65535
"""Full scale of 16-bit samples (PNG and TIFF): ``I;16*`` and ``I`` images map 0..65535 to 0..255."""

_CHUNK_PIXELS = 1 << 22  # 16-bit conversion in bands of 4 Mi pixels bounds its scratch memory
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# Errors Pillow raises for undecodable data (UnidentifiedImageError and "image file is truncated" are
# OSErrors; some broken headers give SyntaxError, struct.error or ValueError).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, struct.error, EOFError, IndexError, KeyError, TypeError)


class ImageTooLargeError(ValueError):
    """An image over :data:`MAX_IMAGE_PIXELS` (or over Pillow's bomb limit): refused before decoding."""


class NotARegularFileError(ValueError):
    """A path that is a FIFO, device, socket or folder where an image file was expected."""




def require_regular_file(path: str | os.PathLike, what: str = "image") -> None:
    """Check with ``stat`` (links followed, nothing opened) that ``path`` is a regular file.

    Raises:
        FileNotFoundError: ``<what> not found: <path>`` (also a broken link).
        NotARegularFileError: ``<what> <path> is a FIFO, not a regular file`` (or a device, ...).
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {os.fspath(path)}") from None
    if not stat.S_ISREG(mode):
        raise NotARegularFileError(f"{what} {os.fspath(path)} is {file_kind(mode)}, not a regular file")


def open_regular_file(path: str | os.PathLike, what: str = "image") -> IO[bytes]:
    """Open ``path`` for reading in binary mode if it is a regular file (links followed).

    Checked with ``stat`` first, then opened with ``O_NONBLOCK`` (opening a FIFO swapped in since
    then returns at once instead of waiting for a writer) and checked again with ``fstat`` on the
    open descriptor, so what is read is the regular file that was checked.

    Raises:
        FileNotFoundError: no such file (or a broken link), naming ``what`` and the path.
        NotARegularFileError: a FIFO, device, socket or folder.
        PermissionError: not readable.
    """
    path = os.fspath(path)
    require_regular_file(path, what)  # never open a device at all (opening some has effects)
    try:
        handle = open(path, "rb", opener=_nonblocking)  # noqa: SIM115: returned open
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise NotARegularFileError(f"{what} {path} is a folder, not a regular file") from None
    except PermissionError:
        raise PermissionError(f"{what} {path}: permission denied") from None
    try:
        mode = os.fstat(handle.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise NotARegularFileError(f"{what} {path} is {file_kind(mode)}, not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(handle.fileno(), True)
        return handle
    except BaseException:
        handle.close()
        raise


def _nonblocking(path: str, flags: int) -> int:
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))


def check_pixels(width: int, height: int, name: str) -> None:
    """Raise :class:`ImageTooLargeError` when ``width * height > MAX_IMAGE_PIXELS``."""
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageTooLargeError(
            f"{name} is too large to decode: {width} x {height} = {width * height:,} pixels, over the "
            f"limit of {MAX_IMAGE_PIXELS:,} (plmetric.data.images.MAX_IMAGE_PIXELS)"
        )


def _source(source: str | os.PathLike | bytes | IO[bytes], what: str) -> tuple[str, IO[bytes], bool]:
    """``(name for messages, binary handle, whether we opened it)``."""
    if isinstance(source, bytes | bytearray | memoryview):
        return what, io.BytesIO(bytes(source)), True
    if isinstance(source, str | os.PathLike):
        return f"{what} {os.fspath(source)}", open_regular_file(source, what), True
    if hasattr(source, "read"):
        return what, source, False
    raise TypeError(f"{what}: expected a path, bytes or a binary file, got {type(source).__name__}")


def _reason(err: BaseException) -> str:
    """Pillow's message for ``err`` without the repr of an in-memory file (``<_io.BytesIO object at 0x...>``)."""
    text = re.sub(r"\s*<(_io\.\w+[^>]*|[\w.]+ object at 0x[0-9a-fA-F]+)>", "", str(err)).strip()
    if isinstance(err, UnidentifiedImageError):
        return "not an image file in a format Pillow reads" if not text or text.endswith("image file") else text
    return text or type(err).__name__


def _open(handle: IO[bytes], name: str) -> Image.Image:
    """``Image.open`` with :data:`MAX_IMAGE_PIXELS` in place of Pillow's bomb warning; the header only."""
    try:
        with warnings.catch_warnings():
            # Pillow warns above its own limit (89.5 MP), below ours: the check below decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(handle)
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(
            f"{name} is too large to decode: over the limit of {MAX_IMAGE_PIXELS:,} pixels ({err})"
        ) from None
    except _DECODE_ERRORS as err:
        raise ValueError(f"cannot read {name}: {_reason(err)}") from None
    try:
        check_pixels(*image.size, name)
    except BaseException:
        image.close()
        raise
    return image


def image_size(source: str | os.PathLike | bytes | IO[bytes], what: str = "image") -> tuple[int, int]:
    """``(width, height)`` as stored (before the EXIF orientation, which may swap them), from the
    header only, with the same checks as :func:`open_image` short of decoding the pixels."""
    name, handle, owned = _source(source, what)
    try:
        with _open(handle, name) as image:
            return image.size
    finally:
        if owned:
            handle.close()


def _upright(image: Image.Image) -> None:
    """Apply the EXIF orientation in place (``ImageOps.exif_transpose``); an EXIF block that cannot
    be parsed leaves the image as stored."""
    try:
        with warnings.catch_warnings():
            # Pillow warns "Corrupt EXIF data ..." without naming the file: the image still decodes
            warnings.filterwarnings("ignore", message=r"(?i).*exif", category=UserWarning)
            ImageOps.exif_transpose(image, in_place=True)
    except (SyntaxError, struct.error, TypeError, KeyError, IndexError, ValueError, OSError):
        pass  # the pixels are already decoded; only the orientation tag was unreadable


def _sixteen_bit_to_l(values: np.ndarray) -> Image.Image:
    """16-bit samples (any integer dtype) as mode ``L``: ``clip(v, 0, 65535)``, then
    ``round(v / 257) = (v + 128) // 257`` (no ties: 257 is odd), in bands to bound memory."""
    out = np.empty(values.shape, dtype=np.uint8)
    flat_in, flat_out = values.reshape(-1), out.reshape(-1)
    for start in range(0, flat_in.size, _CHUNK_PIXELS):
        band = np.clip(flat_in[start : start + _CHUNK_PIXELS].astype(np.int64), 0, SIXTEEN_BIT_MAX)
        flat_out[start : start + _CHUNK_PIXELS] = (band + 128) // 257
    return Image.fromarray(out, "L")


def _float_to_l(values: np.ndarray) -> Image.Image:
    """Float samples as mode ``L``, stretched from their own finite range: ``round(255 (v - lo) / (hi - lo))``;
    non-finite samples and constant images give 0."""
    finite = np.isfinite(values)
    if not finite.any():
        return Image.fromarray(np.zeros(values.shape, dtype=np.uint8), "L")
    low, high = float(values[finite].min()), float(values[finite].max())
    scale = 255.0 / (high - low) if high > low else 0.0
    scaled = np.where(finite, (values.astype(np.float64) - low) * scale, 0.0)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


def to_rgb8(image: Image.Image) -> Image.Image:
    """Any Pillow mode as the 8-bit RGB image it is meant to show.

    Rules (``v`` a sample):

    * ``I;16``, ``I;16L``, ``I;16B``, ``I;16N`` (16-bit grey PNG/TIFF): ``round(v / 257)``, the exact
      inverse of 8-to-16-bit expansion (``k * 257``), so 65535 is white and 8-bit images saved as
      16-bit come back unchanged. (Pillow's ``convert`` would clip at 255: the white images of old.)
    * ``I`` (32-bit integer; older Pillows open 16-bit PNGs so): taken as 16-bit samples,
      ``round(clip(v, 0, 65535) / 257)``.
    * ``F`` (32-bit float TIFF; floats carry no scale): stretched from the image's own finite
      min..max to 0..255, NaN and infinities 0, a constant image black.
    * Transparency (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa``/``La``, or ``P``/``L``/``RGB``
      with a ``transparency`` entry): composited over white (``Image.alpha_composite``), as a page
      shows it.
    * ``LAB``: converted from CIE L*a*b* (D50) to sRGB with Pillow's colour management when
      available.
    * Everything else (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``HSV``, 16-bit RGB which Pillow
      already reduced to its high byte): Pillow's ``convert("RGB")``.

    Raises:
        ValueError: a mode Pillow cannot convert to RGB.
    """
    if image.mode == "La":  # premultiplied: un-premultiply first
        image = image.convert("LA")
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        return _sixteen_bit_to_l(np.asarray(image)).convert("RGB")
    if mode == "F":
        return _float_to_l(np.asarray(image, dtype=np.float32)).convert("RGB")
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "LAB":
        try:
            from PIL import ImageCms

            lab_to_srgb = ImageCms.buildTransform(
                ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"
            )
            return ImageCms.applyTransform(image, lab_to_srgb)
        except ImportError:  # Pillow built without littlecms
            pass
    if mode == "RGB":
        return image
    return image.convert("RGB")


def open_image(
    source: str | os.PathLike | bytes | IO[bytes], what: str = "image", max_side: int | None = None
) -> Image.Image:
    """Decode an image file, its bytes or a binary file object to an upright 8-bit RGB ``PIL.Image``.

    Args:
        source: a path (must be a regular file), the bytes of an image file (an upload), or an open
            binary file (read, not closed).
        what: how messages name the image, e.g. ``"query image"``; a path is appended.
        max_side: let JPEG decoding shrink the image towards this side (``Image.draft``: thumbnails,
            a power-of-two DCT scale); None decodes at full size (embedding).

    Returns:
        The image, fully decoded and detached from the file, EXIF orientation applied, mode ``RGB``
        by the rules of :func:`to_rgb8`.

    Raises:
        FileNotFoundError: no such file.
        NotARegularFileError: a FIFO, device, socket or folder (a ``ValueError``).
        ImageTooLargeError: over :data:`MAX_IMAGE_PIXELS` (a ``ValueError``), before decoding.
        ValueError: not a decodable image (``cannot read <what>: ...``).
    """
    name, handle, owned = _source(source, what)
    try:
        image = _open(handle, name)
        try:
            if max_side is not None:
                image.draft("RGB", (max_side, max_side))
            image.load()  # decodes everything: a truncated or corrupt file raises here
            _upright(image)
            return to_rgb8(image)  # detached: the pixels are in memory, the file is closed below
        except Image.DecompressionBombError as err:
            raise ImageTooLargeError(f"{name} is too large to decode ({err})") from None
        except _DECODE_ERRORS as err:
            raise ValueError(f"cannot read {name}: {_reason(err)}") from None
    finally:
        if owned:
            handle.close()
