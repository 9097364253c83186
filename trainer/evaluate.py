"""Evaluation: multi-point and box mIoU on held-out shards (SAM_RECIPE.md §6).

Protocol, per GT mask (the paper's, after RITM):

- **points** (keys ``point1_conf``, ``point1_oracle``, ``point2``, ``point3``, ``point5``,
  ``point9`` for the default ``POINTS``): point 1 is the "center" point, the pixel
  farthest from the mask boundary. Each next point goes to the pixel farthest from the
  boundary of the largest error region of the previous prediction: the distance
  transforms of the false negatives and of the false positives are compared and the
  larger wins (SAM 2's eval "center" correction, SAM_RECIPE.md §3 "Prompts"); a point
  in a false negative is positive, one in a false positive negative. Points accumulate,
  and the previous round's low-res logits of the chosen mask are fed back as the mask
  prompt, as the model was trained (SAM_RECIPE.md §1 "Interactive simulation").
  One point gives the 3 multimask outputs: ``point1_conf`` scores the most confident
  one (highest predicted IoU; the paper's default, and the one fed back) and
  ``point1_oracle`` the best of the 3 against GT. Two or more points give the single
  output (SAM_RECIPE.md §1 "Single vs multi-mask"), so for them "most confident" and
  "oracle" coincide and there is one key, ``pointN``. A mask predicted perfectly gets
  no further point and keeps its IoU (RITM stops clicking once the object is done).
- **box** (key ``box``): the mask's tight XYXY box, scored with the single output: SAM 2
  encodes a box as two corner prompts, so more than one prompt -> one mask
  (SAM_RECIPE.md §1 "Single vs multi-mask").

IoU is computed at the model's input resolution, inside the unpadded image area (low-res
logits upsampled bilinearly, thresholded at 0 — the official ``postprocess_masks``
without the final resize to the original photo size). mIoU is the mean over masks.

Data: :func:`iter_eval_batches` reads the eval shards once, in listed order, images in
stored order, each image once, up to ``num_images`` images (0 = all). Masks per image are
sampled by the data layer with the fixed seed :data:`EVAL_SEED` (see
:func:`eval_data_config`), so the CLI eval and the training-time eval score the same masks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from trainer.data import Batch, DataConfig, collate, list_shards
from trainer.data.sa1b import decode_event, iter_shard
from trainer.prompts import boxes_from_masks


#: Point counts reported by default: IoU after 1, 2, 3, 5 and 9 points ([P] §7.1).
POINTS = (1, 2, 3, 5, 9)
#: Seed (and epoch 0) of the per-image mask sampling of every evaluation.
EVAL_SEED = 0
#: Masks scored per image unless told otherwise (the training cap, SAM_RECIPE.md §1).
EVAL_MAX_MASKS = 64
LABEL_POSITIVE, LABEL_NEGATIVE, LABEL_PAD = 1, 0, -1


def parse_points(spec: str | Sequence[int]) -> tuple[int, ...]:
    """``"1,2,3,5,9"`` or a sequence -> sorted unique positive point counts (ValueError)."""
    try:
        values = [int(v) for v in (spec.split(",") if isinstance(spec, str) else spec) if str(v).strip()]
    except ValueError as err:
        raise ValueError(f"points: expected comma-separated integers like 1,2,3,5,9, got {spec!r}") from err
    if not values or min(values) < 1:
        raise ValueError(f"points: need one or more point counts >= 1, got {spec!r}")
    return tuple(sorted(set(values)))


def metric_keys(points: Sequence[int] = POINTS) -> tuple[str, ...]:
    """Metric names in report order: ``point1_conf``, ``point1_oracle``, ``pointN``..., ``box``."""
    keys: list[str] = []
    for n in points:
        keys += ["point1_conf", "point1_oracle"] if n == 1 else [f"point{n}"]
    return (*keys, "box")


# ---------------------------------------------------------------------------- data


def eval_data_config(shards: str | Sequence[str], img_size: int, max_masks_per_image: int = EVAL_MAX_MASKS) -> DataConfig:
    """The one data configuration of every evaluation (CLI and training-time).

    Everything that decides which masks are scored is fixed here: seed
    :data:`EVAL_SEED`, the default area filter, no augmentation, shards in listed order.
    """
    spec = shards if isinstance(shards, str) else list(shards)
    return DataConfig(shards=spec, img_size=img_size, batch_size=1, max_masks_per_image=max_masks_per_image,
                      num_workers=0, seed=EVAL_SEED, shuffle_shards=False, lsj=False, hflip=False)


def iter_eval_batches(cfg: DataConfig, num_images: int = 0, batch_size: int = 1,
                      skips: dict[str, int] | None = None, setting: str = "eval.shards") -> Iterator[Batch]:
    """One finite, in-order pass: shards as listed, images in stored order, each read once.

    Stops after ``num_images`` usable images (0 = all). Bad samples are skipped, logged
    and counted in ``skips`` by reason (the data layer's SKIP_REASONS), as in training.
    Yields batches of up to ``batch_size`` images (the last one may be smaller).
    Bad arguments and shard specs raise here, before the first batch is asked for
    (shard errors name ``setting``, the option the spec came from).
    """
    if num_images < 0:
        raise ValueError(f"num_images: must be >= 0 (0 evaluates all), got {num_images}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    urls = list_shards(cfg.shards, setting)
    return _read_in_order(cfg, urls, num_images, batch_size, {} if skips is None else skips)


def _read_in_order(cfg: DataConfig, urls: list[str], num_images: int, batch_size: int,
                   skips: dict[str, int]) -> Iterator[Batch]:
    pending, taken = [], 0
    for url in urls:
        for event in iter_shard(url, 0, cfg.shard_open_retries, cfg.retry_backoff_s):
            sample, _ = decode_event(event, url, cfg, 0, skips)  # bad data: counted, as in training
            if sample is None:
                continue
            pending.append(sample)
            taken += 1
            if len(pending) == batch_size or taken == num_images:
                yield collate(pending, cfg.img_size)
                pending = []
            if taken == num_images:
                return
    if pending:
        yield collate(pending, cfg.img_size)


# -------------------------------------------------------------------- point placement


def _farthest_from_boundary(region: np.ndarray) -> tuple[float, int, int]:
    """``h×w`` bool -> (max distance to the region boundary, x, y); (0, 0, 0) if empty.

    L2 distance transform with a 1-px zero border, so a region touching the image edge
    has a boundary there (SAM 2's ``padding=True``). Computed on the region's bounding
    box only: pixels outside it are background anyway, so distances and the first
    (raster-order) argmax are the same as on the whole frame, at a fraction of the cost.
    """
    ys, xs = np.nonzero(region.any(axis=1))[0], np.nonzero(region.any(axis=0))[0]
    if ys.size == 0:
        return 0.0, 0, 0
    crop = region[ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1].astype(np.uint8)
    dist = cv2.distanceTransform(np.pad(crop, 1), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return float(dist[y, x]), int(x + xs[0]), int(y + ys[0])


def center_points(masks: torch.Tensor) -> torch.Tensor:
    """``N×H×W`` bool -> ``N×2`` float (x, y): each mask's pixel farthest from its boundary."""
    out = torch.zeros(masks.shape[0], 2)
    for i, mask in enumerate(masks.cpu().numpy()):
        _, x, y = _farthest_from_boundary(mask)
        out[i] = torch.tensor([float(x), float(y)])
    return out


def correction_points(pred: torch.Tensor, gt: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The next click per mask: center of the largest error region (SAM_RECIPE.md §6).

    Compares the farthest-from-boundary distance of the false negatives (GT and not
    predicted) with that of the false positives (predicted, not GT), inside the unpadded
    ``hw`` area; the larger wins (ties go to the false positive, as in SAM 2's
    ``sample_one_point_from_error_center``). A mask without any error gets a padding point.

    Args:
        pred: N×S×S bool prediction at input resolution; gt: N×S×S bool.
        hw: (h, w) unpadded image size in the S×S frame.

    Returns:
        coords N×1×2 float (x, y) input-frame pixels; labels N×1 int64 (1 positive in a
        false negative, 0 negative in a false positive, -1 no error).
    """
    h, w = hw
    pred_np, gt_np = pred[:, :h, :w].cpu().numpy(), gt[:, :h, :w].cpu().numpy()
    coords = torch.zeros(gt.shape[0], 1, 2)
    labels = torch.full((gt.shape[0], 1), LABEL_PAD, dtype=torch.int64)
    for i in range(gt.shape[0]):
        fn = _farthest_from_boundary(gt_np[i] & ~pred_np[i])
        fp = _farthest_from_boundary(pred_np[i] & ~gt_np[i])
        best, label = (fn, LABEL_POSITIVE) if fn[0] > fp[0] else (fp, LABEL_NEGATIVE)
        if best[0] > 0:
            coords[i, 0] = torch.tensor([float(best[1]), float(best[2])])
            labels[i, 0] = label
    return coords.to(gt.device), labels.to(gt.device)


# ----------------------------------------------------------------------------- scoring


def _ious(logits: torch.Tensor, gt: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """``N×K×4h×4w`` logits vs ``N×S×S`` GT -> ``N×K`` IoU inside the ``hw`` image area."""
    pred = _binarize(logits, gt.shape[-2:])[..., : hw[0], : hw[1]]
    target = gt[:, None, : hw[0], : hw[1]]
    inter = (pred & target).flatten(2).sum(-1).float()
    union = (pred | target).flatten(2).sum(-1).float()
    return inter / union.clamp(min=1)


def _binarize(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``N×K×4h×4w`` low-res logits -> ``N×K×S×S`` bool (bilinear upsample, > 0)."""
    return F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False) > 0


@dataclass
class ClickTrace:
    """What the multi-point protocol did for N masks of one image.

    Attributes:
        scores: ``{num_points: N IoUs}`` for 1..P points; 1 point is the most confident output.
        point1_oracle: N, best-of-3 IoU after the first point.
        coords: N×P×2 (x, y) clicks; labels: N×P (1 pos, 0 neg, -1 none: already perfect).
        logits: N×1×4h×4w low-res logits of the final prediction.
    """

    scores: dict[int, torch.Tensor]
    point1_oracle: torch.Tensor
    coords: torch.Tensor
    labels: torch.Tensor
    logits: torch.Tensor


def _decode(sam: torch.nn.Module, emb: torch.Tensor, multimask: bool, **prompt: torch.Tensor | None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The official inference path (prompt encoder pads points itself when no box)."""
    sparse, dense = sam.prompt_encoder(**prompt)
    return sam.mask_decoder(emb, sam.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=multimask)


@torch.no_grad()
def run_clicks(sam: torch.nn.Module, emb: torch.Tensor, gt: torch.Tensor, hw: tuple[int, int],
               num_points: int) -> ClickTrace:
    """The multi-point protocol (module docstring) for every GT mask of one image.

    Args:
        sam: a ``Sam``; emb: 1×C×h×w image embedding; gt: N×S×S bool GT masks;
        hw: unpadded (h, w); num_points: clicks per mask (>= 1).
    """
    coords = center_points(gt).to(gt.device)[:, None, :]
    labels = torch.ones(gt.shape[0], 1, dtype=torch.int64, device=gt.device)
    logits, iou_pred = _decode(sam, emb, True, points=(coords, labels), boxes=None, masks=None)
    ious = _ious(logits, gt, hw)
    rows = torch.arange(gt.shape[0], device=gt.device)
    best = iou_pred.argmax(dim=1)
    score, feedback = ious[rows, best], logits[rows, best][:, None]
    scores, oracle = {1: score}, ious.max(dim=1).values
    for k in range(2, num_points + 1):
        new_coords, new_labels = correction_points(_binarize(feedback, gt.shape[-2:])[:, 0], gt, hw)
        coords, labels = torch.cat([coords, new_coords], 1), torch.cat([labels, new_labels], 1)
        active = new_labels[:, 0] != LABEL_PAD
        if active.any():  # every mask perfect: nothing to click, nothing changes
            logits, _ = _decode(sam, emb, False, points=(coords, labels), boxes=None, masks=feedback)
            score = torch.where(active, _ious(logits, gt, hw)[:, 0], score)
            feedback = torch.where(active[:, None, None, None], logits, feedback)
        scores[k] = score
    return ClickTrace(scores, oracle, coords, labels, feedback)


@torch.no_grad()
def box_logits(sam: torch.nn.Module, emb: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """N×1×4h×4w logits of the single output for each GT mask's tight box (N×S×S bool)."""
    logits, _ = _decode(sam, emb, False, points=None, boxes=boxes_from_masks(gt), masks=None)
    return logits


def evaluate_image(sam: torch.nn.Module, emb: torch.Tensor, gt: torch.Tensor, hw: tuple[int, int],
                   points: Sequence[int] = POINTS) -> dict[str, torch.Tensor]:
    """``{metric: N IoUs}`` (keys :func:`metric_keys`) for the N×S×S GT masks of one image
    with embedding ``emb`` (1×C×h×w) and unpadded size ``hw``."""
    trace = run_clicks(sam, emb, gt, hw, max(points))
    out = {}
    for n in points:
        if n == 1:
            out["point1_conf"], out["point1_oracle"] = trace.scores[1], trace.point1_oracle
        else:
            out[f"point{n}"] = trace.scores[n]
    out["box"] = _ious(box_logits(sam, emb, gt), gt, hw)[:, 0]
    return out


@dataclass
class EvalResult:
    """Per-metric IoU sums over masks; ``miou`` gives the means (0 when no mask)."""

    sums: dict[str, float] = field(default_factory=lambda: {k: 0.0 for k in metric_keys()})
    num_masks: int = 0
    num_images: int = 0
    image_ids: list[int] = field(default_factory=list)  # in scoring order
    skips: dict[str, int] = field(default_factory=dict)  # bad samples by reason
    kept: list[Batch] = field(default_factory=list)  # scored batches kept for a grid

    def add(self, ious: dict[str, torch.Tensor]) -> None:
        for key, value in ious.items():
            self.sums[key] += float(value.sum())
        self.num_masks += int(next(iter(ious.values())).numel())

    def miou(self) -> dict[str, float]:
        return {k: v / max(self.num_masks, 1) for k, v in self.sums.items()}


def evaluate(sam: torch.nn.Module, batches: Iterable[Batch], device: torch.device,
             points: Sequence[int] = POINTS, keep_images: int = 0) -> EvalResult:
    """mIoU over every image of ``batches`` (valid masks only; see module docstring).

    ``keep_images``: keep the first batches holding that many scored images with masks
    in ``EvalResult.kept`` (for :func:`trainer.visualize.prediction_grid`).
    """
    points = parse_points(points)
    was_training = sam.training
    sam.eval()
    result = EvalResult(sums={k: 0.0 for k in metric_keys(points)})
    kept_images = 0
    try:
        for batch in batches:
            with torch.no_grad():
                embs = sam.image_encoder(batch.images.to(device))
            for i in range(batch.images.shape[0]):
                gt = batch.masks[i][batch.valid[i]].to(device)
                hw = (int(batch.input_sizes[i, 0]), int(batch.input_sizes[i, 1]))
                if gt.shape[0]:
                    result.add(evaluate_image(sam, embs[i : i + 1], gt, hw, points))
                result.num_images += 1
                result.image_ids.append(int(batch.image_ids[i]) if batch.image_ids else -1)
            if kept_images < keep_images:
                result.kept.append(batch)
                kept_images += int(batch.valid.any(dim=1).sum())
    finally:
        sam.train(was_training)
    return result


def evaluate_shards(sam: torch.nn.Module, cfg: DataConfig, num_images: int, device: torch.device,
                    points: Sequence[int] = POINTS, batch_size: int = 1, keep_images: int = 0) -> EvalResult:
    """:func:`evaluate` over one in-order pass of ``cfg``'s shards (:func:`iter_eval_batches`),
    with the skip counts of that pass in ``EvalResult.skips``."""
    skips: dict[str, int] = {}
    result = evaluate(sam, iter_eval_batches(cfg, num_images, batch_size, skips), device, points, keep_images)
    result.skips = dict(sorted(skips.items()))
    return result
