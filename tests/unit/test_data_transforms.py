"""Geometry, RLE decoding, normalisation and padding of single samples."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from trainer.data import DataConfig, collate
from trainer.data.sa1b import RawPair, SkipSample, decode_sample, select_annotations
from trainer.data.transforms import (
    PIXEL_MEAN,
    Geometry,
    decode_masks,
    decode_rle_pycocotools,
    decode_rle_resized,
    masks_to_boxes,
    nearest_source_index,
    plan_geometry,
    resize_image,
    resize_longest_side_shape,
    rle_counts,
)

# pycocotools 2.0 + numpy 2 warn inside mask.decode; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("utf-8")}


def _random_masks(rng: np.random.Generator, h: int, w: int) -> list[np.ndarray]:
    masks = [np.zeros((h, w), bool), np.ones((h, w), bool), rng.random((h, w)) < 0.05]
    for _ in range(3):
        m = np.zeros((h, w), np.uint8)
        cv2.ellipse(m, (int(rng.integers(0, w)), int(rng.integers(0, h))),
                    (int(rng.integers(2, w)), int(rng.integers(2, h))), 30, 0, 360, 1, -1)
        masks.append(m.astype(bool))
    edge = np.zeros((h, w), bool)
    edge[:, -1] = edge[-1, :] = True  # runs wrapping column ends
    return masks + [edge]


def _pair(image: np.ndarray, masks: list[np.ndarray], image_id: int = 7) -> RawPair:
    h, w = image.shape[:2]
    anns = [{"id": i, "segmentation": _rle(m), "bbox": [0, 0, 1, 1], "area": int(m.sum()),
             "predicted_iou": 0.9, "stability_score": 0.97, "crop_box": [0, 0, w, h],
             "point_coords": [[0.0, 0.0]]} for i, m in enumerate(masks)]
    doc = {"image": {"image_id": image_id, "width": w, "height": h, "file_name": "x.jpg"},
           "annotations": anns}
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, jpg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return RawPair(f"sa_{image_id}", jpg.tobytes(), json.dumps(doc).encode(), 0)


def test_resize_longest_side_matches_segment_anything() -> None:
    assert resize_longest_side_shape(1500, 2250, 1024) == (683, 1024)
    assert resize_longest_side_shape(300, 200, 1024) == (1024, 683)
    assert resize_longest_side_shape(64, 64, 256) == (256, 256)


@pytest.mark.parametrize("out_hw", [(30, 45), (61, 90), (150, 113), (7, 3)])
@pytest.mark.parametrize("flip", [False, True])
def test_direct_rle_decode_equals_pycocotools(out_hw: tuple[int, int], flip: bool) -> None:
    rng = np.random.default_rng(0)
    h, w = 61, 90
    for mask in _random_masks(rng, h, w):
        rle = _rle(mask)
        for geo in (Geometry(h, w, *out_hw, 0, 0, *out_hw, flip),
                    Geometry(h, w, *out_hw, out_hw[0] // 3, out_hw[1] // 4,
                             out_hw[0] - out_hw[0] // 3, out_hw[1] // 2, flip)):
            direct = decode_masks([rle], geo, "direct")[0]
            ref = decode_masks([rle], geo, "pycocotools")[0]
            sy = nearest_source_index(h, geo.resized_h, 0, geo.resized_h)
            sx = nearest_source_index(w, geo.resized_w, 0, geo.resized_w)
            full = mask[sy][:, sx][:, ::-1] if flip else mask[sy][:, sx]
            window = full[geo.crop_y:geo.crop_y + geo.crop_h, geo.crop_x:geo.crop_x + geo.crop_w]
            assert direct.shape == (geo.crop_h, geo.crop_w)
            np.testing.assert_array_equal(direct, ref)
            np.testing.assert_array_equal(direct, window)


def test_rle_counts_parses_and_validates() -> None:
    mask = _random_masks(np.random.default_rng(1), 20, 30)[3]
    rle = _rle(mask)
    runs = rle_counts(rle["counts"], 20, 30)
    flat = np.repeat(np.arange(runs.size) % 2, runs).astype(bool)
    np.testing.assert_array_equal(flat.reshape(30, 20).T, mask)
    np.testing.assert_array_equal(rle_counts(runs.tolist(), 20, 30), runs)
    with pytest.raises(ValueError):
        rle_counts(rle["counts"], 21, 30)  # runs do not cover the size
    with pytest.raises(ValueError):
        rle_counts("\x7f\x7f", 20, 30)  # outside the alphabet
    geo = Geometry(20, 30, 20, 30, 0, 0, 20, 30)
    np.testing.assert_array_equal(decode_rle_resized(runs, geo), mask)
    np.testing.assert_array_equal(decode_rle_pycocotools(rle, geo), mask)


def test_mask_box_equals_transformed_box_and_padding_is_zero() -> None:
    # 512×384 → S=256 is an exact 0.5 scale, so the transformed box is known exactly.
    image = np.full((384, 512, 3), 90, np.uint8)
    rect = np.zeros((384, 512), bool)
    rect[20:60, 40:120] = True
    image[rect] = (230, 20, 20)
    cfg = DataConfig(shards="unused", img_size=256)
    sample = decode_sample(_pair(image, [rect]), cfg, epoch=0)
    assert sample.input_size == (192, 256) and sample.original_size == (384, 512)
    # XYWH box in the original frame, scaled by 0.5 (inclusive max): (20, 10, 59, 29)
    x, y, bw, bh = 40, 20, 80, 40
    expected = np.array([x * 0.5, y * 0.5, (x + bw) * 0.5 - 1, (y + bh) * 0.5 - 1], np.float32)
    np.testing.assert_array_equal(sample.boxes[0], expected)

    batch = collate([sample], 256)
    mask = batch.masks[0, 0]
    ys, xs = torch.nonzero(mask, as_tuple=True)
    assert [xs.min(), ys.min(), xs.max(), ys.max()] == expected.tolist()
    assert torch.equal(batch.boxes[0, 0], torch.from_numpy(expected))
    red = batch.images[0, 0] > 0.6  # the red rectangle lands exactly on the mask
    assert torch.equal(red, mask)
    assert batch.images[0, :, 192:].abs().max() == 0 and not batch.masks[0, :, 192:].any()
    grey = (90 - PIXEL_MEAN[0]) / 58.395
    assert batch.images[0, 0, 150, 200].item() == pytest.approx(grey, abs=0.1)


def test_collate_pads_masks_boxes_and_valid() -> None:
    rng = np.random.default_rng(2)
    image = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    masks = []
    for y0, x0 in ((2, 3), (20, 30), (10, 40)):
        m = np.zeros((40, 60), bool)
        m[y0:y0 + 12, x0:x0 + 15] = True
        masks.append(m)
    cfg = DataConfig(shards="unused", img_size=64)
    one = decode_sample(_pair(image, masks[:1], 1), cfg, 0)
    many = decode_sample(_pair(image, masks, 2), cfg, 0)
    batch = collate([one, many], 64)
    assert batch.images.shape == (2, 3, 64, 64) and batch.images.dtype == torch.float32
    assert batch.masks.shape == (2, len(masks), 64, 64) and batch.masks.dtype == torch.bool
    assert batch.boxes.shape == (2, len(masks), 4) and batch.valid.dtype == torch.bool
    assert batch.valid.tolist() == [[True] + [False] * (len(masks) - 1), [True] * len(masks)]
    assert not batch.masks[0, 1:].any() and not batch.boxes[0, 1:].any()
    assert batch.input_sizes.tolist() == [[43, 64]] * 2
    assert batch.original_sizes.dtype == torch.int64 and batch.image_ids == [1, 2]
    moved = batch.to("cpu")
    assert torch.equal(moved.masks, batch.masks) and moved.image_ids == [1, 2]


def test_area_filter_and_max_masks_sampling() -> None:
    anns = [{"area": a} for a in (0, 10, 95, 50, 90)]
    kept = select_annotations(anns, 10, 10, 0.9, 64, np.random.default_rng(0))
    assert [a["area"] for a in kept] == [10, 50, 90]  # 0 and 95% dropped, 90% kept
    with pytest.raises(SkipSample) as err:
        select_annotations([{"area": 99}], 10, 10, 0.9, 64, np.random.default_rng(0))
    assert err.value.reason == "no_annotations"
    many = [{"area": i + 1} for i in range(20)]
    a = select_annotations(many, 10, 10, 0.9, 5, np.random.default_rng(3))
    b = select_annotations(many, 10, 10, 0.9, 5, np.random.default_rng(3))
    assert a == b and len(a) == 5 and a == sorted(a, key=lambda x: x["area"])


def test_sampling_is_seeded_per_image_and_epoch() -> None:
    rng = np.random.default_rng(4)
    image = rng.integers(0, 255, (50, 50, 3), dtype=np.uint8)
    masks = []
    for i in range(12):
        m = np.zeros((50, 50), bool)
        m[i * 4:i * 4 + 3, 5:45] = True
        masks.append(m)
    cfg = DataConfig(shards="unused", img_size=50, max_masks_per_image=4)
    first = decode_sample(_pair(image, masks), cfg, epoch=0)
    again = decode_sample(_pair(image, masks), cfg, epoch=0)
    later = [decode_sample(_pair(image, masks), cfg, epoch=e).boxes for e in range(1, 4)]
    assert len(first.masks) == 4 and np.array_equal(first.boxes, again.boxes)
    assert any(not np.array_equal(first.boxes, b) for b in later)


def test_flip_mirrors_image_and_masks() -> None:
    rng = np.random.default_rng(5)
    image = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    mask = _random_masks(rng, 30, 40)[4]
    plain = Geometry(30, 40, 30, 40, 0, 0, 30, 40)
    flipped = Geometry(30, 40, 30, 40, 0, 0, 30, 40, True)
    np.testing.assert_array_equal(resize_image(image, flipped), resize_image(image, plain)[:, ::-1])
    np.testing.assert_array_equal(decode_masks([_rle(mask)], flipped)[0], mask[:, ::-1])


def test_lsj_geometry_and_alignment() -> None:
    rng = np.random.default_rng(6)
    sizes = set()
    for _ in range(50):
        geo = plan_geometry(300, 200, 128, rng, (0.1, 2.0))
        assert 1 <= geo.crop_h <= 128 and 1 <= geo.crop_w <= 128
        assert 0 <= geo.crop_y <= geo.resized_h - geo.crop_h
        assert 0 <= geo.crop_x <= geo.resized_w - geo.crop_w
        sizes.add(geo.resized_h)
    assert min(sizes) < 40 and max(sizes) > 200  # both shrinking and enlarging happen
    # The image's red channel draws the masks: after jitter, boxes must still match it.
    image = np.full((120, 160, 3), 40, np.uint8)
    masks = []
    for y0, x0 in ((10, 10), (60, 90), (30, 50)):
        m = np.zeros((120, 160), bool)
        m[y0:y0 + 40, x0:x0 + 50] = True
        image[m, 0] = 250
        masks.append(m)
    cfg = DataConfig(shards="unused", img_size=96, lsj=True, jpeg_dct_downscale=False)
    for epoch in range(6):
        try:
            sample = decode_sample(_pair(image, masks), cfg, epoch)
        except SkipSample as err:
            assert err.reason == "empty_after_transform"
            continue
        assert all(m.any() for m in sample.masks)  # emptied masks are dropped
        red = sample.image[..., 0] > 145
        union = np.logical_or.reduce(sample.masks)
        assert (red ^ union).sum() <= 0.1 * union.sum() + 4 * sum(union.shape)
        boxes, _ = masks_to_boxes(sample.masks)
        np.testing.assert_array_equal(boxes, sample.boxes)
        batch = collate([sample], 96)  # flipped masks collate too
        h, w = sample.input_size
        assert torch.equal(batch.masks[0, :len(sample.masks), :h, :w],
                           torch.from_numpy(np.stack(sample.masks)))
