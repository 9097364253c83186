"""The lightweight steps, run for real on local synthetic shards (their Python functions).

``component.python_func`` is the function KFP copies into the step's pod; calling it here runs
the same code on the same trainer library, with real KFP artifact objects (``Metrics``,
``Model``) pointing at temporary files. The whole pipeline under ``kfp.local`` is in
``test_local_pipeline.py``.
"""

from __future__ import annotations

import io
import re
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest

from tests.pipelines import require_kfp

require_kfp()

from kfp.dsl import Metrics, Model  # noqa: E402

from pipelines.components import evaluate, export, validate_dataset  # noqa: E402

MIOU_KEYS = ("point1_conf", "point1_oracle", "point2", "point3", "point5", "point9", "box")


# --------------------------------------------------------------------------- validate


def test_validate_counts_shards_and_decodes_a_sample(shards: dict[str, Path]) -> None:
    out = validate_dataset.python_func(data_shards=str(shards["train"] / "sa_*.tar"))
    assert out.num_shards == 2
    assert re.search(r"sa_000000\.tar: sa_1: \d+x\d+ JPEG, \d+ masks decoded$", out.sample)


def test_validate_takes_the_trainers_list_forms(shards: dict[str, Path], tmp_path: Path) -> None:
    one, two = sorted(str(p) for p in shards["train"].glob("*.tar"))
    assert validate_dataset.python_func(data_shards=f"{one},{two},{one}").num_shards == 3
    listing = tmp_path / "shards.txt"
    listing.write_text(f"# training shards\n{one}\n\n{two}\n")
    assert validate_dataset.python_func(data_shards=str(listing)).num_shards == 2


@pytest.mark.parametrize("case, message", [
    ("empty", r"dataset check failed: data_shards: '.*/empty/\*\.tar' matched no files"),
    ("corrupt", r"dataset check failed: data_shards '.*/corrupt/\*\.tar': no readable SA-1B sample in the first "
                r"shard .*sa_000000\.tar: not_a_tar: the file does not start with a tar header"),
    ("broken_pairs", r"no readable SA-1B sample in the first shard .*sa_000000\.tar: sa_0: invalid_json: not JSON"),
])
def test_validate_fails_with_one_clear_line(bad_shards: dict[str, Path], case: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        validate_dataset.python_func(data_shards=str(bad_shards[case] / "*.tar"))
    assert "\n" not in str(err.value)


def test_validate_names_a_missing_listed_file(shards: dict[str, Path]) -> None:
    missing = shards["train"] / "sa_000009.tar"
    with pytest.raises(ValueError, match=rf"data_shards: '{re.escape(str(missing))}' does not exist"):
        validate_dataset.python_func(data_shards=f"{shards['train'] / 'sa_000000.tar'},{missing}")


def test_validate_passes_a_shard_whose_first_pair_is_bad(shards: dict[str, Path], bad_shards: dict[str, Path],
                                                         tmp_path: Path) -> None:
    """The trainer skips a bad sample; so does the check, as long as the shard has a good one."""
    import tarfile

    good = shards["train"] / "sa_000000.tar"
    mixed = tmp_path / "sa_000000.tar"
    with tarfile.open(bad_shards["broken_pairs"] / "sa_000000.tar") as bad, tarfile.open(good) as ok, \
            tarfile.open(mixed, "w") as out:
        for member in bad.getmembers()[:2]:  # sa_0.jpg + sa_0.json (not JSON)
            out.addfile(member, bad.extractfile(member))
        for member in ok.getmembers():
            out.addfile(member, ok.extractfile(member))
    log = io.StringIO()
    with redirect_stdout(log):
        result = validate_dataset.python_func(data_shards=str(mixed))
    assert result.num_shards == 1 and ": sa_1: " in result.sample
    assert "warning: skipped in the first shard: sa_0: invalid_json" in log.getvalue()


def test_validate_reads_object_storage(gcs_server: Any) -> None:
    """gs:// through gcsfs against fake-gcs-server (the emulator gcsfs's own CI uses)."""
    from trainer.data.synth import write_synthetic_shards

    bucket = gcs_server.bucket("pipeline-validate")
    write_synthetic_shards(f"{bucket}/sa1b", num_images=2, num_shards=2, min_side=64, max_side=96)
    out = validate_dataset.python_func(data_shards=f"{bucket}/sa1b/sa_*.tar")
    assert out.num_shards == 2 and out.sample.startswith(f"{bucket}/sa1b/sa_000000.tar: sa_1: ")
    with pytest.raises(ValueError, match=rf"data_shards: '{bucket}/nothing/sa_\*\.tar' matched no files"):
        validate_dataset.python_func(data_shards=f"{bucket}/nothing/sa_*.tar")


# --------------------------------------------------------------------------- evaluate


def _metrics(tmp_path: Path) -> Metrics:
    return Metrics(name="metrics", uri=str(tmp_path / "metrics"))


def test_evaluate_logs_every_miou_key_like_the_cli(shards: dict[str, Path], tiny_weights: Path,
                                                   tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The step is the trainer's evaluation: the same numbers as ``sam-train eval``."""
    from trainer.cli import main as cli

    eval_glob = str(shards["eval"] / "*.tar")
    metrics = _metrics(tmp_path)
    scored = evaluate.python_func(checkpoint_url=str(tiny_weights), eval_shards=eval_glob, eval_images=3,
                                  metrics=metrics, max_masks=4)
    assert scored == str(tiny_weights)
    logged = dict(metrics.metadata)
    assert set(MIOU_KEYS) <= set(logged)
    assert all(0.0 <= logged[k] <= 1.0 for k in MIOU_KEYS)
    assert logged["images"] == 3 and logged["masks"] > 0 and logged["skipped"] == 0
    assert logged["checkpoint"] == str(tiny_weights) and logged["variant"] == "tiny"

    capsys.readouterr()
    assert cli(["eval", "--checkpoint", str(tiny_weights), "--shards", eval_glob, "--num-images", "3",
                "--max-masks", "4"]) == 0
    printed = capsys.readouterr().out
    assert {k: f"{logged[k]:.4f}" for k in MIOU_KEYS} == dict(re.findall(r"^(\w+)\s+mIoU (\d\.\d{4})$", printed, re.M))
    assert f"({int(logged['masks'])} masks in 3 images)" in printed


def test_evaluate_scores_the_newest_complete_step(shards: dict[str, Path], tiny_weights: Path,
                                                  tmp_path: Path) -> None:
    """Given a checkpoint root, the newest complete step is scored and returned (for the export)."""
    from trainer.checkpoint import CheckpointManager
    from trainer.model import build_sam, read_state_dict

    root = tmp_path / "checkpoints"
    manager = CheckpointManager(str(root), keep_last=3)
    model = build_sam("tiny")
    model.load_state_dict(read_state_dict(str(tiny_weights)))
    for step in (5, 10):
        manager.save(step, {"model": model.state_dict()})
    (root / "step-00000015").mkdir()  # a save that never finished: no COMPLETE marker
    metrics = _metrics(tmp_path)
    scored = evaluate.python_func(checkpoint_url=str(root), eval_shards=str(shards["eval"] / "*.tar"),
                                  eval_images=1, metrics=metrics, max_masks=2)
    assert scored.rstrip("/").endswith("step-00000010")
    assert metrics.metadata["checkpoint"] == scored


def test_evaluate_fails_clearly(shards: dict[str, Path], tiny_weights: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError, match="no complete checkpoint under"):
        evaluate.python_func(checkpoint_url=str(tmp_path / "empty"), eval_shards=str(shards["eval"] / "*.tar"),
                             eval_images=1, metrics=_metrics(tmp_path))
    with pytest.raises(RuntimeError, match=r"evaluation of .*tiny\.pth: eval_shards: '.*/nothing/\*\.tar' matched no files"):
        evaluate.python_func(checkpoint_url=str(tiny_weights), eval_shards=str(tmp_path / "nothing" / "*.tar"),
                             eval_images=1, metrics=_metrics(tmp_path))


# --------------------------------------------------------------------------- export


def test_export_writes_the_official_state_dict(tiny_weights: Path, tmp_path: Path) -> None:
    import torch

    from trainer.model import build_sam, read_state_dict

    model_artifact = Model(name="model", uri=str(tmp_path / "model"))
    export.python_func(checkpoint_url=str(tiny_weights), model=model_artifact)
    written = torch.load(model_artifact.path, map_location="cpu", weights_only=True)
    expected = read_state_dict(str(tiny_weights))
    assert set(written) == set(expected)
    assert all(torch.equal(written[k], expected[k]) and written[k].dtype == torch.float32 for k in written)
    build_sam("tiny").load_state_dict(written, strict=True)  # a flat state_dict of the model
    assert model_artifact.metadata["variant"] == "tiny"
    assert model_artifact.metadata["official_registry"] is False  # tiny is ours, not segment_anything's
    assert model_artifact.metadata["source"] == str(tiny_weights)


def test_export_fails_without_a_complete_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    with pytest.raises(RuntimeError, match="no complete checkpoint under"):
        export.python_func(checkpoint_url=str(tmp_path / "run"), model=Model(name="m", uri=str(tmp_path / "m")))
