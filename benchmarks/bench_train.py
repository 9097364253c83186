"""Training step, ours vs the fair official-modules baseline: time, images/s, MFU, profile.

Per configuration, in one process: synthetic SA-1B shards, our real engine
(``trainer.engine.TrainRun.train_step``) and ``benchmarks/baseline.py`` built from the
same weights; a check that both compute the same loss on the same batch and seed; then
baseline and ours alternate on the same batches (median of ``--runs`` after one warm-up
each); then a short ``torch.profiler`` window over our step.

Both sides run without drop path and decoder dropout (the official modules have
neither), so they compute the same mathematics.

    python benchmarks/bench_train.py                       # the CPU configurations
    python benchmarks/bench_train.py --config vit_h_1024 --config vit_h_1024_ac   # on a GPU
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from baseline import BASELINE_SECTIONS, BaselineStep, median  # noqa: E402
from trainer import dist  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.data import Batch, write_synthetic_shards  # noqa: E402
from trainer.engine import SamTrainModel, TrainRun, step_seed  # noqa: E402
from trainer.flops import device_peak_flops, train_flops_per_image  # noqa: E402
from trainer.interactive import simulate_interaction  # noqa: E402
from trainer.loss import num_masks_across_ranks, sam_loss  # noqa: E402
from trainer.model.build import SamSpec, build_from_spec, spec_for  # noqa: E402
from trainer.optim import build_optimizer, build_scheduler  # noqa: E402
from trainer.presets import PRESETS, Config  # noqa: E402

#: Our engine's timer sections (``TrainRun(profile=True)``: synchronised).
OUR_SECTIONS = ("data_wait", "encoder", "prompt_rounds", "loss", "backward", "optimizer")
#: The 11-round recipe: 1 initial prompt + 8 correction clicks + 2 mask-only rounds.
ROUNDS_11 = ("prompts.num_correction_points=8", "prompts.num_no_point_rounds=2")
#: The official modules have no drop path or decoder dropout: both sides run without.
NO_STOCHASTIC = ("model.drop_path_rate=0", "model.decoder_dropout=0")


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark configuration.

    Attributes:
        name: the row name in the report.
        preset: the trainer preset to start from.
        overrides: ``--set`` style overrides on top of it.
        spec: model sizes when they differ from the preset (vit_b widths at 256 px on
            CPU: the preset ties ``img_size`` to the variant, so the model is swapped in).
        side: synthetic image side range; masks: masks per synthetic image.
        gpu: needs CUDA.
    """

    name: str
    preset: str
    overrides: tuple[str, ...] = ()
    spec: SamSpec | None = None
    side: tuple[int, int] = (256, 384)
    masks: tuple[int, int] = (8, 30)
    gpu: bool = False


def _gpu_config(variant: str, ac: bool) -> BenchConfig:
    return BenchConfig(
        name=f"{variant}_1024{'_ac' if ac else ''}", preset=variant, gpu=True,
        overrides=("model.encoder_init=random", "train.device=cuda", "train.amp=bf16",
                   "data.batch_size=1", "data.max_masks_per_image=64",
                   f"model.activation_checkpointing={str(ac).lower()}", *ROUNDS_11, *NO_STOCHASTIC),
        side=(1024, 1280), masks=(70, 90))


CONFIGS: dict[str, BenchConfig] = {
    "tiny_cpu": BenchConfig("tiny_cpu", "tiny_cpu"),
    "tiny_64x11": BenchConfig("tiny_64x11", "tiny_cpu", masks=(70, 90), overrides=(
        "data.batch_size=1", "data.max_masks_per_image=64", *ROUNDS_11)),
    "vit_b_256": BenchConfig("vit_b_256", "tiny_cpu", masks=(20, 30), overrides=(
        "data.batch_size=1", "data.max_masks_per_image=16", *ROUNDS_11),
        spec=spec_for("vit_b", img_size=256, drop_path_rate=0.0, decoder_dropout=0.0)),
    **{c.name: c for c in (_gpu_config(v, ac) for v in ("vit_b", "vit_h") for ac in (False, True))},
}
CPU_CONFIGS = ("tiny_cpu", "tiny_64x11", "vit_b_256")
GPU_CONFIGS = ("vit_b_1024", "vit_b_1024_ac", "vit_h_1024", "vit_h_1024_ac")


def swap_model(run: TrainRun, spec: SamSpec) -> None:
    """Replace the run's model (and optimizer, scheduler) by a fresh one with ``spec``'s sizes."""
    torch.manual_seed(run.cfg.train.seed)
    run.sam = build_from_spec(spec).to(run.device)
    run.module = SamTrainModel(run.sam, run.cfg.prompts, run.cfg.loss, checkpoint_rounds=spec.activation_checkpointing)
    run.model = run.module
    run.optimizer = build_optimizer(run.sam, run.cfg.optim)
    run.scheduler = build_scheduler(run.optimizer, run.cfg.optim)


def model_spec(run: TrainRun, bench: BenchConfig) -> SamSpec:
    """The sizes the run trains (the swapped-in spec or the config's)."""
    if bench.spec is not None:
        return bench.spec
    return spec_for(run.cfg.model.variant, **run.cfg.model.overrides())


def make_run(bench: BenchConfig, work: Path, num_images: int) -> TrainRun:
    """Synthetic shards and a ``TrainRun`` (one process, no checkpoints, quiet)."""
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        os.environ.pop(var, None)
    write_synthetic_shards(str(work / "data"), num_images=num_images, num_shards=1, seed=0,
                           min_side=bench.side[0], max_side=bench.side[1],
                           min_masks=bench.masks[0], max_masks=bench.masks[1])
    cfg = load_config(Config, bench.preset, [f"data.shards={work}/data/sa_*.tar", f"train.run_dir={work}/run",
                                             "data.num_workers=0", "eval.shards=", "train.log_every=100000",
                                             "checkpoint.every=0", *NO_STOCHASTIC, *bench.overrides], PRESETS)
    info = dist.init_distributed(cfg.train.device)
    dist.setup_logging(0, "WARNING")
    run = TrainRun(cfg, info, profile=True)
    if bench.spec is not None:
        swap_model(run, bench.spec)
    return run


def load_batches(run: TrainRun, count: int) -> list[Batch]:
    """``count`` batches on the run's device (data loading is benchmarked separately)."""
    it = iter(run.loader)
    return [next(it).to(run.device) for _ in range(count)]


Prompts = list[tuple[torch.Tensor, torch.Tensor]]  # per round: (point_coords, point_labels)


def our_losses(run: TrainRun, batch: Batch, seed: int) -> tuple[dict[str, torch.Tensor], Prompts]:
    """Our forward + loss through the functions ``SamTrainModel.forward`` calls, with the
    given seed; also each round's prompts (to replay them in the baseline)."""
    torch.manual_seed(seed)
    generator = torch.Generator(run.device).manual_seed(seed)
    device_type = run.device.type
    with torch.autocast(device_type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
        embeddings = run.sam.image_encoder(batch.images)
        image_index = batch.valid.nonzero()[:, 0]
        gt = batch.masks[batch.valid]
        valid_hw = batch.input_sizes.to(gt.device)[image_index]
        rounds = simulate_interaction(run.sam, embeddings, image_index, gt, batch.boxes[batch.valid],
                                      run.cfg.prompts, generator, valid_hw=valid_hw)
    with torch.autocast(device_type, enabled=False):
        outputs = [(r.low_res_masks.float(), r.iou_pred.float()) for r in rounds]
        valid = torch.ones(gt.shape[0], dtype=torch.bool, device=gt.device)
        losses = sam_loss(outputs, gt, valid, num_masks_across_ranks(batch.valid), run.cfg.loss, valid_hw=valid_hw)
    return losses, [(r.point_coords, r.point_labels) for r in rounds]


def check_same_loss(run: TrainRun, base: BaselineStep, batch: Batch) -> dict[str, float]:
    """Both sides' losses on the same batch and seed (before any update).

    ``rel_diff``: the baseline replays our recorded prompts (the check). ``rel_diff_sampled``:
    the baseline samples its own prompts with the same sampler and seed (what the timed
    runs do); it can differ more, see ``baseline_losses``.
    """
    seed = step_seed(run.cfg.train.seed, run.step, run.info.rank)
    with torch.no_grad():
        ours_t, prompts = our_losses(run, batch, seed)
        ours = float(ours_t["loss"])
        replayed = float(base.losses(batch, seed, replay=prompts)["loss"])
        sampled = float(base.losses(batch, seed)["loss"])
    run.timer.totals.clear()
    base.timer.totals.clear()
    scale = max(abs(ours), 1e-12)
    return {"loss_ours": ours, "loss_baseline": replayed, "rel_diff": abs(ours - replayed) / scale,
            "loss_baseline_sampled": sampled, "rel_diff_sampled": abs(ours - sampled) / scale}


def _timed(run: TrainRun, fn: Any) -> float:
    """Wall seconds of ``fn()``, device-synchronised."""
    sync = torch.cuda.synchronize if run.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def alternate(run: TrainRun, base: BaselineStep, batches: list[Batch], runs: int) -> tuple[list[float], list[float]]:
    """Baseline and ours on the same batch and seed, ``runs`` times after one warm-up each.

    The order alternates (baseline first on even runs, ours first on odd ones) so that
    neither side always inherits the other's cache and allocator state.
    """
    ours_t, base_t = [], []
    for i in range(runs + 1):
        batch = batches[i % len(batches)]
        seed = step_seed(run.cfg.train.seed, run.step, run.info.rank)
        steps = {"baseline": lambda: base.step(batch, seed), "ours": lambda: run.train_step(iter([batch]))}
        order = ("baseline", "ours") if i % 2 == 0 else ("ours", "baseline")
        took = {name: _timed(run, steps[name]) for name in order}
        tb, to = took["baseline"], took["ours"]
        if i == 0:  # warm-up: allocator, lazy init
            run.timer.totals.clear()
            base.timer.totals.clear()
            continue
        base_t.append(tb)
        ours_t.append(to)
    return ours_t, base_t


def shares(totals: dict[str, float], names: tuple[str, ...], step_total: float) -> dict[str, float]:
    """Each section's share of the summed step time, plus ``other``."""
    out = {n: totals.get(n, 0.0) / step_total for n in names}
    out["other"] = max(0.0, 1.0 - sum(out.values()))
    return out


def profile_top_ops(run: TrainRun, batches: list[Batch], steps: int = 2,
                    top: int = 8) -> list[tuple[str, float, float]]:
    """Top ops by self time over ``steps`` of our step: (name, self ms per step, share)."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    cuda = run.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for i in range(steps):
            run.train_step(iter([batches[i % len(batches)]]))
        if cuda:
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    total = sum(getattr(e, attr, 0.0) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, attr, 0.0), reverse=True)
    return [(e.key, getattr(e, attr) / 1e3 / steps, getattr(e, attr) / total) for e in events[:top]]


def mfu_numbers(run: TrainRun, bench: BenchConfig, batches: list[Batch], step_s: float,
                peak: float | None) -> dict[str, float | None]:
    """Images/s and model-FLOP MFU (encoder, end to end) at the measured step time."""
    spec = model_spec(run, bench)
    budget = train_flops_per_image(spec, run.cfg.data.max_masks_per_image, run.cfg.prompts, False)
    images = sum(b.images.shape[0] for b in batches) / len(batches)
    masks = sum(int(b.valid.sum()) for b in batches) / len(batches)
    executed = train_flops_per_image(spec, run.cfg.data.max_masks_per_image, run.cfg.prompts, False, executed=True,
                                     cuda=run.device.type == "cuda")
    enc = images * budget.model_encoder / step_s
    e2e = enc + masks * 3.0 * budget.decoder_forward / max(budget.masks_per_image, 1) / step_s
    return {"images_per_s": images / step_s, "masks_per_image": masks,
            "model_tflops_per_image": (budget.model_encoder + 3.0 * budget.decoder_forward * masks
                                       / max(budget.masks_per_image, 1)) / 1e12,
            "achieved_tflops": e2e / 1e12,
            # What our step runs per model FLOP (padding rows skipped, factored first decoder
            # layer, few-token attentions through the weights).
            "executed_fraction": (executed.encoder_forward + executed.decoder_forward)
            / (budget.encoder_forward + budget.decoder_forward),
            "encoder_mfu": None if peak is None else enc / peak,
            "e2e_mfu": None if peak is None else e2e / peak}


def run_config(bench: BenchConfig, runs: int = 5, profile: bool = True, peak_tflops: float = 0.0) -> dict[str, Any]:
    """Everything ``bench_train`` reports for one configuration, as a dict (and printed)."""
    work = Path(tempfile.mkdtemp(prefix=f"bench_train_{bench.name}_"))
    run = make_run(bench, work, num_images=4)
    batches = load_batches(run, 3)
    base = BaselineStep.create(model_spec(run, bench), run.sam.state_dict(), run.cfg.prompts, run.cfg.loss,
                               run.cfg.optim, run.amp_dtype, run.device,
                               checkpointing=run.cfg.model.activation_checkpointing)
    check = check_same_loss(run, base, batches[0])
    ours_t, base_t = alternate(run, base, batches, runs)
    ours_s, base_s = median(ours_t), median(base_t)
    device_name = torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else "cpu"
    peak = device_peak_flops(device_name, peak_tflops)
    result: dict[str, Any] = {
        "name": bench.name, "device": device_name, "threads": torch.get_num_threads(),
        "amp": str(run.amp_dtype or "off"), "ac": run.cfg.model.activation_checkpointing,
        "batch_size": run.cfg.data.batch_size, "max_masks": run.cfg.data.max_masks_per_image,
        "rounds": run.cfg.prompts.num_rounds, "img_size": model_spec(run, bench).img_size,
        "runs": runs, "ours_s": ours_s, "baseline_s": base_s, "ratio": base_s / ours_s,
        "ours_all": ours_t, "baseline_all": base_t, "loss_check": check,
        "peak_tflops": None if peak is None else peak / 1e12,
        **mfu_numbers(run, bench, batches, ours_s, peak),
        "ours_shares": shares(run.timer.totals, OUR_SECTIONS, sum(ours_t)),
        "baseline_shares": shares(base.timer.totals, BASELINE_SECTIONS, sum(base_t)),
    }
    if run.device.type == "cuda":
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if profile:
        result["top_ops"] = profile_top_ops(run, batches)
    print_result(result)
    return result


def _pct(value: float | None) -> str:
    return "no peak known" if value is None else f"{100 * value:.2f}%"


def print_result(r: dict[str, Any]) -> None:
    """Human-readable summary of one configuration."""
    c = r["loss_check"]
    print(f"{r['name']}: {r['device']}, {r['threads']} threads, amp {r['amp']}, AC {r['ac']}, "
          f"{r['batch_size']} img x <= {r['max_masks']} masks x {r['rounds']} rounds @ {r['img_size']} px")
    print(f"  loss check: ours {c['loss_ours']:.6f} baseline (our prompts replayed) {c['loss_baseline']:.6f} "
          f"rel diff {c['rel_diff']:.2e}; baseline sampling its own prompts {c['loss_baseline_sampled']:.6f} "
          f"rel diff {c['rel_diff_sampled']:.2e}")
    print(f"  step ours {r['ours_s'] * 1e3:.1f} ms, baseline {r['baseline_s'] * 1e3:.1f} ms, "
          f"ratio baseline/ours {r['ratio']:.2f} (median of {r['runs']})")
    print(f"  images/s {r['images_per_s']:.3f}, {r['achieved_tflops']:.3f} model TFLOP/s, "
          f"encoder MFU {_pct(r['encoder_mfu'])}, end-to-end MFU {_pct(r['e2e_mfu'])}; "
          f"ours executes {r['executed_fraction']:.2f} of the model FLOPs")
    print("  ours:     " + ", ".join(f"{k} {v:.2f}" for k, v in r["ours_shares"].items()))
    print("  baseline: " + ", ".join(f"{k} {v:.2f}" for k, v in r["baseline_shares"].items()))
    for name, ms, share in r.get("top_ops", []):
        print(f"    {name:40s} {ms:9.1f} ms/step {100 * share:5.1f}%")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the chosen configurations; returns ``{name: result}``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", choices=sorted(CONFIGS),
                        help="repeatable; default: the CPU configurations")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per side (after one warm-up)")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (CPUs have none)")
    args = parser.parse_args(argv)
    names = args.config or list(CPU_CONFIGS)
    return {n: run_config(CONFIGS[n], args.runs, not args.no_profile, args.peak_tflops) for n in names}


if __name__ == "__main__":
    main()
