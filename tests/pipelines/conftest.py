"""Fixtures of the pipeline tests: synthetic SA-1B shards, tiny weights, a fake Kubernetes API.

Nothing here imports kfp: this file is loaded in every environment, and the test modules
decide (``tests.pipelines.require_kfp``) whether they run.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Iterator

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PRESETS_DIR = REPO_ROOT / "charts" / "sam-train" / "presets"


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """One thread per process on a shared CI machine: for the steps run as subprocesses
    (kfp.local, torchrun) and for those called in this process (torch read OMP_NUM_THREADS
    when it was imported, so set its pool directly)."""
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small synthetic SA-1B shards: ``train`` (8 images in 2 shards), ``eval`` (4 images, 1 shard)."""
    from trainer.data.synth import write_synthetic_shards

    root = tmp_path_factory.mktemp("shards")
    write_synthetic_shards(str(root / "train"), num_images=8, num_shards=2, seed=0, min_side=128, max_side=192)
    write_synthetic_shards(str(root / "eval"), num_images=4, num_shards=1, seed=7, min_side=128, max_side=192)
    return {"train": root / "train", "eval": root / "eval"}


@pytest.fixture(scope="session")
def bad_shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Unusable datasets: ``empty`` (a folder without shards), ``corrupt`` (a .tar of random
    bytes), ``broken_pairs`` (a real tar whose JSON files are not JSON)."""
    import numpy as np

    root = tmp_path_factory.mktemp("bad")
    (root / "empty").mkdir()
    (root / "corrupt").mkdir()
    (root / "corrupt" / "sa_000000.tar").write_bytes(np.random.default_rng(0).bytes(4096))
    (root / "broken_pairs").mkdir()
    with tarfile.open(root / "broken_pairs" / "sa_000000.tar", "w") as tar:
        for i in range(3):
            for name, data in ((f"sa_{i}.jpg", b"\xff\xd8 not really a jpeg"), (f"sa_{i}.json", b"{not json")):
                path = root / name
                path.write_bytes(data)
                tar.add(path, arcname=name)
    return {name: root / name for name in ("empty", "corrupt", "broken_pairs")}


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An official-format ``.pth`` of the tiny model with seeded random weights."""
    import torch

    from trainer.model import build_sam, export_official

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny.pth"
    export_official(build_sam("tiny"), str(path))
    return path


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator:
    """The fake Kubernetes API server of ``tests/launch`` (real HTTP, real ``kubernetes`` client),
    with ``$KUBECONFIG`` pointing at it (context namespace ``ml``) for this process and its children."""
    from tests.launch import require_kubernetes
    from tests.launch.fake_apiserver import FakeApiServer

    require_kubernetes()
    with FakeApiServer() as server:
        monkeypatch.setenv("KUBECONFIG", str(server.write_kubeconfig(tmp_path / "kubeconfig")))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        yield server


def preset_values_json() -> str:
    """The ``preset_values`` the compiled pipeline passes to its launch step."""
    from pipelines.sam_pipeline import chart_presets

    return json.dumps(chart_presets(PRESETS_DIR), sort_keys=True, separators=(",", ":"))
