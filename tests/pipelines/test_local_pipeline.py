"""The whole pipeline under ``kfp.local`` (SubprocessRunner, no venv): every step for real.

What is swapped, and why: ``kfp.local`` runs each lightweight component as a local process
and has no Kubernetes cluster, so the launch step cannot create a PyTorchJob. The pipeline
is built with :func:`pipelines.components.train_local` in its place
(``sam_train_pipeline_local``): the same inputs, the same job objects built from them, and
instead of submitting them it writes the ConfigMap's ``config.toml`` and runs the training
container's command (``python -m trainer.dist --standalone --nproc-per-node 2 -m
trainer.train --config ...``: the tiny-cpu preset's 2 nodes x 1 process as 2 local gloo
processes). Validation, evaluation, export and the artifacts between steps are the real
ones; kfp-kubernetes settings and the GPU request are ignored by kfp.local (it warns). The
launch step itself is tested against a fake API server in ``test_launch.py``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.pipelines import require_kfp

require_kfp()

from kfp import local  # noqa: E402

from pipelines.sam_pipeline import sam_train_pipeline_local  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning",
                                        "ignore:Task 'evaluate'. settings:UserWarning")
#: A 4-step tiny-cpu run with a checkpoint at step 2 and 4, no in-training eval.
SHORT_RUN = ["training.config.optim.max_iters=4", "training.config.optim.warmup_iters=1",
             "training.config.optim.milestones={2,3}", "training.config.checkpoint.every=2",
             "training.config.data.num_workers=0", "training.config.metrics.final_scrape_wait_s=0"]
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture
def kfp_local(tmp_path: Path) -> Path:
    root = tmp_path / "pipeline-root"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    return root


def test_whole_pipeline_trains_evaluates_and_exports(kfp_local: Path, shards: dict[str, Path], tmp_path: Path,
                                                     capfd: pytest.CaptureFixture) -> None:
    import torch

    from trainer.model import build_sam

    run_dir = tmp_path / "run"
    run = sam_train_pipeline_local(data_shards=str(shards["train"] / "sa_*.tar"), run_dir=str(run_dir),
                                   eval_shards=str(shards["eval"] / "*.tar"), preset="tiny-cpu", set_values=SHORT_RUN,
                                   job_name="local-demo", eval_images=2, eval_max_masks=4)
    log = ANSI.sub("", capfd.readouterr().out)

    # validate (both specs), then the job's pod command as 2 local processes
    assert "dataset OK: " in log and log.count("dataset OK: ") == 2
    assert re.search(r"PyTorchJob local-demo-sam-train run locally \(2 node\(s\) x 1 process\(es\) as 2 local "
                     r"processes\): \S+ -m trainer\.dist --standalone --nproc-per-node=2 (\S+ )*-m trainer\.train "
                     r"--config \S+/config\.toml (\S+ )*--set metrics\.port=0\n", log)
    assert "global batch 2 images = 1 per rank x 2 ranks" in log
    steps = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert steps == ["step-00000002", "step-00000004"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 4

    # evaluate: the newest step, every mIoU key in the Metrics artifact
    metrics = run.outputs["metrics"]
    assert metrics.metadata["checkpoint"].endswith("step-00000004")
    for key in ("point1_conf", "point1_oracle", "point2", "point3", "point5", "point9", "box"):
        assert 0.0 <= metrics.metadata[key] <= 1.0, key
    assert metrics.metadata["images"] == 2
    for key in ("Task 'evaluate' finished with status SUCCESS", "Task 'export' finished with status SUCCESS"):
        assert key in log

    # export: the official state_dict of that step, in the Model artifact
    model = run.outputs["model"]
    assert model.metadata["source"] == metrics.metadata["checkpoint"] and model.metadata["variant"] == "tiny"
    state = torch.load(model.path, map_location="cpu", weights_only=True)
    build_sam("tiny").load_state_dict(state, strict=True)
    assert Path(model.path).is_relative_to(kfp_local)


@pytest.mark.parametrize("case, message", [
    ("empty", r"dataset check failed: data_shards: '.*/empty/\*\.tar' matched no files"),
    ("corrupt", r"dataset check failed: data_shards '.*/corrupt/\*\.tar': no readable SA-1B sample in the first "
                r"shard .*: not_a_tar: the file does not start with a tar header"),
])
def test_a_bad_dataset_fails_the_run_before_training(kfp_local: Path, shards: dict[str, Path],
                                                     bad_shards: dict[str, Path], tmp_path: Path, case: str,
                                                     message: str, capfd: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError) as err:
        sam_train_pipeline_local(data_shards=str(bad_shards[case] / "*.tar"), run_dir=str(run_dir),
                                 eval_shards=str(shards["eval"] / "*.tar"), preset="tiny-cpu", set_values=SHORT_RUN)
    assert "Inner task failed: 'validate-dataset'" in ANSI.sub("", str(err.value))
    log = ANSI.sub("", capfd.readouterr().out)
    assert re.search(f"ValueError: {message}", log), log[-2000:]
    assert "Task 'validate-dataset' finished with status FAILURE" in log
    assert "run locally" not in log and not run_dir.exists()  # nothing was trained


def test_bad_eval_shards_fail_before_training(kfp_local: Path, shards: dict[str, Path], bad_shards: dict[str, Path],
                                              tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    with pytest.raises(RuntimeError, match="validate-dataset-2"):
        sam_train_pipeline_local(data_shards=str(shards["train"] / "sa_*.tar"), run_dir=str(tmp_path / "run"),
                                 eval_shards=str(bad_shards["empty"] / "*.tar"), preset="tiny-cpu",
                                 set_values=SHORT_RUN)
    log = ANSI.sub("", capfd.readouterr().out)
    assert "matched no files" in log and "run locally" not in log
