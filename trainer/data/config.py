"""Configuration of the SA-1B input pipeline (:class:`DataConfig`)."""

from __future__ import annotations

from dataclasses import dataclass

JPEG_DECODERS = ("auto", "pil", "cv2")
MASK_DECODERS = ("direct", "pycocotools")


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"DataConfig.{name}: {message}")


@dataclass(kw_only=True)
class DataConfig:
    """Where SA-1B shards are and how images and masks are turned into batches.

    The defaults are the paper's recipe (SAM_RECIPE.md §1 "Input"): longest side 1024,
    normalize, zero-pad; up to 64 random masks per image; masks covering more than 90%
    of the image dropped; **no augmentation** (LSJ only appears in ablations).
    """

    shards: str | list[str]
    """Shard list: a glob (``gs://b/sa_*.tar``, ``/data/*.tar``), a ``.txt`` file of URLs
    (one per line, ``#`` comments), a comma-separated list, or a list of any of these."""

    img_size: int = 1024
    """Side S of the square model input: longest side resized to S, then padded to S×S."""

    batch_size: int = 1
    """Images per batch on each rank (the paper uses 1 image per GPU)."""

    max_masks_per_image: int = 64
    """Masks sampled at random (seeded) per image; only these RLEs are decoded."""

    max_mask_area_frac: float = 0.9
    """Masks whose ``area`` exceeds this fraction of the image are dropped (paper: 0.9)."""

    num_workers: int = 2
    """DataLoader worker processes per rank; 0 reads in the training process. Each
    (rank, worker) is one slot of the round-robin shard dealing (:mod:`trainer.data.loader`),
    so any count works with any number of shards."""

    prefetch_factor: int = 2
    """Batches each worker prepares ahead (ignored with ``num_workers=0``)."""

    pin_memory: bool = True
    """Pin batches in page-locked memory when CUDA is available (ignored otherwise)."""

    seed: int = 0
    """Seed of the per-epoch shard shuffle and of per-image sampling, both hashed with the
    epoch (numpy SeedSequence), so different seeds give independent orders."""

    shuffle_shards: bool = True
    """Shuffle the shard order every epoch; False keeps the listed order (e.g. for eval)."""

    jpeg_decoder: str = "auto"
    """``"pil"``, ``"cv2"``, or ``"auto"`` (the faster one measured by
    ``benchmarks/bench_data.py``; see :data:`trainer.data.transforms.AUTO_JPEG_DECODER`)."""

    jpeg_dct_downscale: bool = True
    """When the image is shrunk by 2×, 4× or 8× or more, let libjpeg decode at that
    reduced scale (Pillow ``draft`` / OpenCV ``IMREAD_REDUCED_*``), then resize the rest
    of the way. About 2.5× faster for SA-1B (1500×2250 → 1024) at the same geometry."""

    mask_decoder: str = "direct"
    """``"direct"`` decodes each compressed RLE straight into the resized frame
    (nearest-neighbour, never materialising the full-resolution mask); ``"pycocotools"``
    decodes at full size with ``pycocotools.mask.decode`` and then samples the same
    pixels. Both give identical masks; ``direct`` is several times faster."""

    lsj: bool = False
    """ViTDet large-scale jitter: horizontal flip, resize by a random scale of the S×S
    box, random S×S crop/pad. Off in the paper's default recipe."""

    lsj_scale: tuple[float, float] = (0.1, 2.0)
    """Scale range of the jitter (ViTDet / SAM ablations use [0.1, 2.0])."""

    hflip: bool = False
    """Random horizontal flip (p=0.5) without jitter; ``lsj`` already includes it."""

    shard_open_retries: int = 3
    """Retries (after the first try) to open or resume reading a shard before it is
    skipped and reported as ``shard_unreadable``."""

    retry_backoff_s: float = 1.0
    """First retry delay in seconds; doubles on every retry."""

    def __post_init__(self) -> None:
        if isinstance(self.shards, (list, tuple)):
            self.shards = [str(s) for s in self.shards]
            _require(len(self.shards) > 0 and all(self.shards), "shards", "must not be empty")
        else:
            _require(isinstance(self.shards, str) and self.shards.strip() != "", "shards",
                     "must be a non-empty glob, .txt list, comma list or list of URLs")
        _require(self.img_size > 0, "img_size", f"must be positive, got {self.img_size}")
        _require(self.batch_size > 0, "batch_size", f"must be positive, got {self.batch_size}")
        _require(self.max_masks_per_image > 0, "max_masks_per_image",
                 f"must be positive, got {self.max_masks_per_image}")
        _require(0.0 < self.max_mask_area_frac <= 1.0, "max_mask_area_frac",
                 f"must be in (0, 1], got {self.max_mask_area_frac}")
        _require(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        _require(self.prefetch_factor > 0, "prefetch_factor",
                 f"must be positive, got {self.prefetch_factor}")
        _require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        _require(self.jpeg_decoder in JPEG_DECODERS, "jpeg_decoder",
                 f"must be one of {JPEG_DECODERS}, got {self.jpeg_decoder!r}")
        _require(self.mask_decoder in MASK_DECODERS, "mask_decoder",
                 f"must be one of {MASK_DECODERS}, got {self.mask_decoder!r}")
        scale = tuple(float(s) for s in self.lsj_scale)
        _require(len(scale) == 2 and 0.0 < scale[0] <= scale[1], "lsj_scale",
                 f"must be (min, max) with 0 < min <= max, got {self.lsj_scale}")
        self.lsj_scale = (scale[0], scale[1])
        _require(self.shard_open_retries >= 0, "shard_open_retries",
                 f"must be >= 0, got {self.shard_open_retries}")
        _require(self.retry_backoff_s >= 0.0, "retry_backoff_s",
                 f"must be >= 0, got {self.retry_backoff_s}")
