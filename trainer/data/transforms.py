"""Pixels of one SA-1B image and its masks: JPEG decode, geometry, RLE decode, normalize.

Frames (all pixel coordinates are (x, y) = (column, row)):

- *original*: the JPEG as stored, H×W.
- *resized*: the image scaled by ``s``; without jitter ``s = S / max(H, W)`` and the
  new side is ``int(old * s + 0.5)`` (segment-anything ``ResizeLongestSide``).
- *input*: the S×S model input. The (optionally flipped and cropped) resized image sits
  at the top-left, ``input_size = (h, w)``; the rest is zero padding. Normalisation comes
  before the padding, so padded pixels equal the mean colour (SAM_RECIPE.md §1 "Input").

Masks are resampled **nearest-neighbour at pixel centres**: input pixel ``i`` takes
original pixel ``floor((i + 0.5) / s)`` (exact integer arithmetic, like OpenCV's
``INTER_NEAREST_EXACT``). The recipe leaves the mask resize method open; nearest keeps
masks binary without a threshold and lets :func:`decode_rle_resized` go straight from the
compressed RLE to the input frame without decoding full-resolution masks. The image uses
area averaging when shrinking and bilinear when enlarging; both map the image corners
to the same place as the masks, so boxes computed from the resampled masks
(:func:`masks_to_boxes`) are aligned with the image.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image

PIXEL_MEAN = (123.675, 116.28, 103.53)
"""RGB mean on the 0-255 scale ([SA] ``Sam.pixel_mean``)."""
PIXEL_STD = (58.395, 57.12, 57.375)
"""RGB std on the 0-255 scale ([SA] ``Sam.pixel_std``)."""


def resize_longest_side_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) after scaling the longest side to ``size`` ([SA] ``ResizeLongestSide``)."""
    scale = size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


@dataclass(frozen=True)
class Geometry:
    """Where an H×W original image lands in the S×S input frame.

    The image is resized to ``resized_h × resized_w``, flipped left-right if ``flip``,
    then the window ``[crop_y, crop_y + crop_h) × [crop_x, crop_x + crop_w)`` of that
    (flipped) image is placed at the input's top-left corner.
    """

    orig_h: int
    orig_w: int
    resized_h: int
    resized_w: int
    crop_y: int = 0
    crop_x: int = 0
    crop_h: int = 0
    crop_w: int = 0
    flip: bool = False

    @property
    def input_size(self) -> tuple[int, int]:
        """(h, w) of the image content in the input frame, before padding."""
        return self.crop_h, self.crop_w

    def source_window_x(self) -> int:
        """Left column of the crop window in the *unflipped* resized image."""
        return self.resized_w - self.crop_x - self.crop_w if self.flip else self.crop_x


def plan_geometry(height: int, width: int, img_size: int, rng: np.random.Generator | None = None,
                  lsj_scale: tuple[float, float] | None = None, flip: bool = False) -> Geometry:
    """Choose the resize, flip and crop for one image.

    Without ``lsj_scale``: ResizeLongestSide to ``img_size``, no crop (the whole resized
    image fits). With ``lsj_scale = (lo, hi)``: ViTDet ``ResizeScale`` (the image is fit
    into a ``r·S × r·S`` box, r ~ U(lo, hi)) then ``FixedSizeCrop(S)`` at a uniformly
    random offset (detectron2 ``ResizeScale`` / ``FixedSizeCrop``). ``rng`` is needed
    for ``lsj_scale`` and the caller draws ``flip``.
    """
    if lsj_scale is None:
        rh, rw = resize_longest_side_shape(height, width, img_size)
        return Geometry(height, width, rh, rw, 0, 0, rh, rw, flip)
    assert rng is not None, "large-scale jitter needs an rng"
    ratio = rng.uniform(lsj_scale[0], lsj_scale[1])
    scale = ratio * img_size / max(height, width)
    rh, rw = max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))
    ch, cw = min(rh, img_size), min(rw, img_size)
    # Always draw both offsets so the rng stream does not depend on the image size.
    uy, ux = rng.uniform(0.0, 1.0), rng.uniform(0.0, 1.0)
    oy, ox = int((rh - ch) * uy + 0.5), int((rw - cw) * ux + 0.5)
    return Geometry(height, width, rh, rw, oy, ox, ch, cw, flip)


def nearest_source_index(src_len: int, dst_len: int, start: int, count: int) -> np.ndarray:
    """Source index under the centre of destination pixels ``start .. start+count-1``.

    Shape ``(count,)`` int64, non-decreasing: ``floor((i + 0.5) * src_len / dst_len)``.
    """
    dst = np.arange(start, start + count, dtype=np.int64)
    return ((2 * dst + 1) * src_len) // (2 * dst_len)


def rle_counts(counts: str | bytes | list[int], height: int, width: int) -> np.ndarray:
    """Run lengths (int64, zeros first, column-major) of a COCO RLE ``counts`` field.

    Accepts the compressed string form used by SA-1B (pycocotools ``rleToString``:
    5-bit groups + 48, continuation bit 0x20, sign bit 0x10, counts after the second
    stored as deltas from two before) or an uncompressed list. Vectorised in numpy, and
    unlike pycocotools it validates: raises ValueError if the runs do not cover
    exactly ``height × width`` pixels (pycocotools would write out of bounds).
    """
    if isinstance(counts, list):
        try:
            runs = np.asarray(counts, dtype=np.int64).reshape(-1)
        except (TypeError, OverflowError) as err:
            raise ValueError(f"RLE counts list is not integers: {err}") from err
    else:
        raw = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
        chars = np.frombuffer(raw, dtype=np.uint8).astype(np.int64) - 48
        if chars.size and (chars.min() < 0 or chars.max() > 63):
            raise ValueError("RLE counts string has characters outside the 6-bit alphabet")
        last = (chars & 0x20) == 0  # last character of each number
        if chars.size and not last[-1]:
            raise ValueError("RLE counts string ends inside a number")
        ends = np.flatnonzero(last)
        starts = np.concatenate(([0], ends[:-1] + 1)).astype(np.int64)
        lengths = ends - starts + 1
        if lengths.size and lengths.max() > 12:  # 12 × 5 bits already exceeds any count
            raise ValueError("RLE counts string has an over-long number")
        shift = 5 * (np.arange(chars.size) - np.repeat(starts, lengths))
        values = np.add.reduceat((chars & 0x1F) << shift, starts) if chars.size else chars
        negative = (chars[ends] & 0x10) != 0
        values = np.where(negative, values - (np.int64(1) << (5 * lengths)), values)
        runs = values.copy()
        runs[2::2] = np.cumsum(values[2::2])  # counts[i] += counts[i - 2] for i > 2
        runs[1::2] = np.cumsum(values[1::2])
    if (runs < 0).any() or int(runs.sum()) != height * width:
        raise ValueError(f"RLE runs cover {int(runs.sum())} pixels, expected {height}×{width}")
    return runs


def decode_rle_resized(runs: np.ndarray, geo: Geometry) -> np.ndarray:
    """Decode RLE run lengths straight into the crop window of the resized frame.

    Equals ``decode(rle)[sy][:, sx]`` with the :func:`nearest_source_index` grids of the
    window, but works on the runs: foreground runs are split per column, their row spans
    mapped through the row grid and painted with one ``np.repeat``. Cost grows with the
    number of runs and output pixels, not with the original resolution.

    Returns: ``crop_h × crop_w`` bool, C-contiguous (not flipped, see :func:`decode_masks`).
    """
    h, w = geo.orig_h, geo.orig_w
    ch, cw = geo.crop_h, geo.crop_w
    sy = nearest_source_index(h, geo.resized_h, geo.crop_y, ch)
    sx = nearest_source_index(w, geo.resized_w, geo.source_window_x(), cw)
    ends = np.cumsum(runs)
    begin, end = (ends - runs)[1::2], ends[1::2]  # odd runs are foreground
    keep = end > begin
    begin, end = begin[keep], end[keep]
    # Split runs that wrap over column boundaries into one piece per column.
    col0, col1 = begin // h, (end - 1) // h
    owner = np.repeat(np.arange(begin.size), col1 - col0 + 1)
    first = np.cumsum(col1 - col0 + 1) - (col1 - col0 + 1)
    col = col0[owner] + (np.arange(owner.size) - first[owner])
    row0 = np.where(col == col0[owner], begin[owner] - col0[owner] * h, 0)
    row1 = np.where(col == col1[owner], end[owner] - col1[owner] * h, h)
    # Output rows [t0, t1) sample source rows [row0, row1); output columns [c0, c0 + n)
    # sample source column `col` (n = 0 when shrinking skips it, > 1 when enlarging).
    t0, t1 = np.searchsorted(sy, row0), np.searchsorted(sy, row1)
    c0 = np.searchsorted(sx, col, "left")
    n = np.searchsorted(sx, col, "right") - c0
    ok = (n > 0) & (t1 > t0)
    t0, t1, c0, n = t0[ok], t1[ok], c0[ok], n[ok]
    owner = np.repeat(np.arange(t0.size), n)
    out_col = c0[owner] + (np.arange(owner.size) - (np.cumsum(n) - n)[owner])
    start = out_col * ch + t0[owner]  # column-major index in the crop_h × crop_w output
    order = np.argsort(start, kind="stable")
    start, stop = start[order], (out_col * ch + t1[owner])[order]
    lengths = np.empty(2 * start.size + 1, dtype=np.int64)
    lengths[0:-1:2] = start - np.concatenate(([0], stop[:-1]))
    lengths[1::2] = stop - start
    lengths[-1] = ch * cw - (stop[-1] if stop.size else 0)
    values = np.zeros(lengths.size, dtype=np.uint8)
    values[1::2] = 1
    # cv2.transpose is a blocked transpose, ~5x faster than a numpy/torch strided copy.
    return cv2.transpose(np.repeat(values, lengths).reshape(cw, ch)).view(bool)


def decode_rle_pycocotools(rle: dict, geo: Geometry) -> np.ndarray:
    """Reference path: full-size ``pycocotools.mask.decode``, then the same sampling.

    Returns: ``crop_h × crop_w`` bool, identical to :func:`decode_rle_resized`.
    """
    from pycocotools import mask as mask_utils

    if isinstance(rle["counts"], list):  # uncompressed form
        rle = mask_utils.frPyObjects(rle, geo.orig_h, geo.orig_w)
    full = mask_utils.decode(rle)  # H×W uint8, Fortran order
    sy = nearest_source_index(geo.orig_h, geo.resized_h, geo.crop_y, geo.crop_h)
    sx = nearest_source_index(geo.orig_w, geo.resized_w, geo.source_window_x(), geo.crop_w)
    return full[sy][:, sx].astype(bool)


def decode_masks(rles: list[dict], geo: Geometry, method: str = "direct") -> list[np.ndarray]:
    """Decode SA-1B ``segmentation`` dicts into the input frame (flip applied).

    Args:
        rles: ``{"size": [H, W], "counts": str}`` per mask, sizes already checked.
        method: ``"direct"`` or ``"pycocotools"`` (same result).
    Returns: one ``crop_h × crop_w`` bool array per mask (possibly empty masks).
    Raises: ValueError for RLE counts that do not describe an H×W mask.
    """
    out = []
    for rle in rles:
        runs = rle_counts(rle["counts"], geo.orig_h, geo.orig_w)  # validates either way
        if method == "direct":
            mask = decode_rle_resized(runs, geo)
        else:
            mask = decode_rle_pycocotools(rle, geo)
        # cv2.flip keeps masks C-contiguous (torch.from_numpy rejects negative strides)
        out.append(cv2.flip(mask.view(np.uint8), 1).view(bool) if geo.flip else mask)
    return out


# ------------------------------------------------------------------------------ JPEG

AUTO_JPEG_DECODER = "cv2"
"""What ``jpeg_decoder="auto"`` means. ``benchmarks/bench_data.py`` (1500×2250 SA-1B-like
JPEGs → 1024, one thread) measured OpenCV 1.1-1.3× faster than Pillow, both full-size and
DCT-downscaled."""

_CV2_FLAGS = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2,
              4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(H, W) from the JPEG header, after checking the file is a complete JPEG.

    OpenCV returns a grey-filled image for a truncated JPEG instead of failing, so the
    start (SOI) and end (EOI) markers are checked for both decoders. Raises ValueError.
    """
    if data[:2] != b"\xff\xd8" or data.rstrip(b"\0")[-2:] != b"\xff\xd9":
        raise ValueError("missing JPEG start/end marker (truncated?)")
    try:
        width, height = Image.open(io.BytesIO(data)).size
    except Exception as err:  # Pillow raises OSError, SyntaxError, struct.error, ...
        raise ValueError(f"unreadable JPEG header: {err!r}") from err
    return height, width


def dct_scale(size: tuple[int, int], target: tuple[int, int]) -> int:
    """Largest libjpeg scale-down 8/4/2/1 keeping the decode >= target (Pillow's rule)."""
    ratio = min(size[0] // max(target[0], 1), size[1] // max(target[1], 1))
    return next((f for f in (8, 4, 2) if ratio >= f), 1)


def decode_jpeg(data: bytes, decoder: str, size: tuple[int, int],
                target: tuple[int, int] | None = None) -> np.ndarray:
    """Decode to ``h × w × 3`` uint8 RGB with ``"pil"``, ``"cv2"`` or ``"auto"``.

    EXIF orientation is ignored by both (masks index the stored pixels). With ``target``
    (h, w), libjpeg may decode at 1/2, 1/4 or 1/8 scale (``ceil(H/f) × ceil(W/f)``, never
    below ``target``); :func:`resize_image` does the rest. Raises ValueError.
    """
    factor = dct_scale(size, target) if target else 1
    decoder = AUTO_JPEG_DECODER if decoder == "auto" else decoder
    try:
        if decoder == "cv2":
            flags = _CV2_FLAGS[factor] | cv2.IMREAD_IGNORE_ORIENTATION
            bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
            if bgr is None:
                raise ValueError("cv2.imdecode returned nothing")
            image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        else:
            pil = Image.open(io.BytesIO(data))
            if factor > 1:
                pil.draft("RGB", (target[1], target[0]))
            image = np.asarray(pil.convert("RGB"))
    except Exception as err:  # decoders raise OSError, ValueError, cv2.error, ...
        raise ValueError(f"JPEG decode failed: {err!r}") from err
    expected = (math.ceil(size[0] / factor), math.ceil(size[1] / factor))
    if image.shape[:2] != expected:
        raise ValueError(f"decoded {image.shape[:2]}, JPEG header says {expected}")
    return image


# ---------------------------------------------------------------------------- resize

def resize_image(image: np.ndarray, geo: Geometry) -> np.ndarray:
    """Resize, flip and crop an RGB image into the crop window.

    Args:
        image: ``h0 × w0 × 3`` uint8 covering the whole original image (it may be a
            DCT-downscaled decode, so ``h0×w0`` need not equal ``orig_h×orig_w``).
    Returns: ``crop_h × crop_w × 3`` uint8, C-contiguous.
    """
    size = (geo.resized_w, geo.resized_h)
    if (image.shape[1], image.shape[0]) != size:
        shrink = geo.resized_w * geo.resized_h < image.shape[0] * image.shape[1]
        method = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
        image = cv2.resize(image, size, interpolation=method)
    if geo.flip:
        image = image[:, ::-1]
    window = image[geo.crop_y:geo.crop_y + geo.crop_h, geo.crop_x:geo.crop_x + geo.crop_w]
    return np.ascontiguousarray(window)


def masks_to_boxes(masks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Tight XYXY boxes of binary masks, in the masks' pixel frame.

    ``x2``/``y2`` are the last foreground column/row (inclusive), the convention of
    segment-anything ``utils/amg.py`` ``batched_mask_to_box`` and torchvision
    ``masks_to_boxes``.

    Returns: (``M × 4`` float32 boxes, ``M`` bool "mask is non-empty"); empty masks get
    ``[0, 0, 0, 0]``.
    """
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    nonempty = np.zeros(len(masks), dtype=bool)
    for i, mask in enumerate(masks):
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if rows.size:
            boxes[i] = (cols[0], rows[0], cols[-1], rows[-1])
            nonempty[i] = True
    return boxes, nonempty


_MEAN = torch.tensor(PIXEL_MEAN, dtype=torch.float32).view(3, 1, 1)
_STD = torch.tensor(PIXEL_STD, dtype=torch.float32).view(3, 1, 1)


def normalize_into(image: np.ndarray, out: torch.Tensor) -> None:
    """Write ``(image - mean) / std`` into the top-left of a zeroed ``3 × S × S`` tensor.

    Args:
        image: ``h × w × 3`` uint8 RGB (h, w <= S).
        out: ``3 × S × S`` float32, already zero (the padding stays 0 = mean colour).
    """
    h, w = image.shape[:2]
    if not image.flags.writeable:  # Pillow's arrays are read-only; torch wants writable
        image = image.copy()
    slot = out[:, :h, :w]
    slot.copy_(torch.from_numpy(image).permute(2, 0, 1))
    slot.sub_(_MEAN).div_(_STD)
