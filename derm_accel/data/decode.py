"""Open, fully decode, normalise, hash and store one image file.

Runs in worker processes, so it only touches the file it is given and returns plain picklable values. Every
failure becomes a reason string instead of an exception: one bad file must never stop a 245k-image run.

The stored image is the source JPEG itself (its metadata segments removed, its compressed pixels untouched) when
it is an RGB JPEG that needs no resize, no EXIF rotation and no colour conversion; anything else is re-encoded.
Beside the hashes, each file gets its near-copy signature (:func:`near_copy_signature`): what duplicate grouping
needs, about 1.8 KB.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import scipy.fftpack
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from derm_accel.core.errors import InputError

# Pillow's own default; a header claiming more pixels is refused before any pixel is decoded.
MAX_PIXELS = 89_478_485
# The decode budget: at most this many pixels are ever decoded from one file (~120 MB as RGB). A larger JPEG
# is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, Pillow's draft mode) until it fits; a larger
# image in any other format is refused. Holds in convert, predict, explain, evaluate and serve alike.
MAX_DECODE_PIXELS = 40_000_000
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


@dataclass(frozen=True)
class DecodeOptions:
    """How the stored image is made: shorter side capped at ``max_size`` (0 keeps it), JPEG ``quality``."""

    max_size: int = 320
    quality: int = 95
    max_pixels: int = MAX_PIXELS


@dataclass(frozen=True)
class Signature:
    """What near-copy grouping needs of one image (never published): see :func:`near_copy_signature`."""

    variants: tuple[int, ...]  # pHash under each of ORIENTATIONS; index 0 is the published ``phash``
    windows: tuple[int, ...]  # pHash of each of CROP_WINDOWS, upright
    detail: bytes  # detail hashes (see :func:`detail_hashes`): DETAIL_WORDS uint64 per orientation, then per window
    thumbnail: bytes  # THUMBNAIL_SIZE x THUMBNAIL_SIZE grey pixels (uint8, row-major): the image pHash is taken of


@dataclass
class Decoded:
    """One file's outcome: the stored ``jpeg`` and its hashes, or ``reason`` + ``detail`` saying why not."""

    index: int
    jpeg: bytes | None = None
    width: int = 0
    height: int = 0
    content_hash: str = ""
    phash: str = ""
    signature: Signature | None = None
    # True when ``jpeg`` is the source file's own JPEG stream (metadata removed), False when re-encoded.
    original: bool = False
    reason: str | None = None
    detail: str = ""

    @property
    def phash_variants(self) -> tuple[int, ...]:
        return self.signature.variants if self.signature else ()


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: alpha over white, 16-bit scaled (not clipped), palettes expanded."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        arr = np.asarray(image).astype(np.float64)
        if mode == "F":
            arr = arr * 255.0 if arr.size and arr.max() <= 1.0 else arr
        elif mode in _SIXTEEN_BIT_MODES or (arr.size and arr.max() > 255):
            arr = arr / 257.0  # 65535 -> 255 exactly
        gray = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    has_alpha = mode in _ALPHA_MODES or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def content_hash(rgb: Image.Image) -> str:
    """sha256 of the decoded pixels and size: re-encoded exact copies (PNG vs JPEG q100 lossless) match."""
    h = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    rows = max(1, 2**22 // (3 * rgb.width))  # ~4 MB strips: no second full copy of a large image
    for top in range(0, rgb.height, rows):
        h.update(rgb.crop((0, top, rgb.width, min(rgb.height, top + rows))).tobytes())
    return h.hexdigest()


# The dihedral group D4 on a square array: index 0 must stay the identity (the published ``phash``).
ORIENTATIONS = (
    "identity",
    "flip_left_right",
    "flip_top_bottom",
    "rotate_90",
    "rotate_180",
    "rotate_270",
    "transpose",
    "transverse",
)
_HASH_SIZE = 8
_PHASH_SIZE = _HASH_SIZE * 4  # imagehash.phash's default hash_size * highfreq_factor
_BIT_WEIGHTS = np.uint64(1) << np.arange(63, -1, -1, dtype=np.uint64)  # row-major, first bit most significant


def _orientations(pixels: np.ndarray) -> tuple[np.ndarray, ...]:
    """``pixels`` under every element of D4, in ``ORIENTATIONS`` order (rotations counter-clockwise, as PIL)."""
    return (
        pixels,
        pixels[:, ::-1],
        pixels[::-1, :],
        np.rot90(pixels, 1),
        np.rot90(pixels, 2),
        np.rot90(pixels, 3),
        pixels.T,
        np.rot90(pixels, 2).T,
    )


def _grey_square(rgb: Image.Image) -> np.ndarray:
    """The 32x32 grey image pHash is taken of (imagehash's own steps: grey, then a Lanczos resize)."""
    return np.asarray(rgb.convert("L").resize((_PHASH_SIZE, _PHASH_SIZE), Image.Resampling.LANCZOS))


def _low_dct_bits(squares: np.ndarray) -> np.ndarray:
    """pHash bits of a stack of 32x32 squares (k, 32, 32) as uint64: the 8x8 lowest DCT terms above their median."""
    coeffs = scipy.fftpack.dct(scipy.fftpack.dct(squares, axis=1), axis=2)
    low = coeffs[:, :_HASH_SIZE, :_HASH_SIZE].reshape(len(squares), -1)
    bits = low > np.median(low, axis=1, keepdims=True)
    return (bits * _BIT_WEIGHTS).sum(axis=1, dtype=np.uint64)


def _variants_of(pixels: np.ndarray) -> tuple[int, ...]:
    # Identity through imagehash's own 2-D calls, so the published hash matches it by construction; the
    # other seven in one batched call.
    identity = scipy.fftpack.dct(scipy.fftpack.dct(pixels, axis=0), axis=1)[None]
    low = identity[:, :_HASH_SIZE, :_HASH_SIZE].reshape(1, -1)
    upright = (low > np.median(low, axis=1, keepdims=True)) * _BIT_WEIGHTS
    others = _low_dct_bits(np.stack(_orientations(pixels)[1:]))
    return (int(upright.sum(axis=1, dtype=np.uint64)[0]), *(int(h) for h in others))


def phash_variants(rgb: Image.Image) -> tuple[int, ...]:
    """64-bit pHash of ``rgb`` in each of the 8 ``ORIENTATIONS``, as ints; index 0 equals ``imagehash.phash``.

    Flipped or 90-degree rotated copies are a common augmentation and their plain pHash lies ~30 bits away,
    so each orientation gets its own hash. The costly part of pHash (grayscale + Lanczos resize of the whole
    image) is done once, exactly as imagehash does it; only the 32x32 DCT and median step run per
    orientation. A rotated non-square image has its sides swapped,
    which the square resize absorbs.
    """
    return _variants_of(_grey_square(rgb))


# Crops that near-copy search also hashes: (left, right, top, bottom) trims as fractions of the side. A copy
# cropped by up to ~10% per side lies within a few bits of one of these windows of its original (the full
# frame finds about a third of such crops, these 15 windows with it about 90%: docs/benchmarks.md, dedupe).
_AXIS_TRIMS = ((0.0, 0.0), (0.05, 0.0), (0.0, 0.05), (0.025, 0.025))
CROP_WINDOWS = tuple((lx, rx, ty, by) for (lx, rx) in _AXIS_TRIMS for (ty, by) in _AXIS_TRIMS)[1:]
THUMBNAIL_SIZE = _PHASH_SIZE


def resample_matrix(lo: float, hi: float, size: int = THUMBNAIL_SIZE) -> np.ndarray:
    """(size, size) linear-interpolation matrix taking a row of ``size`` pixels to ``size`` samples of the span
    [lo, hi] (fractions of the row; outside [0, 1] the edge pixel repeats)."""
    centres = (lo + (np.arange(size) + 0.5) / size * (hi - lo)) * size - 0.5
    x = np.clip(centres, 0, size - 1)
    left = np.minimum(np.floor(x).astype(int), size - 2)
    frac = x - left
    m = np.zeros((size, size))
    m[np.arange(size), left] = 1 - frac
    m[np.arange(size), left + 1] += frac
    return m


def _window_matrices() -> tuple[np.ndarray, np.ndarray]:
    rows = np.stack([resample_matrix(top, 1 - bottom) for (_, _, top, bottom) in CROP_WINDOWS])
    cols = np.stack([resample_matrix(left, 1 - right) for (left, right, _, _) in CROP_WINDOWS])
    return rows, cols


_WINDOW_ROWS, _WINDOW_COLS = _window_matrices()


def window_hashes(pixels: np.ndarray) -> tuple[int, ...]:
    """pHash of each of ``CROP_WINDOWS`` of a 32x32 grey square, resampled from it (no second pass over the image)."""
    squares = _WINDOW_ROWS @ pixels.astype(np.float64) @ _WINDOW_COLS.transpose(0, 2, 1)
    return tuple(int(h) for h in _low_dct_bits(squares))


# Detail hash: the signs of the DCT terms just above pHash's 8x8 (row or column index 8-15 of the 32x32 square,
# 192 terms). pHash's low terms of two different dark lesions on light skin often agree; these finer terms of
# different pictures agree only by chance (about half the bits), those of a copy mostly (docs/benchmarks.md).
_DETAIL_SPAN = 16
_DETAIL_TERMS = np.maximum.outer(np.arange(_DETAIL_SPAN), np.arange(_DETAIL_SPAN)) >= _HASH_SIZE
DETAIL_BITS = int(_DETAIL_TERMS.sum())
DETAIL_WORDS = DETAIL_BITS // 64


def _detail_matrices() -> tuple[np.ndarray, np.ndarray]:
    """(1 + windows, 16, 32) left and right factors: ``left[w] @ x @ right[w].T`` is the first 16x16 DCT terms
    (scipy's DCT-II, as pHash) of crop window w of x, w = 0 the full frame."""
    dct = scipy.fftpack.dct(np.eye(_PHASH_SIZE), axis=0)[:_DETAIL_SPAN]
    full = np.eye(_PHASH_SIZE)[None]
    return dct @ np.concatenate([full, _WINDOW_ROWS]), dct @ np.concatenate([full, _WINDOW_COLS])


_DETAIL_LEFT, _DETAIL_RIGHT = _detail_matrices()
_SIGN = (-1.0) ** np.arange(_DETAIL_SPAN)


def _oriented_terms(terms: np.ndarray) -> list[np.ndarray]:
    """DCT terms (..., 16, 16) of the square under each of ORIENTATIONS, from the upright square's: a flip negates
    the odd terms along its axis, a transpose transposes them (exact for the DCT-II)."""
    rows, cols = _SIGN[:, None], _SIGN[None, :]
    t = np.swapaxes
    return [terms, terms * cols, terms * rows, t(terms * cols, -1, -2), terms * rows * cols,
            t(terms * rows, -1, -2), t(terms, -1, -2), t(terms * rows * cols, -1, -2)]


def _pack_signs(terms: np.ndarray) -> np.ndarray:
    """Signs (> 0) of the detail terms of (..., 16, 16) as (..., DETAIL_WORDS) uint64."""
    bits = np.packbits(terms[..., _DETAIL_TERMS] > 0, axis=-1)
    return np.ascontiguousarray(bits).view(">u8").astype(np.uint64)


def detail_hashes(squares: np.ndarray) -> np.ndarray:
    """Detail hashes of a stack of 32x32 grey squares (k, 32, 32): (k, 8 + 15, DETAIL_WORDS) uint64, the full
    frame under each of ORIENTATIONS, then each of CROP_WINDOWS upright (pHash's hypotheses, one for one)."""
    x = np.asarray(squares, dtype=np.float64)[:, None]
    terms = np.matmul(np.matmul(_DETAIL_LEFT, x), np.swapaxes(_DETAIL_RIGHT, -1, -2))  # (k, 16, 16, 16)
    oriented = np.stack([_pack_signs(t) for t in _oriented_terms(terms[:, 0])], axis=1)
    return np.concatenate([oriented, _pack_signs(terms[:, 1:])], axis=1)


def near_copy_signature(rgb: Image.Image) -> Signature:
    """pHash and detail hash in the 8 orientations and of the crop windows, and the grey thumbnail, all from one
    32x32 square."""
    pixels = _grey_square(rgb)
    detail = detail_hashes(pixels[None])[0]
    return Signature(_variants_of(pixels), window_hashes(pixels), detail.tobytes(), pixels.tobytes())


def target_size(width: int, height: int, max_size: int) -> tuple[int, int]:
    """Size with the shorter side at ``max_size``; never upscales, ``max_size=0`` keeps the original."""
    short = min(width, height)
    if max_size <= 0 or short <= max_size:
        return width, height
    if width <= height:
        return max_size, max(1, round(height * max_size / width))
    return max(1, round(width * max_size / height)), max_size


class ImageTooLargeError(InputError):
    """The image has more pixels than may be decoded (header limit, or the decode budget)."""


def open_bounded(
    source: bytes | str | os.PathLike,
    min_size: int | None = None,
    *,
    max_pixels: int = MAX_PIXELS,
    max_decode_pixels: int | None = None,
) -> Image.Image:
    """Open an image lazily (header only) so that decoding it stays within the decode budget.

    A JPEG is set to decode at the smallest DCT scale that keeps its shorter side at least ``min_size``, and
    at least at the scale that brings it under ``max_decode_pixels`` (default :data:`MAX_DECODE_PIXELS`).
    Raises :class:`ImageTooLargeError` for a header over ``max_pixels`` or an image that would still decode
    to more than ``max_decode_pixels``. The returned image's ``size`` is what ``load()`` will decode;
    ``info["original_size"]`` is the header's size.
    """
    max_decode_pixels = max_decode_pixels or MAX_DECODE_PIXELS
    image = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
    w, h = image.size
    image.info["original_size"] = (w, h)
    if w * h > max_pixels:
        raise ImageTooLargeError(f"{w}x{h} pixels is over the {max_pixels:,}-pixel limit (decompression bomb?)")
    if image.format == "JPEG":
        scale = 1
        while scale < 8 and -(-w // scale) * -(-h // scale) > max_decode_pixels:
            scale *= 2  # libjpeg decodes at 1/1, 1/2, 1/4 or 1/8
        if min_size:  # a smaller decode where the shorter side still keeps min_size pixels
            while scale < 8 and min(w, h) // (scale * 2) >= min_size:
                scale *= 2
        if scale > 1:
            image.draft("RGB", (w // scale, h // scale))
    if image.width * image.height > max_decode_pixels:
        raise ImageTooLargeError(
            f"{w}x{h} {image.format or 'image'} would decode to {image.width * image.height:,} pixels, over the "
            f"{max_decode_pixels:,}-pixel decode budget (only JPEGs are decoded at reduced scale); "
            f"downscale it first"
        )
    return image


class PixelBudget:
    """A semaphore counted in bytes of decoded pixels: concurrent decodes wait until theirs fit.

    ``hold(nbytes)`` blocks while the bytes already held plus ``nbytes`` exceed ``capacity``; one image larger
    than the whole budget waits until it runs alone. With ``timeout`` a wait that lasts longer raises
    ``TimeoutError``.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1 byte, got {capacity}")
        self.capacity = capacity
        self.in_use = 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def hold(self, nbytes: int, timeout: float | None = None) -> Iterator[None]:
        nbytes = max(0, min(int(nbytes), self.capacity))
        with self._changed:
            if not self._changed.wait_for(lambda: self.in_use + nbytes <= self.capacity, timeout):
                raise TimeoutError(f"waited over {timeout} s for {nbytes:,} bytes of decode budget")
            self.in_use += nbytes
        try:
            yield
        finally:
            with self._changed:
                self.in_use -= nbytes
                self._changed.notify_all()


def decoded_bytes(image: Image.Image) -> int:
    """Bytes the decoded RGB pixels of a lazily opened image take: what :class:`PixelBudget` counts."""
    return image.width * image.height * 3


def _classify_error(exc: BaseException) -> str:
    message = str(exc).lower()
    if isinstance(exc, (Image.DecompressionBombError, ImageTooLargeError)):
        return "too_large"
    if "truncated" in message or "premature end" in message or "broken data stream" in message:
        return "truncated"
    if isinstance(exc, UnidentifiedImageError):
        return "not_an_image"
    return "unreadable"


def decode_file(index: int, path: str, options: DecodeOptions) -> Decoded:
    """Decode ``path`` completely and return the stored JPEG, its original size and content hashes."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        return Decoded(index, reason="unreadable", detail=f"{type(exc).__name__}: {exc}")
    if not data:
        return Decoded(index, reason="empty", detail="zero-byte file")
    return decode_bytes(index, data, options)


def decode_bytes(index: int, data: bytes, options: DecodeOptions) -> Decoded:
    """The work of :func:`decode_file` on bytes already read."""
    # A global set elsewhere must not let half-decoded images through.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bomb warnings are handled below; EXIF chatter is noise
            image = open_bounded(data, max_pixels=options.max_pixels)  # too large: ImageTooLargeError
            original_size = image.info["original_size"]
            as_stored = _is_plain_jpeg(image)
            image.load()
            # Broken EXIF: the pixels are still good, keep them as stored.
            with contextlib.suppress(Exception):
                image = ImageOps.exif_transpose(image) or image
            rgb = to_rgb(image)
            rgb.load()
            del image  # the source mode's pixels are not needed once RGB exists
    except Exception as exc:
        return Decoded(index, reason=_classify_error(exc), detail=f"{type(exc).__name__}: {exc}")
    try:
        digest = content_hash(rgb)
        signature = near_copy_signature(rgb)
        size = target_size(rgb.width, rgb.height, options.max_size)
        full_scale = rgb.size == original_size
        stored_bytes = _original_jpeg(data, digest) if as_stored and full_scale and size == rgb.size else None
        if stored_bytes is None:
            # Bicubic (antialiased when shrinking) costs half of Lanczos here, the largest share of the work.
            stored = rgb if size == rgb.size else rgb.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)
            buf = io.BytesIO()
            stored.save(buf, format="JPEG", quality=options.quality)
    except Exception as exc:  # e.g. out of memory on a huge image: report, don't stop the run
        return Decoded(index, reason="unreadable", detail=f"{type(exc).__name__}: {exc}")
    width, height = rgb.size
    if not full_scale:
        # Decoded at reduced scale: record the original size, upright like ``rgb``.
        w0, h0 = original_size
        width, height = (w0, h0) if (rgb.width >= rgb.height) == (w0 >= h0) else (h0, w0)
    return Decoded(
        index,
        jpeg=stored_bytes if stored_bytes is not None else buf.getvalue(),
        width=width,
        height=height,
        content_hash=digest,
        phash=f"{signature.variants[0]:016x}",  # the same text as str(imagehash.phash(rgb))
        signature=signature,
        original=stored_bytes is not None,
    )


def _is_plain_jpeg(image: Image.Image) -> bool:
    """An RGB JPEG (not MPO, CMYK or grey) whose EXIF asks for no rotation: its pixels are already what we store."""
    if image.format != "JPEG" or image.mode != "RGB":
        return False
    try:
        return image.getexif().get(_EXIF_ORIENTATION, 1) in (1, None)
    except Exception:  # unreadable EXIF: decode_bytes keeps the pixels as stored, but re-encodes them
        return False


def _original_jpeg(data: bytes, digest: str) -> bytes | None:
    """The source JPEG without its metadata segments, if it decodes to exactly the pixels hashed as ``digest``."""
    stripped = strip_jpeg_metadata(data)
    if stripped is None:
        return None
    try:
        with Image.open(io.BytesIO(stripped)) as check:
            same = check.format == "JPEG" and content_hash(to_rgb(check)) == digest
    except Exception:
        return None
    return stripped if same else None


_EXIF_ORIENTATION = 0x0112
# Segments that decide how the pixels look: JFIF (APP0), an ICC colour profile (APP2) and Adobe's colour
# transform flag (APP14). Every other APPn (EXIF, XMP, Photoshop/IPTC, maker notes...) and comments are metadata
# that may carry GPS positions, device serials or names, so they are not copied into a published dataset.
_KEPT_APP = {0xE0: (b"JFIF\x00",), 0xE2: (b"ICC_PROFILE\x00",), 0xEE: (b"Adobe",)}
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM and RST0-7 carry no length


def strip_jpeg_metadata(data: bytes) -> bytes | None:
    """``data`` (a JPEG) with its APPn metadata segments and comments removed and nothing after the end marker;
    the compressed pixels are copied unchanged. None when the marker structure is not what JPEG prescribes."""
    if data[:2] != b"\xff\xd8":
        return None
    out = bytearray(b"\xff\xd8")
    pos, n = 2, len(data)
    while pos + 2 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0xD9:
            out += b"\xff\xd9"
            return bytes(out)
        if marker in _STANDALONE:
            out += data[pos : pos + 2]
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        end = pos + 2 + length
        if pos + 4 > n or length < 2 or end > n:
            return None
        segment = data[pos:end]
        is_app = 0xE0 <= marker <= 0xEF
        if marker != 0xFE and (not is_app or segment[4:].startswith(_KEPT_APP.get(marker, ()))):
            out += segment
        pos = end
        if marker == 0xDA:  # start of scan: entropy-coded data up to the next marker that is not RSTn
            scan_end = _scan_end(data, pos)
            if scan_end is None:
                return None
            out += data[pos:scan_end]
            pos = scan_end
    return None


def _scan_end(data: bytes, pos: int) -> int | None:
    """Index of the first marker after entropy-coded data starting at ``pos`` (0xFF00 stuffing and RSTn skipped)."""
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= len(data):
            return None
        following = data[pos + 1]
        if following == 0x00 or 0xD0 <= following <= 0xD7:
            pos += 2
        elif following == 0xFF:
            pos += 1
        else:
            return pos


def decode_task(task: tuple[int, str, DecodeOptions]) -> Decoded:
    """Pool entry point (one picklable argument)."""
    return decode_file(*task)
