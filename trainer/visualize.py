"""Pictures a person would rather look at than logs: loss curve, prediction grid (PNG)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")  # headless: no display in pods, CI or over ssh
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from trainer.data import PIXEL_MEAN, PIXEL_STD, Batch  # noqa: E402
from trainer.evaluate import box_logits, metric_keys, run_clicks  # noqa: E402
from trainer.prompts import boxes_from_masks  # noqa: E402


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a ``metrics.jsonl``."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss_curve(records: list[dict], out: str | Path, before: dict[str, float] | None = None) -> Path:
    """Total and per-term training loss against step, plus eval mIoU where recorded
    (``before``: mIoU of the untrained model, drawn at step 0)."""
    train = [r for r in records if "loss/total" in r]
    evals = [r for r in records if "eval/point1_conf" in r]
    if before:
        evals = [{"step": 0, **{f"eval/{k}": v for k, v in before.items()}}] + evals
    fig, ax = plt.subplots(1, 2 if evals else 1, figsize=(11 if evals else 6, 4), squeeze=False)
    steps = [r["step"] for r in train]
    for key, label in (("loss/total", "total"), ("loss/focal", "focal (x1)"), ("loss/dice", "dice"), ("loss/iou", "IoU MSE")):
        if train and key in train[0]:
            ax[0, 0].plot(steps, [r[key] for r in train], label=label, lw=1.2 if key == "loss/total" else 0.8)
    ax[0, 0].set(xlabel="step", ylabel="loss (sum over rounds, per mask)", title="training loss", yscale="log")
    ax[0, 0].legend()
    if evals:
        for key in metric_keys():
            if all(f"eval/{key}" in r for r in evals):
                ax[0, 1].plot([r["step"] for r in evals], [r[f"eval/{key}"] for r in evals], marker="o", label=key)
        ax[0, 1].set(xlabel="step", ylabel="mIoU", title="held-out mIoU", ylim=(0, 1))
        ax[0, 1].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def _rgb(image: torch.Tensor, hw: tuple[int, int]) -> np.ndarray:
    """Normalised ``3×S×S`` -> ``h×w×3`` uint8 (unpadded)."""
    mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(3, 1, 1)
    rgb = (image.cpu() * std + mean).clamp(0, 255)[:, : hw[0], : hw[1]]
    return rgb.permute(1, 2, 0).byte().numpy()


def _overlay(rgb: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], outline: np.ndarray) -> np.ndarray:
    """Tint ``mask`` with ``colour`` and draw the GT mask ``outline`` in white."""
    out = rgb.astype(np.float32)
    out[mask] = 0.35 * out[mask] + 0.65 * np.array(colour, dtype=np.float32)
    out = out.astype(np.uint8)
    contours, _ = cv2.findContours(outline.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    return cv2.drawContours(np.ascontiguousarray(out), contours, -1, (255, 255, 255), 1)


def _largest_mask(batch: Batch, i: int) -> int:
    """Index of image ``i``'s largest valid mask."""
    areas = batch.masks[i].flatten(1).sum(1) * batch.valid[i]
    return int(areas.argmax())


def _show(ax: plt.Axes, rgb: np.ndarray, logits: torch.Tensor, target: np.ndarray, size: tuple[int, int],
          title: str) -> None:
    """Draw the ``1×1×4h×4w`` logits' mask (red) over ``rgb`` with the GT outline, titled with its IoU."""
    h, w = target.shape
    up = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    pred = (up[0, 0, :h, :w] > 0).cpu().numpy()
    score = (pred & target).sum() / max((pred | target).sum(), 1)
    ax.imshow(_overlay(rgb, pred, (255, 40, 40), target))
    ax.set_title(f"{title}: IoU {score:.2f}", fontsize=9)


@torch.no_grad()
def prediction_grid(sam: torch.nn.Module, batches: list[Batch], out: str | Path, num_images: int = 4,
                    num_points: int = 5) -> Path:
    """One row per image (the first ``num_images`` of ``batches`` with a mask), for its
    largest GT mask: GT | most confident of 3 from its center point (star) | single
    output after ``num_points`` clicks (green +, red x; the eval protocol of
    ``trainer.evaluate``) | single output from its box (yellow). GT outline in white.
    Titles show the IoU inside the unpadded image, as ``trainer.evaluate`` scores it."""
    sam.eval()
    rows = [(b, i) for b in batches for i in range(b.images.shape[0]) if b.valid[i].any()][:num_images]
    if not rows:
        raise ValueError("prediction_grid: no image with a valid mask in the given batches")
    cols = 4 if num_points > 1 else 3
    fig, axes = plt.subplots(len(rows), cols, figsize=(3 * cols, 3 * len(rows)), squeeze=False)
    device = next(sam.parameters()).device
    for r, (batch, i) in enumerate(rows):
        hw = (int(batch.input_sizes[i, 0]), int(batch.input_sizes[i, 1]))
        gt = batch.masks[i, _largest_mask(batch, i)][None].to(device)
        size = tuple(gt.shape[-2:])
        emb = sam.image_encoder(batch.images[i][None].to(device))
        rgb = _rgb(batch.images[i], hw)
        target = gt[0, : hw[0], : hw[1]].cpu().numpy()
        axes[r, 0].imshow(_overlay(rgb, target, (0, 120, 255), target))
        axes[r, 0].set_title("ground truth (blue, white outline)", fontsize=9)
        one = run_clicks(sam, emb, gt, hw, 1)
        _show(axes[r, 1], rgb, one.logits, target, size, "1 point, most confident")
        x, y = one.coords[0, 0].tolist()
        axes[r, 1].plot(x, y, "y*", ms=12)
        if num_points > 1:
            many = run_clicks(sam, emb, gt, hw, num_points)
            _show(axes[r, 2], rgb, many.logits, target, size, f"{num_points} points")
            for (x, y), label in zip(many.coords[0].tolist(), many.labels[0].tolist()):
                if label >= 0:
                    axes[r, 2].plot(x, y, "g+" if label == 1 else "rx", ms=10, mew=2)
        _show(axes[r, cols - 1], rgb, box_logits(sam, emb, gt), target, size, "box, single output")
        x0, y0, x1, y1 = boxes_from_masks(gt)[0].tolist()
        axes[r, cols - 1].add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="yellow", lw=1.5))
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)
