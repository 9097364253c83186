"""Evaluation (trainer.evaluate): point placement, the in-order data pass, the protocol
with the real tiny model, and the training-time eval scoring what ``sam-train eval`` does."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from trainer import dist
from trainer.config import ConfigError, load_config
from trainer.data import Batch, write_synthetic_shards
from trainer.engine import TrainRun
from trainer.evaluate import (
    EVAL_MAX_MASKS,
    _farthest_from_boundary,
    _ious,
    center_points,
    correction_points,
    eval_data_config,
    evaluate,
    evaluate_shards,
    iter_eval_batches,
    metric_keys,
    parse_points,
    run_clicks,
)
from trainer.model import build_sam
from trainer.presets import PRESETS, Config
from trainer.prompts import boxes_from_masks

S = 64


def _square(x0: int, y0: int, x1: int, y1: int, size: int = S) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


# ---------------------------------------------------------------------- point placement


def test_false_negative_gets_a_positive_point_at_its_center() -> None:
    gt = _square(10, 10, 50, 30)  # 40 wide, 20 high
    pred = _square(10, 10, 30, 30)  # left half found; FN = x 30..49
    coords, labels = correction_points(pred[None], gt[None], (S, S))
    assert labels.tolist() == [[1]]
    x, y = coords[0, 0].tolist()
    assert 38 <= x <= 41 and 18 <= y <= 21  # center of the FN block x 30..49, y 10..29


def test_false_positive_gets_a_negative_point_at_its_center() -> None:
    gt = _square(5, 5, 25, 25)
    pred = gt | _square(35, 35, 55, 55)  # GT found, plus a spurious block
    coords, labels = correction_points(pred[None], gt[None], (S, S))
    assert labels.tolist() == [[0]]
    x, y = coords[0, 0].tolist()
    assert 43 <= x <= 46 and 43 <= y <= 46
    assert not gt[int(y), int(x)] and pred[int(y), int(x)]


def test_the_error_region_farthest_from_its_boundary_wins() -> None:
    gt = _square(0, 0, 30, 30) | _square(40, 40, 44, 44)
    pred = _square(0, 0, 30, 30) | _square(50, 0, 64, 20)  # small FN (4×4), large FP (14×20)
    _, labels = correction_points(pred[None], gt[None], (S, S))
    assert labels.tolist() == [[0]]
    gt2 = _square(0, 0, 30, 30) | _square(40, 40, 60, 60)
    pred2 = _square(0, 0, 30, 30) | _square(60, 0, 63, 3)  # large FN, small FP
    _, labels = correction_points(pred2[None], gt2[None], (S, S))
    assert labels.tolist() == [[1]]


def test_perfect_prediction_gets_a_padding_point() -> None:
    gt = _square(3, 3, 20, 20)
    _, labels = correction_points(gt[None], gt[None], (S, S))
    assert labels.tolist() == [[-1]]


def test_false_positives_in_the_padding_are_ignored() -> None:
    gt = _square(5, 5, 20, 20)
    pred = gt | _square(40, 0, 64, 64)  # only in the padded columns x >= 40
    _, labels = correction_points(pred[None], gt[None], (S, 40))
    assert labels.tolist() == [[-1]]


def test_distance_on_the_bounding_box_equals_the_whole_frame() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        region = np.zeros((S, S), np.uint8)
        for _ in range(3):
            cv2.circle(region, tuple(int(v) for v in rng.integers(0, S, 2)), int(rng.integers(1, 15)), 1, -1)
        dist = cv2.distanceTransform(np.pad(region, 1), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
        y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
        assert _farthest_from_boundary(region.astype(bool)) == (pytest.approx(float(dist[y, x])), int(x), int(y))


def test_center_point_of_a_mask_touching_the_edge_stays_inside() -> None:
    gt = _square(0, 0, 20, 20)  # in the corner: without the 1-px border the max is at (0, 0)
    x, y = center_points(gt[None])[0].tolist()
    assert 9 <= x <= 10 and 9 <= y <= 10


def test_parse_points_and_metric_keys() -> None:
    assert parse_points("9,1,3,3") == (1, 3, 9)
    assert metric_keys((1, 2, 3, 5, 9)) == ("point1_conf", "point1_oracle", "point2", "point3", "point5",
                                             "point9", "box")
    for bad in ("0,1", "a", ""):
        with pytest.raises(ValueError, match="points"):
            parse_points(bad)


# ---------------------------------------------------------------------------- data pass


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two shards of 3 small images (ids 1-3 and 4-6), 3-12 masks each."""
    out = tmp_path_factory.mktemp("eval_shards")
    write_synthetic_shards(str(out), num_images=6, num_shards=2, seed=3, min_side=96, max_side=160,
                           min_masks=3, max_masks=12, radius_frac=(0.1, 0.4))
    return out


def _ids(batches) -> list[int]:
    return [i for b in batches for i in b.image_ids]


def test_eval_pass_reads_each_image_once_in_listed_order(shard_dir: Path) -> None:
    reverse = f"{shard_dir}/sa_000001.tar,{shard_dir}/sa_000000.tar"
    cfg = eval_data_config(reverse, 256)
    assert _ids(iter_eval_batches(cfg, 0)) == [4, 5, 6, 1, 2, 3]  # 0 = all
    assert _ids(iter_eval_batches(cfg, 100)) == [4, 5, 6, 1, 2, 3]  # more than there are: each once
    assert _ids(iter_eval_batches(cfg, 4)) == [4, 5, 6, 1]
    sizes = [len(b.image_ids) for b in iter_eval_batches(cfg, 0, batch_size=4)]
    assert sizes == [4, 2]


def test_eval_masks_are_sampled_with_a_fixed_seed(shard_dir: Path) -> None:
    cfg = eval_data_config(f"{shard_dir}/sa_*.tar", 256, max_masks_per_image=2)
    first, second = list(iter_eval_batches(cfg, 0)), list(iter_eval_batches(cfg, 0))
    assert all(b.valid.sum() == 2 for b in first)
    for a, b in zip(first, second):
        assert torch.equal(a.masks, b.masks)


def test_bad_arguments_fail_before_the_first_batch(shard_dir: Path) -> None:
    cfg = eval_data_config(f"{shard_dir}/sa_*.tar", 256)
    with pytest.raises(ValueError, match="num_images"):
        iter_eval_batches(cfg, -1)
    with pytest.raises((ValueError, ConfigError), match="nothing_here"):
        iter_eval_batches(eval_data_config(f"{shard_dir}/nothing_here_*.tar", 256), 0)


def test_bad_samples_are_skipped_and_counted(shard_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "sa_bad.tar"
    with tarfile.open(shard_dir / "sa_000000.tar") as src, tarfile.open(bad, "w") as dst:
        for member in src.getmembers():
            dst.addfile(member, src.extractfile(member))
        for name, data in (("sa_99.jpg", b"not a jpeg"), ("sa_99.json", b"{not json")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    skips: dict[str, int] = {}
    assert _ids(iter_eval_batches(eval_data_config(str(bad), 256), 0, skips=skips)) == [1, 2, 3]
    assert skips == {"invalid_json": 1}


# ------------------------------------------------------------------------- the protocol


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_sam("tiny").eval()


@pytest.fixture(scope="module")
def first_batch(shard_dir: Path) -> Batch:
    return next(iter_eval_batches(eval_data_config(f"{shard_dir}/sa_000000.tar", 256), 1))


@pytest.fixture(scope="module")
def image(first_batch: Batch, tiny: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """(embedding 1×C×h×w, GT N×S×S, hw) of the first image."""
    with torch.no_grad():
        emb = tiny.image_encoder(first_batch.images)
    hw = (int(first_batch.input_sizes[0, 0]), int(first_batch.input_sizes[0, 1]))
    return emb, first_batch.masks[0][first_batch.valid[0]], hw


def test_each_click_lands_in_the_error_of_the_previous_prediction(tiny: torch.nn.Module, image) -> None:
    emb, gt, hw = image
    trace = run_clicks(tiny, emb, gt, hw, 5)
    assert trace.coords.shape == (gt.shape[0], 5, 2)
    assert (trace.labels[:, 0] == 1).all()
    for k in range(1, 5):
        prev = run_clicks(tiny, emb, gt, hw, k)  # the prediction before click k+1
        pred = torch.nn.functional.interpolate(prev.logits, size=gt.shape[-2:], mode="bilinear") > 0
        for i in range(gt.shape[0]):
            label = int(trace.labels[i, k])
            x, y = (int(v) for v in trace.coords[i, k].tolist())
            if label == -1:
                assert prev.scores[k][i] == 1.0  # only a perfect mask gets no click
                continue
            assert x < hw[1] and y < hw[0]
            assert bool(gt[i, y, x]) == (label == 1) and bool(pred[i, 0, y, x]) == (label == 0)
        # Same computation; CPU kernels are not bitwise stable across calls, a pixel may flip.
        assert torch.allclose(prev.scores[k], trace.scores[k], atol=1e-2)


def test_box_is_scored_with_the_single_output(tiny: torch.nn.Module, image, first_batch: Batch) -> None:
    emb, gt, hw = image
    pe = tiny.prompt_encoder.get_dense_pe()
    sparse, dense = tiny.prompt_encoder(points=None, boxes=boxes_from_masks(gt), masks=None)
    single, _ = tiny.mask_decoder(emb, pe, sparse, dense, multimask_output=False)
    multi, _ = tiny.mask_decoder(emb, pe, sparse, dense, multimask_output=True)
    result = evaluate(tiny, [first_batch], torch.device("cpu"), points=(1,))
    expected = _ious(single, gt, hw)[:, 0]
    assert result.sums["box"] == pytest.approx(float(expected.sum()), rel=1e-5)
    multi_ious = _ious(multi, gt, hw).sum(0)
    assert all(abs(float(v) - float(expected.sum())) > 1e-3 for v in multi_ious)  # the test can tell


def test_evaluate_counts_and_keys(shard_dir: Path, tiny: torch.nn.Module) -> None:
    cfg = eval_data_config(f"{shard_dir}/sa_*.tar", 256)
    expected_masks = sum(int(b.valid.sum()) for b in iter_eval_batches(cfg, 0))
    result = evaluate_shards(tiny, cfg, 0, torch.device("cpu"), points=(1, 3), keep_images=2)
    assert (result.num_images, result.num_masks, result.image_ids) == (6, expected_masks, [1, 2, 3, 4, 5, 6])
    miou = result.miou()
    assert tuple(miou) == ("point1_conf", "point1_oracle", "point3", "box")
    assert miou["point1_oracle"] >= miou["point1_conf"]
    assert all(0.0 <= v <= 1.0 for v in miou.values())
    assert [i for b in result.kept for i in b.image_ids] == [1, 2]
    assert tiny.training is False


def test_training_time_eval_scores_what_the_cli_scores(shard_dir: Path, tmp_path: Path) -> None:
    cfg = load_config(Config, "tiny_cpu", [
        f"data.shards={shard_dir}/sa_*.tar", f"train.run_dir={tmp_path}", "data.max_masks_per_image=2",
        "data.seed=7", f"eval.shards={shard_dir}/sa_000001.tar,{shard_dir}/sa_000000.tar",
        "eval.num_images=4", "eval.batch_size=3"], PRESETS)
    run = TrainRun(cfg, dist.DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"),
                                      backend=None, is_main=True))
    got = run.evaluate()
    # What `sam-train eval --num-images 4 --batch-size 3` runs (the batch size only changes float rounding).
    want = evaluate_shards(run.sam, eval_data_config(list(cfg.eval.shards), 256), 4, torch.device("cpu"),
                           batch_size=3)
    assert got.image_ids == want.image_ids == [4, 5, 6, 1]
    assert got.num_masks == want.num_masks > 2 * 4  # eval's own mask cap, not data.max_masks_per_image
    assert got.miou() == pytest.approx(want.miou(), abs=1e-3)  # CPU kernels: not bitwise across calls
    assert EVAL_MAX_MASKS == 64
