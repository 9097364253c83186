"""Synthetic SA-1B: tar shards in the exact released format, with learnable scenes.

Each image is a textured background with textured, distinctly coloured shapes
(ellipses, rotated rectangles, polygons, annuli with see-through holes), drawn in
order so later shapes occlude earlier ones (whose masks lose the covered pixels), plus
a few whole/part objects (a body with an inner part: one mask for the part, one for
the whole). Masks are real COCO compressed RLE (pycocotools ``encode``); every JSON
carries the full SA-1B field set (SAM_RECIPE.md §4). Output is deterministic in the seed.

Run:  python -m trainer.data.synth --out /tmp/sa1b --images 64 --shards 4
      (``sam-train synth`` wraps the same ``main``).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import tarfile
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from trainer.storage import join_url, open_url, protocol_of, url_to_fs

_MIN_AREA = 20  # drop masks smaller than this (SA-1B removes regions under 100 px at 1500p)
_KINDS = ("ellipse", "rectangle", "polygon", "annulus", "whole_part")


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Muted low-frequency colour field plus grain: H×W×3 uint8 (RGB)."""
    grid = rng.uniform(60, 190, size=(int(rng.integers(3, 7)), int(rng.integers(3, 7)), 3))
    grey = grid.mean(axis=2, keepdims=True)
    grid = grey + 0.35 * (grid - grey)  # low saturation, so saturated shapes stand out
    field = cv2.resize(grid.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
    field += rng.normal(0.0, 6.0, size=(height, width, 1)).astype(np.float32)
    return np.clip(field, 0, 255).astype(np.uint8)


def _colour(hue: float, rng: np.random.Generator) -> np.ndarray:
    hsv = np.array([[[hue * 180.0, rng.uniform(170, 255), rng.uniform(140, 255)]]], np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _texture(rng: np.random.Generator, shape: tuple[int, int], base: np.ndarray) -> np.ndarray:
    """A colour patch with stripes, checks or noise around ``base``: h×w×3 uint8."""
    h, w = shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    kind, amp = int(rng.integers(0, 3)), rng.uniform(10, 30)
    if kind == 0:
        angle, period = rng.uniform(0, math.pi), rng.uniform(4, 16)
        pattern = np.sin(2 * math.pi * (xs * math.cos(angle) + ys * math.sin(angle)) / period)
    elif kind == 1:
        cell = int(rng.integers(3, 10))
        pattern = (((ys // cell) + (xs // cell)) % 2) * 2.0 - 1.0
    else:
        pattern = rng.normal(0.0, 0.6, size=(h, w)).astype(np.float32)
    return np.clip(base + amp * pattern[..., None], 0, 255).astype(np.uint8)


def _shape(kind: str, rng: np.random.Generator, size: tuple[int, int], radius: float) -> np.ndarray:
    """Binary h×w uint8 shape centred in a patch of ``size``."""
    h, w = size
    out = np.zeros((h, w), np.uint8)
    centre = (w // 2, h // 2)
    axes = (max(1, int(radius)), max(1, int(radius * rng.uniform(0.4, 1.0))))
    angle = float(rng.uniform(0, 180))
    if kind in ("ellipse", "whole_part"):
        cv2.ellipse(out, centre, axes, angle, 0, 360, 1, -1)
    elif kind == "annulus":
        thickness = max(2, int(min(axes) * rng.uniform(0.3, 0.6)))
        inner = (max(1, axes[0] - thickness // 2), max(1, axes[1] - thickness // 2))
        cv2.ellipse(out, centre, inner, angle, 0, 360, 1, thickness)
    elif kind == "rectangle":
        box = cv2.boxPoints(((centre[0], centre[1]), (2 * axes[0], 2 * axes[1]), angle))
        cv2.fillPoly(out, [np.round(box).astype(np.int32)], 1)
    else:
        count = int(rng.integers(3, 9))
        angles = np.sort(rng.uniform(0, 2 * math.pi, count))
        radii = radius * rng.uniform(0.5, 1.0, count)
        pts = np.stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)], 1)
        cv2.fillPoly(out, [np.round(pts).astype(np.int32)], 1)
    return out


def _draw(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, kind: str,
          label: int, hue: float, radius: float) -> tuple[int, int, int, int]:
    """Paint one shape (texture into ``image``, ``label`` into ``labels``); returns its
    clipped box (x0, y0, x1, y1), which bounds every pixel it owns."""
    height, width = labels.shape
    side = int(2 * radius) + 3
    cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
    x0, y0 = cx - side // 2, cy - side // 2
    shape = _shape(kind, rng, (side, side), radius)
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + side, width), min(y0 + side, height)
    if cx1 <= cx0 or cy1 <= cy0:
        return 0, 0, 0, 0
    local = shape[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0].astype(bool)
    patch = _texture(rng, local.shape, _colour(hue, rng))
    image[cy0:cy1, cx0:cx1][local] = patch[local]
    labels[cy0:cy1, cx0:cx1][local] = label
    return cx0, cy0, cx1, cy1


def _annotation(crop: np.ndarray, x0: int, y0: int, size: tuple[int, int], ann_id: int,
                rng: np.random.Generator) -> dict[str, Any] | None:
    """SA-1B annotation for a bool mask given as its crop at (x0, y0) of an image of
    ``size`` (H, W); None if too small. Works on the crop: full-size passes are slow."""
    area = int(crop.sum())
    if area < _MIN_AREA:
        return None
    height, width = size
    full = np.zeros((height, width), np.uint8, order="F")  # pycocotools wants Fortran order
    full[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]] = crop
    rle = mask_utils.encode(full)
    ys, xs = np.nonzero(crop)
    pick = int(rng.integers(0, len(xs)))
    return {
        "id": ann_id,
        "segmentation": {"size": [height, width], "counts": rle["counts"].decode("utf-8")},
        # segment-anything amg writes XYWH with w = x2 - x1 for an inclusive x2
        "bbox": [x0 + int(xs.min()), y0 + int(ys.min()), int(xs.max() - xs.min()),
                 int(ys.max() - ys.min())],
        "area": area,
        "predicted_iou": round(float(rng.uniform(0.88, 1.0)), 6),
        "stability_score": round(float(rng.uniform(0.95, 1.0)), 6),
        "crop_box": [0, 0, width, height],
        "point_coords": [[float(x0 + xs[pick]), float(y0 + ys[pick])]],
    }


def synth_sample(rng: np.random.Generator, height: int, width: int, num_shapes: int,
                 image_id: int, jpeg_quality: int = 90,
                 radius_frac: tuple[float, float] = (0.03, 0.3)) -> tuple[bytes, dict[str, Any]]:
    """One scene: (JPEG bytes, SA-1B JSON dict). Up to ``num_shapes`` shapes; whole/part
    objects add two masks, fully occluded or tiny shapes add none. Shape radii are
    log-uniform in ``radius_frac`` × the short side."""
    image = _background(rng, height, width)
    labels = np.zeros((height, width), np.int32)
    groups: list[tuple[tuple[int, ...], tuple[int, int, int, int]]] = []
    hue0, short = rng.uniform(0, 1), min(height, width)
    for k in range(num_shapes):
        kind = _KINDS[int(rng.choice(len(_KINDS), p=[0.3, 0.2, 0.2, 0.15, 0.15]))]
        radius = short * math.exp(rng.uniform(math.log(radius_frac[0]), math.log(radius_frac[1])))
        hue = (hue0 + 0.618 * k) % 1.0  # golden-ratio hues: neighbours differ
        body = 2 * k + 1
        box = _draw(image, labels, rng, kind, body, hue, radius)
        if kind == "whole_part" and box[2] > box[0]:
            part = body + 1
            sub = _draw_part(image, labels, rng, box, part, (hue + 0.5) % 1.0, radius)
            groups.append(((part,), sub))
            groups.append(((body, part), box))
        else:
            groups.append(((body,), box))
    annotations = []
    for ids, (x0, y0, x1, y1) in groups:
        if x1 <= x0:
            continue
        crop = np.isin(labels[y0:y1, x0:x1], ids)
        ann = _annotation(crop, x0, y0, (height, width), image_id * 1000 + len(annotations), rng)
        if ann is not None:
            annotations.append(ann)
    ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
    assert ok, "cv2.imencode failed"
    doc = {"image": {"image_id": image_id, "width": width, "height": height,
                     "file_name": f"sa_{image_id}.jpg"}, "annotations": annotations}
    return jpg.tobytes(), doc


def _draw_part(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
               box: tuple[int, int, int, int], label: int, hue: float,
               radius: float) -> tuple[int, int, int, int]:
    """A smaller shape inside the body's box (e.g. a window on a house)."""
    x0, y0, x1, y1 = box
    sub = np.zeros((y1 - y0, x1 - x0, 3), np.uint8)
    sub_labels = np.zeros((y1 - y0, x1 - x0), np.int32)
    r = max(2.0, radius * rng.uniform(0.25, 0.45))
    bx0, by0, bx1, by1 = _draw(sub, sub_labels, rng, "ellipse", label, hue, r)
    body = labels[y0:y1, x0:x1] != 0
    inside = (sub_labels == label) & body & (labels[y0:y1, x0:x1] == label - 1)
    image[y0:y1, x0:x1][inside] = sub[inside]
    labels[y0:y1, x0:x1][inside] = label
    return x0 + bx0, y0 + by0, x0 + bx1, y0 + by1


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed mtime: reproducible bytes
    tar.addfile(info, io.BytesIO(data))


def write_synthetic_shards(out_url: str, num_images: int, num_shards: int, seed: int = 0,
                           min_side: int = 192, max_side: int = 384, min_masks: int = 4,
                           max_masks: int = 30, jpeg_quality: int = 90,
                           radius_frac: tuple[float, float] = (0.03, 0.3)) -> list[str]:
    """Write ``sa_000000.tar`` ... under ``out_url`` (any fsspec URL or local path).

    Images ``1..num_images`` are split into contiguous runs per shard, each as
    ``sa_<id>.jpg`` then ``sa_<id>.json``. Height and width are drawn independently
    from ``[min_side, max_side]``; each image gets ``min_masks..max_masks`` shapes whose
    radii are log-uniform in ``radius_frac`` (fractions of the short side).
    Returns the shard URLs.
    """
    if num_shards < 1 or num_images < num_shards:
        raise ValueError(f"need 1 <= num_shards <= num_images, got {num_shards} shards "
                         f"for {num_images} images")
    if not 8 <= min_side <= max_side:
        raise ValueError(f"need 8 <= min_side <= max_side, got {min_side}, {max_side}")
    if not 0 < radius_frac[0] <= radius_frac[1] <= 1:
        raise ValueError(f"need 0 < radius_frac[0] <= radius_frac[1] <= 1, got {radius_frac}")
    if not 1 <= min_masks <= max_masks:
        raise ValueError(f"need 1 <= min_masks <= max_masks, got {min_masks}, {max_masks}")
    if protocol_of(out_url) == "file":
        fs, path = url_to_fs(out_url)
        fs.makedirs(path, exist_ok=True)
    urls = []
    for shard, ids in enumerate(np.array_split(np.arange(1, num_images + 1), num_shards)):
        url = join_url(out_url, f"sa_{shard:06d}.tar")
        with open_url(url, "wb") as fileobj, tarfile.open(fileobj=fileobj, mode="w|") as tar:
            for image_id in ids.tolist():
                rng = np.random.default_rng([seed, image_id])
                height, width = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
                shapes = int(rng.integers(min_masks, max_masks + 1))
                jpg, doc = synth_sample(rng, height, width, shapes, image_id, jpeg_quality, radius_frac)
                _tar_add(tar, f"sa_{image_id}.jpg", jpg)
                _tar_add(tar, f"sa_{image_id}.json", json.dumps(doc).encode("utf-8"))
        urls.append(url)
    return urls


def main(argv: list[str] | None = None) -> int:
    """CLI: write synthetic SA-1B shards and print where they went."""
    parser = argparse.ArgumentParser(
        prog="sam-train synth", description="Write synthetic SA-1B-format tar shards.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True,
                        help="output folder URL (path, file://, gs://, ...)")
    parser.add_argument("--images", type=int, default=64, help="number of images")
    parser.add_argument("--shards", type=int, default=4, help="number of tar shards")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same shards)")
    parser.add_argument("--min-side", type=int, default=192, help="smallest image side, px")
    parser.add_argument("--max-side", type=int, default=384, help="largest image side, px")
    parser.add_argument("--min-masks", type=int, default=4, help="fewest shapes per image")
    parser.add_argument("--max-masks", type=int, default=30, help="most shapes per image")
    parser.add_argument("--radius-frac", type=float, nargs=2, default=(0.03, 0.3), metavar=("MIN", "MAX"),
                        help="shape radius range as fractions of the short side (log-uniform)")
    args = parser.parse_args(argv)
    urls = write_synthetic_shards(args.out, args.images, args.shards, args.seed, args.min_side,
                                  args.max_side, args.min_masks, args.max_masks,
                                  radius_frac=tuple(args.radius_frac))
    print(f"wrote {len(urls)} shards ({args.images} images) to {args.out}")
    for url in urls:
        print(url)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
