"""Cheap checks of the benchmark suite (``benchmarks/``); nothing here is timed.

- The official-modules baseline computes the same loss and gradients as our engine's
  forward (``SamTrainModel``) on the same batch and prompts, so its timings compare the
  same mathematics.
- The scaling model's arithmetic (ring all-reduce, overlap, efficiency, parameter counts).
- The report writer on a small fake result (tables, failures, headline extraction).
"""

from __future__ import annotations

import contextlib
import sys
import types
from pathlib import Path

import pytest
import torch

from trainer import engine
from trainer.data import Batch
from trainer.loss import LossConfig
from trainer.model import build_sam
from trainer.model.build import spec_for
from trainer.optim import optim_preset
from trainer.prompts import PromptConfig, boxes_from_masks

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import baseline  # noqa: E402
import report  # noqa: E402
import scaling  # noqa: E402


def _disc_masks(size: int, centers: list[tuple[int, int, int]]) -> torch.Tensor:
    """M×S×S bool discs ``(cx, cy, r)``."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return torch.stack([(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r for cx, cy, r in centers])


def _batch(size: int = 256) -> Batch:
    """2 images, 3 and 2 masks (one padding row), the second image padded on the right."""
    gen = torch.Generator().manual_seed(0)
    masks = torch.zeros(2, 3, size, size, dtype=torch.bool)
    masks[0] = _disc_masks(size, [(60, 60, 30), (150, 120, 50), (200, 200, 20)])
    masks[1, :2] = _disc_masks(size, [(80, 100, 40), (140, 60, 25)])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    boxes = torch.zeros(2, 3, 4)
    boxes[valid] = boxes_from_masks(masks[valid])
    return Batch(images=torch.randn(2, 3, size, size, generator=gen), masks=masks, boxes=boxes, valid=valid,
                 input_sizes=torch.tensor([[size, size], [size, 200]]),
                 original_sizes=torch.tensor([[size, size], [size, 200]]), image_ids=[0, 1])


def _timer(_name: str) -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


@pytest.fixture(scope="module")
def setup(official_sam: types.ModuleType) -> dict:
    """Our tiny model, the 11-round prompts, and a baseline built from the same weights."""
    torch.manual_seed(0)
    sam = build_sam("tiny").train()
    prompts = PromptConfig(num_correction_points=8, num_no_point_rounds=2, prob_box=0.5)
    loss_cfg = LossConfig()
    base = baseline.BaselineStep.create(spec_for("tiny"), sam.state_dict(), prompts, loss_cfg,
                                        optim_preset("tiny"), None, torch.device("cpu"))
    return {"sam": sam, "prompts": prompts, "loss": loss_cfg, "base": base}


def _our_forward(setup: dict, batch: Batch, seed: int, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, list]:
    """Our engine's forward (``SamTrainModel``), recording each round's prompts."""
    recorded: list = []
    real = engine.simulate_interaction

    def spy(*args: object, **kwargs: object) -> list:
        rounds = real(*args, **kwargs)
        recorded.extend((r.point_coords, r.point_labels) for r in rounds)
        return rounds

    monkeypatch.setattr(engine, "simulate_interaction", spy)
    model = engine.SamTrainModel(setup["sam"], setup["prompts"], setup["loss"])
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    losses = model(batch, generator, batch.valid.sum().float(), None, _timer)
    return losses, recorded


def test_baseline_same_loss_and_gradients_as_our_step(setup: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    batch, seed = _batch(), 1234
    ours, prompts = _our_forward(setup, batch, seed, monkeypatch)
    assert len(prompts) == 11
    theirs = setup["base"].losses(batch, seed, replay=prompts)
    for key in ("loss", "loss_focal", "loss_dice", "loss_iou"):
        torch.testing.assert_close(theirs[key], ours[key], rtol=1e-5, atol=1e-6, msg=key)
    setup["sam"].zero_grad(set_to_none=True)
    setup["base"].official.zero_grad(set_to_none=True)
    ours["loss"].backward()
    theirs["loss"].backward()
    official = dict(setup["base"].official.named_parameters())
    compared = 0
    for name, p in setup["sam"].named_parameters():
        if p.grad is None:
            continue
        ref = official[name].grad
        assert ref is not None, f"{name}: no gradient in the baseline"
        tol = 1e-4 * max(1.0, p.grad.abs().max().item())
        assert (ref - p.grad).abs().max().item() <= tol, name
        compared += 1
    assert compared > 50  # encoder, prompt encoder and decoder all got gradients


def test_baseline_samples_the_same_first_round_prompts(setup: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without replay the baseline draws the same plan and round-1 prompts from the seed."""
    batch, seed = _batch(), 99
    _, prompts = _our_forward(setup, batch, seed, monkeypatch)
    seen: list = []
    real = baseline._decode_round

    def spy(*args: object) -> tuple:
        seen.append((args[4].clone(), args[5].clone()))
        return real(*args)

    monkeypatch.setattr(baseline, "_decode_round", spy)
    with torch.no_grad():
        setup["base"].losses(batch, seed)
    assert len(seen) == len(prompts)
    torch.testing.assert_close(seen[0][0], prompts[0][0])
    assert torch.equal(seen[0][1], prompts[0][1])


def test_baseline_step_updates_the_official_weights(setup: dict) -> None:
    before = setup["base"].official.mask_decoder.iou_token.weight.detach().clone()
    out = setup["base"].step(_batch(), seed=5)
    assert set(out) >= {"loss", "loss_focal", "loss_dice", "loss_iou"}
    assert not torch.equal(before, setup["base"].official.mask_decoder.iou_token.weight)
    assert {"encoder", "decoder_rounds", "loss", "backward", "optimizer"} <= set(setup["base"].timer.totals)


# ----------------------------------------------------------------------------- scaling model


def test_ring_allreduce_formula() -> None:
    assert scaling.allreduce_time(1e9, 1, 1e9) == 0.0
    # 2 (N-1)/N x bytes / bandwidth + 2 (N-1) hops of latency
    assert scaling.allreduce_time(1e9, 2, 1e9, hop_latency=0.0) == pytest.approx(1.0)
    assert scaling.allreduce_time(1e9, 256, 1e9, hop_latency=1e-5) == pytest.approx(2 * 255 / 256 + 510e-5)


def test_bandwidth_is_nvlink_in_a_node_and_the_fabric_across() -> None:
    system = scaling.System("x", "A100", nvlink_per_gpu=300e9, internode_per_node=50e9)
    assert scaling.ring_bandwidth(system, 1) == pytest.approx(300e9 * scaling.EFFICIENCY_OF_LINK)
    assert scaling.ring_bandwidth(system, 4) == pytest.approx(50e9 * scaling.EFFICIENCY_OF_LINK)


def test_overlap_hides_comm_behind_backward_except_the_last_bucket() -> None:
    assert scaling.exposed_comm(0.1, compute_s=1.0, last_bucket_s=0.01) == pytest.approx(0.01)
    # 0.9 s of all-reduce, 2/3 of 0.6 s hidden: 0.5 s shows, plus the last bucket
    assert scaling.exposed_comm(0.9, 0.6, 0.01, backward_share=2 / 3) == pytest.approx(0.51)
    assert scaling.scaling_efficiency(1.0, 0.25) == pytest.approx(0.8)


def test_gradient_bytes_and_parameter_counts() -> None:
    assert scaling.gradient_bytes(10, bf16=False) == 40
    assert scaling.gradient_bytes(10, bf16=True) == 20
    assert 93e6 < scaling.parameter_count("vit_b") < 95e6  # SAM ViT-B: 93.7M
    assert 635e6 < scaling.parameter_count("vit_h") < 643e6  # SAM ViT-H: 641M


def test_where_scaling_stops_finds_the_first_node_count_below_threshold() -> None:
    rows = [{"variant": "v", "system": "s", "compute": "c", "bf16": False, "nodes": n, "efficiency": e}
            for n, e in ((1, 1.0), (2, 0.95), (4, 0.85), (8, 0.7))]
    rows += [{"variant": "v", "system": "t", "compute": "c", "bf16": False, "nodes": 1, "efficiency": 0.99}]
    stops = scaling.where_scaling_stops(rows, threshold=0.9)
    assert stops[("v", "s", "c", False)] == 4
    assert stops[("v", "t", "c", False)] is None


# ----------------------------------------------------------------------------- report writer


def _fake_train_result() -> dict:
    return {"name": "tiny_cpu", "batch_size": 2, "max_masks": 8, "rounds": 4, "img_size": 256, "amp": "off",
            "ac": False, "threads": 1, "ours_s": 0.5, "baseline_s": 0.75, "ratio": 1.5, "images_per_s": 4.0,
            "achieved_tflops": 0.01, "encoder_mfu": None, "e2e_mfu": 0.123, "executed_fraction": 0.75,
            "loss_check": {"rel_diff": 0.0, "rel_diff_sampled": 1e-7},
            "ours_shares": {"encoder": 0.1, "backward": 0.5, "other": 0.4},
            "baseline_shares": {"encoder": 0.2, "other": 0.8},
            "top_ops": [("aten::mm", 12.5, 0.25)]}


def test_report_renders_tables_failures_and_headlines() -> None:
    results = {
        "train": {"tiny_cpu": {"ok": True, "value": _fake_train_result(), "seconds": 1.0},
                  "vit_b_256": {"ok": False, "error": "RuntimeError: boom", "seconds": 0.1}},
        "scripts": {"bench_metrics": {"ok": True, "value": "ratio on/off: 1.0042  (+0.42% overhead)", "seconds": 2.0}},
        "scaling": {"ok": True, "value": {
            "measured": {"t1_s": 0.5, "t2_s": 0.55, "efficiency": 0.5 / 0.55},
            "model": [{"variant": "vit_h", "bf16": True, "system": "H100 p5", "compute": "MFU 40%", "bytes": 1.28e9,
                       "compute_s": 0.065, "nodes": n, "efficiency": e} for n, e in ((1, 1.0), (32, 0.93))]}},
    }
    text = report.render(results, {"cpu": "test cpu", "torch": "x"}, "Benchmark report", "cmd")
    assert "| tiny_cpu |" in text and "**1.50x**" in text and "n/a (no peak known)" in text and "12.30%" in text
    assert "| 12.30% | 0.75 | 0.0e+00" in text  # end-to-end MFU, executed / model FLOPs, loss check
    assert "| vit_b_256 | FAILED: RuntimeError: boom |" in text
    assert "| bench_metrics | step ratio metrics on/off | 1.0042 |" in text
    assert "| 2 | 550.0 | 0.91 |" in text
    assert "| vit_h | bf16 1.28 GB | H100 p5 | MFU 40% (65 ms) | 1.00 | 0.93 |" in text
    assert "`aten::mm`" in text and "- cpu: test cpu" in text


def test_guarded_turns_a_failure_into_an_error_entry() -> None:
    assert report.guarded("ok", lambda: 3)["value"] == 3
    failed = report.guarded("bad", lambda: 1 / 0)
    assert failed["ok"] is False and failed["error"].startswith("ZeroDivisionError")


@pytest.mark.parametrize("row", ["loss", "upsample", "adjoint", "attention", "layer_norm", "upscaling", "few_tokens",
                                 "windowed_attention", "factored_round", "adamw", "allocator"])
def test_kernel_rows_run_and_agree(row: str) -> None:
    """Each ``bench_kernels`` row at its smallest size (AdamW and the allocator at their
    only one): it runs (a row that raises would break ``make bench``), times both
    sides and finds them equal to fp32 rounding (the allocator row compares times only)."""
    import bench_kernels  # noqa: PLC0415

    calls = {
        "loss": lambda: bench_kernels.bench_loss(1, masks=4, rounds=2),
        "upsample": lambda: bench_kernels.bench_upsample(1),
        "adjoint": lambda: bench_kernels.bench_adjoint(1),
        "attention": lambda: bench_kernels.bench_attention(1, 4, 64, 9, 32, 4),
        "layer_norm": lambda: bench_kernels.bench_layer_norm(1),
        "upscaling": lambda: bench_kernels.bench_upscaling(1, 8, 2),
        "few_tokens": lambda: bench_kernels.bench_few_tokens(1, 8, 2, 2),
        "windowed_attention": lambda: bench_kernels.bench_windowed_attention(1, 16),
        "factored_round": lambda: bench_kernels.bench_factored_round(1, 8, 2),
        "adamw": lambda: bench_kernels.bench_adamw(1),
        "allocator": lambda: bench_kernels.bench_allocator(1),
    }
    result = calls[row]()
    assert result["baseline_s"] > 0 and result["ours_s"] > 0
    assert result.get("max_abs_diff", 0.0) < 1e-4 and result.get("rel_diff", 0.0) < 1e-5


@pytest.mark.parametrize("row", ["few_tokens", "upscaling"])
def test_gpu_kernel_rows_code_path_under_cpu_bf16_autocast(row: str) -> None:
    """``bench_kernels --gpu`` runs these two rows on CUDA in bf16 (``make bench-gpu``); no
    GPU here, so their device/autocast path runs on CPU under bf16 autocast at a small size
    and both sides agree to bf16 rounding (outputs of magnitude ~1-10)."""
    import bench_kernels  # noqa: PLC0415

    call = {"few_tokens": lambda: bench_kernels.bench_few_tokens(1, 8, 2, 2, "cpu", amp=True),
            "upscaling": lambda: bench_kernels.bench_upscaling(1, 8, 2, "cpu", amp=True)}[row]
    result = call()
    assert result["baseline_s"] > 0 and result["ours_s"] > 0
    assert 0.0 < result["max_abs_diff"] < 0.25  # nonzero: bf16 really ran
