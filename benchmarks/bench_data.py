"""Throughput of the SA-1B input pipeline on one worker (one process, one thread).

Run from the repository root:

    python benchmarks/bench_data.py           # 1500×2250 JPEGs, ~100 masks each (< 1 min)
    python benchmarks/bench_data.py --small   # 384×576 JPEGs, a few seconds

It writes synthetic SA-1B-format shards (``trainer.data.synth``) to ``memory://`` and
prints:

1. end-to-end images/s of one DataLoader worker (the real code path: tar stream → Batch,
   default config, img_size 1024, up to 64 masks), which is what to multiply by the
   worker count;
2. where the per-image time goes: tar read, JSON + mask sampling, JPEG decode, RLE decode,
   resize + normalize + pad (collate included), boxes;
3. JPEG decoders (Pillow vs OpenCV, full size vs DCT-downscaled) and mask decoders
   (pycocotools vs direct), each as a ratio against a named baseline (>1 = faster).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial

import cv2
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.data import DataConfig, build_loader, collate
from trainer.data.sa1b import (
    RawPair,
    Sample,
    iter_shard,
    parse_sa1b_json,
    sample_rng,
    select_annotations,
)
from trainer.data.synth import synth_sample
from trainer.data.transforms import (
    Geometry,
    decode_jpeg,
    decode_masks,
    jpeg_size,
    masks_to_boxes,
    plan_geometry,
    resize_image,
)
from trainer.storage import open_url


def write_shard(url: str, num_images: int, height: int, width: int, shapes: int) -> float:
    """One SA-1B-format shard; returns the mean number of masks per image."""
    counts = []
    with open_url(url, "wb") as fileobj, tarfile.open(fileobj=fileobj, mode="w|") as tar:
        for image_id in range(1, num_images + 1):
            rng = np.random.default_rng(image_id)
            jpg, doc = synth_sample(rng, height, width, shapes, image_id)
            counts.append(len(doc["annotations"]))
            for name, data in ((f"sa_{image_id}.jpg", jpg),
                               (f"sa_{image_id}.json", json.dumps(doc).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return float(np.mean(counts))


def best_of(fn: Callable[[], object], repeat: int) -> float:
    """Fastest of ``repeat`` runs, seconds (least disturbed by other processes)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def end_to_end(cfg: DataConfig, num_images: int, repeat: int) -> float:
    """Seconds per image through the real loader, after one warm-up batch (with
    ``num_workers=1`` that includes worker start-up amortised and shared-memory hand-off)."""
    def one_epoch() -> None:
        it = iter(build_loader(cfg, 0, 1))
        next(it)
        start = time.perf_counter()
        for _ in range(num_images):
            next(it)
        times.append(time.perf_counter() - start)
        it.close()
    times: list[float] = []
    for _ in range(repeat):
        one_epoch()
    return min(times) / num_images


def stage_times(pairs: list[RawPair], cfg: DataConfig, shard: str) -> dict[str, float]:
    """Seconds per image in each stage, replaying decode_sample + collate step by step."""
    totals = dict.fromkeys(("tar read", "json + sampling", "jpeg decode", "rle decode",
                            "resize + normalize + pad", "boxes"), 0.0)
    start = time.perf_counter()
    list(iter_shard(shard))
    totals["tar read"] = time.perf_counter() - start
    for pair in pairs:
        t0 = time.perf_counter()
        image_id, anns = parse_sa1b_json(pair.json)
        height, width = jpeg_size(pair.jpg)
        rng = sample_rng(cfg.seed, 0, image_id)
        chosen = select_annotations(anns, height, width, cfg.max_mask_area_frac,
                                    cfg.max_masks_per_image, rng)
        geo = plan_geometry(height, width, cfg.img_size)
        t1 = time.perf_counter()
        image = decode_jpeg(pair.jpg, cfg.jpeg_decoder, (height, width),
                            (geo.resized_h, geo.resized_w) if cfg.jpeg_dct_downscale else None)
        t2 = time.perf_counter()
        image = resize_image(image, geo)
        t3 = time.perf_counter()
        masks = decode_masks([a["segmentation"] for a in chosen], geo, cfg.mask_decoder)
        t4 = time.perf_counter()
        boxes, _ = masks_to_boxes(masks)
        t5 = time.perf_counter()
        collate([Sample(image, masks, boxes, geo.input_size, (height, width), image_id)],
                cfg.img_size)
        t6 = time.perf_counter()
        for key, dt in (("json + sampling", t1 - t0), ("jpeg decode", t2 - t1),
                        ("resize + normalize + pad", (t3 - t2) + (t6 - t5)),
                        ("rle decode", t4 - t3), ("boxes", t5 - t4)):
            totals[key] += dt
    return {k: v / len(pairs) for k, v in totals.items()}


def _decode_all(pairs: list[RawPair], img_size: int, decoder: str, dct: bool) -> None:
    for pair in pairs:
        size = jpeg_size(pair.jpg)
        geo = plan_geometry(*size, img_size)
        decode_jpeg(pair.jpg, decoder, size, (geo.resized_h, geo.resized_w) if dct else None)


def jpeg_variants(pairs: list[RawPair], img_size: int, repeat: int) -> dict[str, float]:
    """Seconds per image for each JPEG decoder, full size and DCT-downscaled."""
    out = {}
    for decoder in ("pil", "cv2"):
        for dct in (False, True):
            run = partial(_decode_all, pairs, img_size, decoder, dct)
            name = f"{decoder} {'dct-downscaled' if dct else 'full-size'}"
            out[name] = best_of(run, repeat) / len(pairs)
    return out


def _decode_masks_all(jobs: list[tuple[list[dict], Geometry]], method: str) -> None:
    for rles, geo in jobs:
        decode_masks(rles, geo, method)


def mask_variants(pairs: list[RawPair], cfg: DataConfig, repeat: int) -> dict[str, float]:
    """Seconds per image to decode the sampled masks into the input frame."""
    jobs = []
    for pair in pairs:
        image_id, anns = parse_sa1b_json(pair.json)
        height, width = jpeg_size(pair.jpg)
        chosen = select_annotations(anns, height, width, cfg.max_mask_area_frac,
                                    cfg.max_masks_per_image, sample_rng(0, 0, image_id))
        geo = plan_geometry(height, width, cfg.img_size)
        jobs.append(([a["segmentation"] for a in chosen], geo))
    return {method: best_of(partial(_decode_masks_all, jobs, method), repeat) / len(jobs)
            for method in ("pycocotools", "direct")}


def print_ratios(title: str, times: dict[str, float], baseline: str) -> None:
    print(f"\n{title} (baseline: {baseline}; ratio = baseline time / time, >1 is faster)")
    for name, sec in times.items():
        print(f"  {name:<26} {sec * 1e3:8.1f} ms/image   x{times[baseline] / sec:5.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="384×576 images (quick run)")
    parser.add_argument("--images", type=int, default=6, help="images in the shard")
    parser.add_argument("--shapes", type=int, default=130, help="shapes drawn per image "
                        "(occlusion removes some; ~100 masks remain)")
    parser.add_argument("--img-size", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs, best kept")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one DataLoader worker = one thread
    cv2.setNumThreads(1)
    height, width = (384, 576) if args.small else (1500, 2250)
    shard = f"memory://bench-data/{height}x{width}/sa_000000.tar"
    start = time.perf_counter()
    masks_per_image = write_shard(shard, args.images, height, width, args.shapes)
    print(f"{args.images} synthetic SA-1B images {height}×{width}, {masks_per_image:.0f} masks "
          f"each on average (written in {time.perf_counter() - start:.1f} s); img_size "
          f"{args.img_size}, up to 64 masks sampled; 1 thread")
    cfg = DataConfig(shards=shard, img_size=args.img_size, num_workers=0)
    pairs = [e for e in iter_shard(shard) if isinstance(e, RawPair)]

    print(f"\nend to end, default config (jpeg_decoder={cfg.jpeg_decoder}, dct downscale "
          f"{cfg.jpeg_dct_downscale}, mask_decoder={cfg.mask_decoder}), batch_size 1:")
    for workers, label in ((1, "1 DataLoader worker process"), (0, "in the main process")):
        per_image = end_to_end(replace(cfg, num_workers=workers), args.images, args.repeat)
        print(f"  {label:<28} {1.0 / per_image:6.2f} images/s ({per_image * 1e3:.0f} ms/image)")
    stages = stage_times(pairs, cfg, shard)
    total = sum(stages.values())
    print(f"\nper-image time by stage (sum {total * 1e3:.0f} ms)")
    for name, sec in stages.items():
        print(f"  {name:<26} {sec * 1e3:8.1f} ms  {100 * sec / total:5.1f}%")
    print_ratios("JPEG decode", jpeg_variants(pairs, args.img_size, args.repeat), "pil full-size")
    print_ratios("mask decode into the 1024 frame, sampled masks",
                 mask_variants(pairs, cfg, max(1, args.repeat - 1)), "pycocotools")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
