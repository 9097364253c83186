"""Synthetic SA-1B writer: format, determinism, scene structure, CLI."""

from __future__ import annotations

import json
import tarfile

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from trainer.data.synth import main, write_synthetic_shards
from trainer.storage import open_url

# pycocotools 2.0 + numpy 2 warn inside mask.decode; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

ANNOTATION_FIELDS = {"id", "segmentation", "bbox", "area", "predicted_iou", "stability_score",
                     "crop_box", "point_coords"}


def _members(url: str) -> list[tuple[str, bytes]]:
    with open_url(url) as fileobj, tarfile.open(fileobj=fileobj, mode="r|") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


def test_shards_are_deterministic_and_complete() -> None:
    a = write_synthetic_shards("memory://synth-a", 5, 2, seed=4, min_side=40, max_side=90)
    b = write_synthetic_shards("memory://synth-b", 5, 2, seed=4, min_side=40, max_side=90)
    c = write_synthetic_shards("memory://synth-c", 5, 2, seed=5, min_side=40, max_side=90)
    assert [u.rsplit("/", 1)[1] for u in a] == ["sa_000000.tar", "sa_000001.tar"]
    assert [_members(u) for u in a] == [_members(u) for u in b]
    assert [_members(u) for u in a] != [_members(u) for u in c]
    names = [n for u in a for n, _ in _members(u)]
    assert names == [f"sa_{i}.{ext}" for i in range(1, 6) for ext in ("jpg", "json")]


def test_sa1b_fields_and_real_rle() -> None:
    (url,) = write_synthetic_shards("memory://synth-fields", 4, 1, seed=0, min_side=64,
                                    max_side=128, min_masks=6, max_masks=20)
    members = dict(_members(url))
    contained = 0
    for image_id in range(1, 5):
        doc = json.loads(members[f"sa_{image_id}.json"])
        jpg = np.frombuffer(members[f"sa_{image_id}.jpg"], np.uint8)
        image = cv2.imdecode(jpg, cv2.IMREAD_COLOR)
        h, w = image.shape[:2]
        assert doc["image"] == {"image_id": image_id, "width": w, "height": h,
                                "file_name": f"sa_{image_id}.jpg"}
        anns = doc["annotations"]
        assert 3 <= len(anns) <= 40
        masks = []
        for ann in anns:
            assert set(ann) == ANNOTATION_FIELDS and isinstance(ann["segmentation"]["counts"], str)
            mask = mask_utils.decode(ann["segmentation"]).astype(bool)
            assert mask.shape == (h, w) and mask.sum() == ann["area"] > 0
            ys, xs = np.nonzero(mask)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]
            px, py = ann["point_coords"][0]
            assert mask[int(py), int(px)] and ann["crop_box"] == [0, 0, w, h]
            masks.append(mask)
        # Occlusion: masks are disjoint unless one contains the other (whole/part).
        for i in range(len(masks)):
            for j in range(i + 1, len(masks)):
                both = masks[i] & masks[j]
                if both.any():
                    assert both.sum() in (masks[i].sum(), masks[j].sum())
                    contained += 1
    assert contained > 0


def test_rejects_impossible_arguments() -> None:
    with pytest.raises(ValueError, match="num_shards"):
        write_synthetic_shards("memory://synth-bad", 2, 3)


def test_cli_prints_where_shards_went(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    assert main(["--out", str(tmp_path / "out"), "--images", "2", "--shards", "1",
                 "--min-side", "32", "--max-side", "48"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "out") in out and "sa_000000.tar" in out
    assert (tmp_path / "out" / "sa_000000.tar").is_file()
