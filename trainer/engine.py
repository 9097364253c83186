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
import dataclasses
import logging
import time
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from trainer import dist
from trainer.checkpoint import CheckpointManager, capture_rng_state, restore_rng_state
from trainer.config import ConfigError, dump_toml
from trainer.presets import Config
from trainer.data import Batch, build_loader
from trainer.evaluate import EvalResult, evaluate
from trainer.interactive import simulate_interaction
from trainer.loss import LossConfig, num_masks_across_ranks, sam_loss
from trainer.metrics import MetricsLogger
from trainer.model import Sam, build_model
from trainer.optim import build_optimizer, build_scheduler, lr_factor
from trainer.prompts import PromptConfig

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss was non-finite for too many consecutive steps (exit code 3)."""


class StepTimer:
    """Named wall-clock sections of a step; CUDA-synchronised so GPU time is attributed."""

    def __init__(self, enabled: bool, device: torch.device) -> None:
        self.enabled, self.device = enabled, device
        self.totals: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start


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
            with timer("prompt_rounds"):
                rounds = simulate_interaction(self.sam, embeddings, image_index, gt_masks,
                                              batch.boxes[batch.valid], self.prompts, generator,
                                              checkpoint_rounds=self.checkpoint_rounds)
        with timer("loss"), torch.autocast(device_type, enabled=False):
            outputs = [(r.low_res_masks.float(), r.iou_pred.float()) for r in rounds]
            valid = torch.ones(gt_masks.shape[0], dtype=torch.bool, device=gt_masks.device)
            return sam_loss(outputs, gt_masks, valid, num_masks, self.loss_cfg)


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
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = cfg.train.allow_tf32
            torch.backends.cudnn.allow_tf32 = cfg.train.allow_tf32
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
        self.loader = build_loader(cfg.data, info.rank, info.world_size)
        self.ckpt = CheckpointManager(cfg.checkpoint.resolve_url(cfg.train.run_dir),
                                      keep_last=cfg.checkpoint.keep_last, is_main=info.is_main)
        self.metrics = MetricsLogger(cfg.train.run_dir, enabled=info.is_main)
        self.amp_dtype = amp_dtype_for(cfg, self.device)
        self.timer = StepTimer(profile, self.device)
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_streak = 0

    # ------------------------------------------------------------------ checkpoints

    def resume(self) -> bool:
        """Load the newest complete checkpoint, if any (all ranks agree on which)."""
        if self.cfg.checkpoint.resume == "off":
            if self.ckpt.steps():
                raise ConfigError(f"checkpoint.resume: 'off' but {self.ckpt.url} already holds "
                                  "checkpoints; choose a new checkpoint.url or resume=auto")
            return False
        found = self.ckpt.resume()
        if found is None:
            return False
        step, state = found
        self.sam.load_state_dict(state["model"])
        train_state = state["train_state"]
        self.optimizer.load_state_dict(train_state["optimizer"])
        self.scheduler.load_state_dict(train_state["scheduler"])
        self.step = int(train_state["step"])
        self.nonfinite_total = int(train_state.get("nonfinite_total", 0))
        per_rank = train_state.get("data", [])
        if len(per_rank) == self.info.world_size:
            restore_rng_state(train_state["rng"][self.info.rank])
            try:
                self.loader.load_state_dict(per_rank[self.info.rank])
            except ValueError as err:
                # A changed shard list or worker count must not turn every pod restart
                # into the same crash: train on, from the start of the data order.
                log.warning("data position not restored (%s); data restarts from its beginning", err)
        else:
            log.warning("checkpoint was written by %d ranks, this job has %d: the data "
                        "position cannot be restored; data restarts from its beginning",
                        len(per_rank), self.info.world_size)
        log.info("resumed from %s (step %d)", self.ckpt.step_url(step), self.step)
        return True

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
        if any(d != digests[0] for d in digests):
            raise RuntimeError(f"step {self.step}: model replicas differ across ranks")
        log.info("step %d: parameters identical on all %d ranks (digest %.10g)", self.step, len(digests), sum(digest))

    def save(self) -> None:
        """Checkpoint the current step (rank 0 writes; all ranks contribute their state)."""
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

    # ------------------------------------------------------------------ one step

    def train_step(self, batches: Iterator[Batch]) -> dict[str, float]:
        """One optimizer step over ``train.grad_accum`` micro-batches; returns metrics."""
        cfg, timer = self.cfg, self.timer
        seed = step_seed(cfg.train.seed, self.step, self.info.rank)
        torch.manual_seed(seed)
        generator = torch.Generator(self.device).manual_seed(seed)
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        data_wait, num_images = 0.0, 0
        accum = cfg.train.grad_accum
        for micro in range(accum):
            start = time.perf_counter()
            with timer("data_wait"):
                batch = next(batches).to(self.device, non_blocking=True)
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
            finite = self._finish_step(totals["loss"])
        lr_used = cfg.optim.lr * lr_factor(self.step, cfg.optim)  # base lr of this step
        self.scheduler.step()
        self.step += 1
        out = {f"loss/{k.removeprefix('loss_')}" if k != "loss" else "loss/total": v for k, v in totals.items()}
        out.update({"lr": lr_used, "data/wait_s": data_wait,
                    "data/images": num_images, "nonfinite/total": self.nonfinite_total,
                    "nonfinite/skipped": float(not finite)})
        return out

    def _finish_step(self, loss: float) -> bool:
        """Clip, agree across ranks that the step is finite, then update or skip."""
        params = [p for p in self.sam.parameters() if p.grad is not None]
        grad_norm = torch.tensor(0.0)
        if self.cfg.train.grad_clip > 0 and params:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip)
        local_ok = bool(torch.isfinite(torch.tensor(loss))) and bool(torch.isfinite(grad_norm))
        if dist.all_agree(local_ok):
            self.optimizer.step()
            self.nonfinite_streak = 0
            return True
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_total += 1
        self.nonfinite_streak += 1
        log.warning("step %d: non-finite loss or gradient on some rank; update skipped "
                    "(%d in a row, %d in total)", self.step, self.nonfinite_streak, self.nonfinite_total)
        if self.nonfinite_streak >= max(self.cfg.train.max_nonfinite_steps, 1):
            raise NonFiniteLossError(
                f"loss non-finite for {self.nonfinite_streak} consecutive steps (train.max_nonfinite_steps="
                f"{self.cfg.train.max_nonfinite_steps}); stopping. The last good checkpoint is kept "
                f"under {self.ckpt.url}")
        return False

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> EvalResult | None:
        """mIoU on ``eval.shards`` (rank 0 evaluates, the others wait)."""
        cfg = self.cfg
        if not cfg.eval.shards:
            return None
        result = None
        if self.info.is_main:
            data_cfg = dataclasses.replace(cfg.data, shards=",".join(cfg.eval.shards), batch_size=cfg.eval.batch_size,
                                           num_workers=0, lsj=False, hflip=False)
            loader = build_loader(data_cfg, rank=0, world_size=1)
            result = evaluate(self.sam, iter(loader), cfg.eval.num_images, self.device)
            miou = result.miou()
            self.metrics.event(self.step, {f"eval/{k}": v for k, v in miou.items()} | {"eval/masks": result.num_masks},
                               "eval step %d: " % self.step + ", ".join(f"{k} mIoU {v:.3f}" for k, v in miou.items())
                               + f" ({result.num_masks} masks, {result.num_images} images)")
        dist.barrier()
        return result

    # ------------------------------------------------------------------ the loop

    def run(self, shutdown: dist.GracefulShutdown) -> int:
        """Train to ``optim.max_iters``; returns the process exit code."""
        cfg, max_iters = self.cfg, self.cfg.optim.max_iters
        self.resume()
        global_batch = cfg.data.batch_size * self.info.world_size * cfg.train.grad_accum
        log.info("global batch %d images = %d per rank x %d ranks x %d accumulation; up to %d masks per image; "
                 "%d rounds per mask; device %s, amp %s", global_batch, cfg.data.batch_size, self.info.world_size,
                 cfg.train.grad_accum, cfg.data.max_masks_per_image, cfg.prompts.num_rounds, self.device,
                 self.amp_dtype or "off")
        batches = iter(self.loader)
        window_start, window_images, window_wait = time.perf_counter(), 0, 0.0
        run_start, start_step = time.perf_counter(), self.step
        saved_at = -1
        while self.step < max_iters:
            values = self.train_step(batches)
            window_images += values["data/images"] * self.info.world_size
            window_wait += values["data/wait_s"]
            if self.step % cfg.train.log_every == 0 or self.step == max_iters:
                elapsed = time.perf_counter() - window_start
                values["time/images_per_s"] = window_images / max(elapsed, 1e-9)
                values["time/data_share"] = window_wait / max(elapsed, 1e-9)
                values.update({f"data/skipped_{k}": v for k, v in self.loader.skip_counts().items()})
                per_step = (time.perf_counter() - run_start) / max(self.step - start_step, 1)
                self.metrics.train(self.step, max_iters, values, per_step * (max_iters - self.step))
                window_start, window_images, window_wait = time.perf_counter(), 0, 0.0
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                self.save()
                saved_at = self.step
            if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < max_iters:
                self.evaluate()
            if shutdown.agree():
                if saved_at != self.step:
                    self.save()
                log.warning("%s received: checkpoint at step %d written; exiting %d so the job restarts",
                            shutdown.signal_name or "shutdown signal on another rank", self.step,
                            dist.ExitCode.PREEMPTED)
                return dist.ExitCode.PREEMPTED
        if saved_at != self.step:
            self.save()
        if cfg.eval.at_end:
            self.evaluate()
        log.info("training finished at step %d; checkpoints under %s", self.step, self.ckpt.url)
        return dist.ExitCode.OK


def train(cfg: Config, profile: bool = False) -> int:
    """Run training in this process (one rank of a torchrun job, or alone)."""
    info = dist.init_distributed(cfg.train.device)
    dist.setup_logging(info.rank, cfg.log.level, cfg.log.format)
    try:
        run = TrainRun(cfg, info, profile=profile)
        if info.is_main:
            log.info("resolved config:\n%s", dump_toml(cfg))
        with dist.GracefulShutdown() as shutdown:
            return run.run(shutdown)
    except NonFiniteLossError as err:
        log.error("%s", err)
        return dist.ExitCode.NONFINITE
    finally:
        dist.destroy()
