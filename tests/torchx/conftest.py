"""Fixtures of the TorchX tests: the venv's ``torchx`` command, synthetic shards, a fake API server.

Nothing here imports torchx: this file is loaded in every environment, and the test modules
decide (``tests.torchx.require_torchx``) whether they run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterator

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPONENT_FILE = REPO_ROOT / "trainer" / "launch" / "torchx_component.py"
#: The venv's scripts (``torchx``, ``python``): local_cwd starts ``python`` from PATH, which must
#: be this environment's interpreter, not whatever comes first on the caller's PATH.
VENV_BIN = Path(sys.executable).parent
#: A short tiny_cpu run: 6 steps of 1 image with 4 masks per rank, no eval, one checkpoint at the end.
SHORT_RUN = ["data.batch_size=1", "data.max_masks_per_image=4", "data.num_workers=0", "optim.warmup_iters=2",
             "optim.milestones=4,5", "optim.max_iters=6", "checkpoint.every=0", "train.log_every=1",
             "eval.shards=", "log.format=text"]


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a ``torchx`` subprocess: the venv first on PATH, one thread per process."""
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1",
               SAM_LOG_FORMAT="text", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def torchx_cli() -> str:
    """The ``torchx`` command of this environment (a failure if the torchx extra did not install it)."""
    path = VENV_BIN / "torchx"
    if not path.exists():
        pytest.fail(f"{path} is missing: the torchx extra installs the `torchx` command into the venv")
    return str(path)


@pytest.fixture(scope="session")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Two synthetic SA-1B shards of 4 small images each; returns their glob."""
    from trainer.data.synth import write_synthetic_shards

    out = tmp_path_factory.mktemp("shards")
    write_synthetic_shards(str(out), num_images=8, num_shards=2, min_side=160, max_side=288, min_masks=3,
                           max_masks=8)
    return str(out / "sa_*.tar")


@pytest.fixture
def fake_api(tmp_path: Path) -> Iterator[tuple]:
    """``(server, kubeconfig)``: tests/launch/fake_apiserver.py on loopback, namespace ``ml``."""
    from tests.launch.fake_apiserver import FakeApiServer

    with FakeApiServer() as server:
        yield server, server.write_kubeconfig(tmp_path / "kubeconfig")
