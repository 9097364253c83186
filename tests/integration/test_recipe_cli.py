"""The paper presets through the real entry point: image-encoder initialisation is required."""

from __future__ import annotations

import sys

from tests.integration.helpers import run


def test_paper_preset_without_encoder_init_exits_2_naming_it(tmp_path) -> None:
    """`--config vit_h --set data.shards=...` alone is not the paper's recipe (point 15)."""
    proc = run([sys.executable, "-m", "trainer.train", "--config", "vit_h",
                "--set", "data.shards=gs://bucket/sa1b/sa_*.tar", "--set", f"train.run_dir={tmp_path}"],
               timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model.encoder_init: required" in proc.stderr
    for choice in ("'mae'", "'sam'", "'random'", "model.mae_checkpoint", "model.init_checkpoint"):
        assert choice in proc.stderr, choice
