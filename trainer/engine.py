"""The training engine: one step, the loop, checkpoints, evaluation.

The same code runs under ``torchrun`` on a laptop (gloo, CPU), in a PyTorchJob pod on
GPU nodes (NCCL, bf16 autocast) and in CI. The loop only calls collaborators: the model
(``trainer.model``), data (``trainer.data``), the interactive simulation
(``trainer.interactive``), loss, optimizer, checkpoints and metrics.

Determinism: the torch RNG (drop path, dropout) and the prompt generator are re-seeded
at every step from ``(train.seed, step, rank)``, and the data position is part of the
checkpoint, so a run resumed from step N computes exactly the steps the uninterrupted
run would have (bitwise on CPU).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from trainer import dist
from trainer.checkpoint import CheckpointError, CheckpointManager, capture_rng_state, restore_rng_state
from trainer.config import ConfigError, dump_toml
from trainer.presets import Config
from trainer.data import Batch, build_loader, list_shards
from trainer.data.sa1b import SKIP_REASONS
from trainer.flops import device_peak_flops, flops_for_config, mfu, startup_summary
from trainer.evaluate import EvalResult, eval_data_config, evaluate_shards
from trainer.interactive import simulate_interaction
from trainer.allocator import retain_freed_memory
from trainer.loss import LossConfig, num_masks_across_ranks, sam_loss
from trainer.metrics import Metrics, MetricsLogger
from trainer.prom import build_prometheus
from trainer.timing import StepTimer
from trainer.model import Sam, build_model
from trainer.optim import build_optimizer, build_scheduler
from trainer.preflight import StorageUnavailableError, check_run_locations
from trainer.prompts import PromptConfig
from trainer.resume import apply_optim_config, reconcile_config

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss was non-finite for too many consecutive steps (exit code 3)."""


class SamTrainModel(nn.Module):
    """What DDP wraps: encoder once per image, the interactive rounds for all masks, loss.

    Going through one ``forward`` (rather than calling submodules) lets DDP hook the
    backward all-reduce, bucketed and overlapped with the backward pass.
    """

    def __init__(self, sam: Sam, prompts: PromptConfig, loss: LossConfig, checkpoint_rounds: bool = False) -> None:
        super().__init__()
        self.sam, self.prompts, self.loss_cfg = sam, prompts, loss
        self.checkpoint_rounds = checkpoint_rounds

    def forward(self, batch: Batch, generator: torch.Generator, num_masks: torch.Tensor,
                amp_dtype: torch.dtype | None, timer: Callable[[str], Any]) -> dict[str, torch.Tensor]:
        """Losses of one micro-batch (``loss`` is the total to backprop; see ``sam_loss``)."""
        device_type = batch.images.device.type
        with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
            with timer("encoder"):
                embeddings = self.sam.image_encoder(batch.images)  # B×C×h×w
            image_index = batch.valid.nonzero()[:, 0]  # the image of each real mask
            gt_masks = batch.masks[batch.valid]  # N×S×S, padding masks dropped
            # N×2 (h, w) of each mask's unpadded image: clicks and loss stay out of the padding.
            valid_hw = batch.input_sizes.to(gt_masks.device)[image_index]
            with timer("prompt_rounds"):
                rounds = simulate_interaction(self.sam, embeddings, image_index, gt_masks,
                                              batch.boxes[batch.valid], self.prompts, generator,
                                              checkpoint_rounds=self.checkpoint_rounds, valid_hw=valid_hw)
        with timer("loss"), torch.autocast(device_type, enabled=False):
            outputs = [(r.low_res_masks.float(), r.iou_pred.float()) for r in rounds]
            valid = torch.ones(gt_masks.shape[0], dtype=torch.bool, device=gt_masks.device)
            return sam_loss(outputs, gt_masks, valid, num_masks, self.loss_cfg, valid_hw=valid_hw)


def amp_dtype_for(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA unless ``train.amp=off``; fp32 on CPU unless ``amp=bf16``."""
    if cfg.train.amp == "off":
        return None
    if cfg.train.amp == "bf16" or device.type == "cuda":
        return torch.bfloat16
    return None


def step_seed(seed: int, step: int, rank: int) -> int:
    """A distinct, reproducible seed for every (run seed, step, rank)."""
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63 - 1)


class TrainRun:
    """Everything a training run holds; built once per process."""

    def __init__(self, cfg: Config, info: dist.DistInfo, profile: bool = False) -> None:
        self.cfg, self.info = cfg, info
        self.device = info.device
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
        if self.device.type == "cpu" and cfg.train.cpu_retain_memory:
            retain_freed_memory()
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = cfg.train.allow_tf32
            torch.backends.cudnn.allow_tf32 = cfg.train.allow_tf32
        # Cheap start-up checks first (shard list, then where the run writes), so a bad
        # setting fails in seconds with one line, before a ViT-H is built or a dir made.
        self.loader = build_loader(cfg.data, info.rank, info.world_size)
        if cfg.eval.shards and info.is_main:  # evaluated by rank 0 only; checked now, not after training
            list_shards(cfg.eval.shards, "eval.shards")
        ckpt_url = cfg.checkpoint.resolve_url(cfg.train.run_dir)
        check_run_locations({"train.run_dir": cfg.train.run_dir, "checkpoint.url": ckpt_url}, info.is_main)
        gpu = self.device.index if self.device.type == "cuda" else None  # metrics port: bound before the model
        self.metrics = Metrics(MetricsLogger(cfg.train.run_dir, enabled=info.is_main),
                               build_prometheus(cfg, info.rank, info.local_rank, info.world_size, gpu, os.environ))
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.sam = build_model(cfg.model).to(self.device)
        if cfg.train.compile:
            self.sam.image_encoder.compile()  # in place: state_dict keys unchanged
        self.module = SamTrainModel(self.sam, cfg.prompts, cfg.loss,
                                    checkpoint_rounds=cfg.model.activation_checkpointing)
        self.model: nn.Module = self.module
        if info.world_size > 1:
            self.model = DDP(
                self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=cfg.train.find_unused_parameters or cfg.prompts.num_rounds == 1,
                gradient_as_bucket_view=True,
            )
        self.optimizer = build_optimizer(self.sam, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim)
        self.ckpt = CheckpointManager(ckpt_url,
                                      keep_last=cfg.checkpoint.keep_last, is_main=info.is_main,
                                      fresh_if_unusable=cfg.checkpoint.fresh_if_unusable)
        self.amp_dtype = amp_dtype_for(cfg, self.device)
        self._setup_flops()
        # Section times only when something reads them: exact (synchronising) when
        # profiling, asynchronous CUDA events (read a step later) for Prometheus.
        self.timer = StepTimer("sync" if profile else "events" if self.metrics.prom else "off", self.device)
        self.step = 0
        self.last_sections: dict[str, float] = {}
        self.already_finished = False  # resumed at max_iters: nothing may be written
        self.nonfinite_total = 0
        self.nonfinite_streak = 0
        self._updated_norm: torch.Tensor | None = None  # of the last update: checked at the next step

    def _setup_flops(self) -> None:
        """Analytic FLOPs per image and the device peak: logged once, exported, used for MFU."""
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.flops = flops_for_config(self.cfg)
        self.peak_flops = device_peak_flops(name, self.cfg.metrics.peak_tflops)
        if self.info.is_main:
            log.info("%s (device %s)", startup_summary(self.flops, self.peak_flops), name)
        # MFU counts model FLOPs: what activation checkpointing recomputes is left out.
        self.metrics.set_flops({"encoder": self.flops.model_encoder, "end_to_end": self.flops.model_total},
                               self.peak_flops)

    # ------------------------------------------------------------------ checkpoints

    def resume(self) -> bool:
        """Load the newest complete checkpoint, if any (all ranks agree on which).

        Settings changed since the checkpoint are applied or refused (``trainer.resume``);
        ``self.cfg`` becomes the config in effect. No usable checkpoint where a crash
        cannot explain it is a :class:`ConfigError` (exit 2) naming each step dir.
        """
        if self.cfg.checkpoint.resume == "off":
            if self.ckpt.steps():
                raise ConfigError(f"checkpoint.resume: 'off' but {self.ckpt.url} already holds "
                                  "checkpoints; choose a new checkpoint.url or resume=auto")
            return False
        try:
            found = self.ckpt.resume()
        except CheckpointError as err:
            raise ConfigError(f"checkpoint.url: {err}. Fix or remove those step dirs, set "
                              "checkpoint.fresh_if_unusable=true to start from step 0 anyway, or use a "
                              "new checkpoint.url") from err
        if found is None:
            return False
        step, state = found
        train_state = state["train_state"]
        self.cfg = reconcile_config(self.cfg, state.get("config.toml", ""), step, warn=self.info.is_main)
        try:
            self.sam.load_state_dict(state["model"])
            self.optimizer.load_state_dict(train_state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise ConfigError(f"checkpoint.url: step {step} under {self.ckpt.url} does not fit this "
                              f"model/optimizer config: {str(err).splitlines()[0]}") from err
        self.scheduler.load_state_dict(train_state["scheduler"])
        self.step = int(train_state["step"])
        apply_optim_config(self.optimizer, self.scheduler, self.sam, self.cfg, self.step)
        self.nonfinite_total = int(train_state.get("nonfinite_total", 0))
        self._restore_data_and_rng(train_state)
        log.info("resumed from %s (step %d)", self.ckpt.step_url(step), self.step)
        self.metrics.resumed(self.step, self.ckpt.created(step) or time.time(), self.loader.skip_counts())
        return True

    def _restore_data_and_rng(self, train_state: dict[str, Any]) -> None:
        """This rank's RNG state and data position, when the world size is unchanged."""
        per_rank = train_state.get("data", [])
        if len(per_rank) != self.info.world_size:
            log.warning("checkpoint was written by %d ranks, this job has %d: the data "
                        "position cannot be restored; data restarts from its beginning",
                        len(per_rank), self.info.world_size)
            return
        restore_rng_state(train_state["rng"][self.info.rank])
        try:
            self.loader.load_state_dict(per_rank[self.info.rank])
        except ValueError as err:
            # A changed shard list or worker count must not turn every pod restart
            # into the same crash: train on, from the start of the data order.
            log.warning("data position not restored (%s); data restarts from its beginning", err)

    def check_replicas(self) -> None:
        """Fail loudly if DDP replicas diverged: every rank's weights must be identical.

        Per parameter, the float64 sum and sum of squares (one parameter at a time, so no
        full float64 copy of a 600M-parameter model), compared exactly across ranks. Run
        at each checkpoint so a silent divergence never gets saved as rank 0's weights.
        """
        with torch.no_grad():
            stats = torch.stack([torch.stack([p.double().sum(), p.double().square().sum()])
                                 for p in self.sam.parameters()])
        digest = stats.flatten().tolist()
        digests = dist.all_gather_object(digest)
        if not all(math.isfinite(v) for d in digests for v in d):  # NaN != NaN: check this first
            raise NonFiniteLossError(f"step {self.step}: non-finite weights on some rank; not checkpointing "
                                     f"them. The last good checkpoint is kept under {self.ckpt.url}")
        if any(d != digests[0] for d in digests):
            raise RuntimeError(f"step {self.step}: model replicas differ across ranks")
        log.info("step %d: parameters identical on all %d ranks (digest %.10g)", self.step, len(digests), sum(digest))

    def save(self) -> None:
        """Checkpoint the current step (rank 0 writes; all ranks contribute their state)."""
        start = time.perf_counter()
        self.check_replicas()
        data_states = dist.all_gather_object(self.loader.state_dict())
        rng_states = dist.all_gather_object(capture_rng_state())
        state = {
            "model": self.sam.state_dict(),
            "train_state": {
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "step": self.step, "data": data_states, "rng": rng_states,
                "nonfinite_total": self.nonfinite_total,
            },
            "config.toml": dump_toml(self.cfg, header=f"resolved config, step {self.step}"),
        }
        self.ckpt.save(self.step, state)
        self.metrics.flush()
        dist.barrier()  # nobody runs ahead while rank 0 writes
        self.metrics.checkpoint(time.perf_counter() - start, time.time())  # every rank: its stall

    # ------------------------------------------------------------------ one step

    def train_step(self, batches: Iterator[Batch]) -> dict[str, float]:
        """One optimizer step over ``train.grad_accum`` micro-batches; returns metrics."""
        cfg, timer = self.cfg, self.timer
        seed = step_seed(cfg.train.seed, self.step, self.info.rank)
        torch.manual_seed(seed)
        generator = torch.Generator(self.device).manual_seed(seed)
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        data_wait, num_images, num_masks_local = 0.0, 0, 0
        accum = cfg.train.grad_accum
        step_start = time.perf_counter()
        for micro in range(accum):
            start = time.perf_counter()
            with timer("data_wait"):
                cpu_batch = next(batches)
                num_masks_local += int(cpu_batch.valid.sum())  # on the host: no device sync
                batch = cpu_batch.to(self.device, non_blocking=True)
            data_wait += time.perf_counter() - start
            num_images += batch.images.shape[0]
            num_masks = num_masks_across_ranks(batch.valid)
            sync = micro == accum - 1 or not isinstance(self.model, DDP)
            with contextlib.nullcontext() if sync else self.model.no_sync():
                losses = self.model(batch, generator, num_masks, self.amp_dtype, timer)
                with timer("backward"):
                    (losses["loss"] / accum).backward()
            for key, value in losses.items():
                totals[key] = totals.get(key, 0.0) + float(value.detach()) / accum
        with timer("optimizer"):
            finite, grad_norm = self._finish_step(totals["loss"])
        # The base lr this step used, read from the optimizer (what is in effect, not the config).
        group = self.optimizer.param_groups[-1]
        lr_used = group["lr"] / group.get("lr_scale", 1.0)
        self.scheduler.step()
        self.step += 1
        out = {f"loss/{k.removeprefix('loss_')}" if k != "loss" else "loss/total": v for k, v in totals.items()}
        out.update({"lr": lr_used, "grad_norm": grad_norm, "data/wait_s": data_wait,
                    "data/images": num_images, "data/masks": num_masks_local,
                    "nonfinite/total": self.nonfinite_total, "nonfinite/skipped": float(not finite),
                    "time/step_s": time.perf_counter() - step_start})
        self.last_sections = timer.end_step()  # seconds per section (trainer.timing: maybe a step late)
        return out

    def _grad_norm(self, params: list[torch.Tensor]) -> torch.Tensor:
        """Global L2 norm of the gradients before clipping; clips when ``train.grad_clip`` > 0.

        Computed even without clipping (the paper presets): it is reported, and a
        non-finite gradient must be caught whether or not clipping is on.
        """
        clip = self.cfg.train.grad_clip
        if not params:
            return torch.tensor(0.0)
        if clip > 0:
            return torch.nn.utils.clip_grad_norm_(params, clip)
        total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
        if total_norm is None:
            return torch.nn.utils.clip_grad_norm_(params, float("inf"))  # scales by 1: a norm only
        return total_norm([p.grad for p in params])

    def _finish_step(self, loss: float) -> tuple[bool, float]:
        """Agree across ranks that loss and gradients are finite, then update or skip.

        Every update also leaves a fused norm of the updated parameters on the device
        (finite loss and gradients can still give inf/NaN weights, e.g. with a huge lr).
        It is agreed on together with the next step's loss and gradient flags: one
        collective and one sync per step, none added. Weights that are not finite cannot
        be undone, so all ranks stop with :class:`NonFiniteLossError` (exit 3); before
        any save, ``check_replicas`` refuses non-finite weights too, so no checkpoint
        holds them. Returns ``(updated, grad norm before clipping)``.
        """
        params = [p for p in self.sam.parameters() if p.grad is not None]
        grad_norm = self._grad_norm(params)
        updated = self._updated_norm if self._updated_norm is not None else torch.zeros(())
        flags = torch.stack([torch.isfinite(grad_norm), torch.isfinite(updated.to(grad_norm.device)),
                             torch.tensor(math.isfinite(loss), device=grad_norm.device)])
        grads_ok, weights_ok, loss_ok = dist.all_agree_each(flags)
        shown = self.step + 1  # the step number the progress line of this step shows
        if not weights_ok:
            raise NonFiniteLossError(
                f"step {shown - 1}: the update made the weights non-finite on some rank (finite loss and "
                f"gradients, lr {self.optimizer.param_groups[-1]['lr']:.3g}); stopping. The last good "
                f"checkpoint is kept under {self.ckpt.url}")
        if grads_ok and loss_ok:
            self.optimizer.step()
            self.nonfinite_streak = 0
            self._updated_norm = torch.stack(torch._foreach_norm(params)).sum() if params else None
            return True, float(grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_total += 1
        self.nonfinite_streak += 1
        log.warning("step %d: non-finite loss or gradient on some rank; update skipped "
                    "(%d in a row, %d in total)", shown, self.nonfinite_streak, self.nonfinite_total)
        if self.nonfinite_streak >= max(self.cfg.train.max_nonfinite_steps, 1):
            raise NonFiniteLossError(
                f"loss non-finite for {self.nonfinite_streak} consecutive steps (train.max_nonfinite_steps="
                f"{self.cfg.train.max_nonfinite_steps}); stopping. The last good checkpoint is kept "
                f"under {self.ckpt.url}")
        return False, float(grad_norm)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> EvalResult | None:
        """mIoU on ``eval.shards`` (rank 0 evaluates, the others wait).

        The same protocol, data pass and mask sampling as ``sam-train eval`` (one in-order
        pass, fixed-seed masks: ``trainer.evaluate.eval_data_config``); logs
        ``eval/<metric>`` for ``trainer.evaluate.metric_keys()`` plus ``eval/masks``,
        ``eval/images`` and ``eval/skipped``.
        """
        cfg = self.cfg
        if not cfg.eval.shards:
            return None
        result = None
        if self.info.is_main:
            data_cfg = eval_data_config(cfg.eval.shards, cfg.data.img_size,
                                        max_masks_per_image=cfg.eval.max_masks_per_image)
            result = evaluate_shards(self.sam, data_cfg, cfg.eval.num_images, self.device,
                                     batch_size=cfg.eval.batch_size)
            miou = result.miou()
            counts = {"eval/masks": result.num_masks, "eval/images": result.num_images,
                      "eval/skipped": sum(result.skips.values())}
            self.metrics.eval(self.step, miou, counts,
                              "eval step %d: " % self.step + ", ".join(f"{k} mIoU {v:.3f}" for k, v in miou.items())
                              + f" ({result.num_masks} masks in {result.num_images} images)")
        dist.barrier()
        return result

    # ------------------------------------------------------------------ the loop

    def _log_progress(self, values: dict[str, float], window: dict[str, float], start: tuple[float, int]) -> None:
        """One progress line / metrics record; skip counts are summed over all ranks.

        Called at the same steps on every rank (the all-reduce is a collective).
        """
        elapsed = time.perf_counter() - window["start"]
        values["time/images_per_s"] = window["images"] / max(elapsed, 1e-9)
        if self.peak_flops:  # per device: the window counts images of all ranks
            per_device = values["time/images_per_s"] / self.info.world_size
            values["mfu/encoder"] = mfu(per_device, self.flops.model_encoder, self.peak_flops)
            values["mfu/end_to_end"] = mfu(per_device, self.flops.model_total, self.peak_flops)
        values["time/data_share"] = window["wait"] / max(elapsed, 1e-9)
        counts = self.loader.skip_counts()
        summed = dist.sum_over_ranks([counts.get(k, 0) for k in SKIP_REASONS])
        values.update({f"data/skipped_{k}": v for k, v in zip(SKIP_REASONS, summed, strict=True)})
        max_iters = self.cfg.optim.max_iters
        per_step = (time.perf_counter() - start[0]) / max(self.step - start[1], 1)
        self.metrics.train(self.step, max_iters, values, per_step * (max_iters - self.step))

    def run(self, shutdown: dist.GracefulShutdown) -> int:
        """Train to ``optim.max_iters``; returns the process exit code.

        A run resumed at (or past) ``max_iters`` is finished: it exits 0 and writes
        nothing. A shutdown signal during the last step finishes the run (final
        checkpoint, no end-of-run evaluation, exit 0) rather than asking for a restart.
        """
        resumed = self.resume()
        cfg, max_iters = self.cfg, self.cfg.optim.max_iters  # after resume: the config in effect
        if resumed and self.step >= max_iters:
            self.already_finished = True
            log.info("checkpoint step %d already reaches optim.max_iters=%d: training is finished, nothing "
                     "to do (raise optim.max_iters to train on)", self.step, max_iters)
            return dist.ExitCode.OK
        global_batch = cfg.data.batch_size * self.info.world_size * cfg.train.grad_accum
        log.info("global batch %d images = %d per rank x %d ranks x %d accumulation; up to %d masks per image; "
                 "%d rounds per mask; device %s, amp %s", global_batch, cfg.data.batch_size, self.info.world_size,
                 cfg.train.grad_accum, cfg.data.max_masks_per_image, cfg.prompts.num_rounds, self.device,
                 self.amp_dtype or "off")
        batches = iter(self.loader)
        window = {"start": time.perf_counter(), "images": 0, "wait": 0.0}
        start = (time.perf_counter(), self.step)
        saved_at = self.step if resumed else -1  # the resumed step is on storage already
        end_eval = cfg.eval.at_end
        while self.step < max_iters:
            values = self.train_step(batches)
            self.metrics.step(self.step, values, self.last_sections, self.loader.skip_counts(), values["time/step_s"])
            window["images"] += values["data/images"] * self.info.world_size
            window["wait"] += values["data/wait_s"]
            if self.step % cfg.train.log_every == 0 or self.step == max_iters:
                self._log_progress(values, window, start)
                window = {"start": time.perf_counter(), "images": 0, "wait": 0.0}
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                self.save()
                saved_at = self.step
            if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < max_iters:
                self.evaluate()
            if shutdown.agree():
                if saved_at != self.step:
                    self.save()
                    saved_at = self.step
                if self.step == max_iters:  # done: a restart would have nothing to do
                    log.warning("%s received during the last step: training is finished; skipping the "
                                "end-of-run evaluation", shutdown.signal_name or "shutdown signal on another rank")
                    end_eval = False
                    break
                log.warning("%s received: checkpoint at step %d written; exiting %d so the job restarts",
                            shutdown.signal_name or "shutdown signal on another rank", self.step,
                            dist.ExitCode.PREEMPTED)
                return dist.ExitCode.PREEMPTED
        if saved_at != self.step:
            self.save()
        if end_eval:
            self.evaluate()
        log.info("training finished at step %d; checkpoints under %s", self.step, self.ckpt.url)
        return dist.ExitCode.OK


def train(cfg: Config, profile: bool = False) -> int:
    """Run training in this process (one rank of a torchrun job, or alone)."""
    info = dist.init_distributed(cfg.train.device)
    dist.setup_logging(info.rank, cfg.log.level, cfg.log.format)
    run: TrainRun | None = None
    shutdown: dist.GracefulShutdown | None = None
    peer_lost = False
    try:
        run = TrainRun(cfg, info, profile=profile)
        if info.is_main:
            log.info("resolved config:\n%s", dump_toml(cfg))
        with dist.GracefulShutdown() as shutdown:
            return run.run(shutdown)
    except NonFiniteLossError as err:
        log.error("%s", err)
        return dist.ExitCode.NONFINITE
    except StorageUnavailableError as err:
        log.error("%s; exiting %d so the pod is restarted", err, dist.ExitCode.UNAVAILABLE)
        return dist.ExitCode.UNAVAILABLE
    except Exception as err:
        if not dist.is_peer_failure(err):
            raise
        peer_lost = True
        log.error("a collective failed: another rank died or stopped answering (%s: %s); exiting %d so "
                  "the job restarts and resumes from the last complete checkpoint",
                  type(err).__name__, str(err).splitlines()[0][:300], dist.ExitCode.PEER_LOST)
        return dist.ExitCode.PEER_LOST
    finally:
        if run is not None:  # loss_curve.png beside metrics.jsonl, also after 143 (rank 0; never raises)
            # After SIGTERM the grace period is not ours to spend waiting for a scrape, and
            # after a lost peer the job is about to restart: no final scrape wait.
            interrupted = peer_lost or (shutdown is not None and shutdown.requested)
            run.metrics.close(draw=not run.already_finished, final_scrape=not interrupted)
        dist.destroy()
