"""A 2-node PyTorchJob imitated with two containers of the trainer image.

Master and Worker run the image's default command with exactly the environment the
Kubeflow training operator (kubeflow.org/v1, ``nprocPerNode: "1"``) injects
(../shared/LAUNCH.md §1), plus the variables the Helm chart sets. Both use the host's
network (the fake GCS server and the rendezvous are on loopback; ``127.0.0.1`` stands for
``<job>-master-0``), and each is pinned to its own CPU where there are two, as two nodes
would be. The config is mounted read-only at ``/etc/sam-train/config.toml`` like the chart's
ConfigMap.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import free_port

from .docker_env import Container

SHARDS_BUCKET = "sam-image"
#: Settings that make tiny_cpu quick (1 image of 4 masks per rank and step; cf. FAST in
#: tests/integration/helpers.py). The log format stays the image's (SAM_LOG_FORMAT=json).
FAST = {
    "data": {"batch_size": 1, "max_masks_per_image": 4, "num_workers": 0},
    "optim": {"warmup_iters": 2, "milestones": []},
    "train": {"log_every": 1},
    "eval": {"shards": []},
}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string is a JSON string for these values
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def config_toml(shards: str, run_dir: str, max_iters: int, every: int) -> str:
    """The ConfigMap's config.toml: tiny_cpu, gs:// shards and run dir, periodic checkpoints."""
    sections: dict[str, dict[str, Any]] = {name: dict(values) for name, values in FAST.items()}
    sections["data"]["shards"] = shards
    sections["optim"]["max_iters"] = max_iters
    sections["train"]["run_dir"] = run_dir
    sections["checkpoint"] = {"every": every}
    lines = ['preset = "tiny_cpu"']
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def pytorchjob_env(rank: int, port: int, emulator_url: str, run_name: str) -> dict[str, str]:
    """What a PyTorchJob's Master (rank 0) or Worker (rank 1) pod gets, with nprocPerNode 1."""
    operator = {
        "PYTHONUNBUFFERED": "1",
        "MASTER_ADDR": "127.0.0.1", "PET_MASTER_ADDR": "127.0.0.1",  # <job>-master-0 in a cluster
        "MASTER_PORT": str(port), "PET_MASTER_PORT": str(port),
        "WORLD_SIZE": "2", "RANK": str(rank), "PET_NODE_RANK": str(rank),
        "PET_NNODES": "2", "PET_NPROC_PER_NODE": "1",
    }
    chart = {
        "SAM_GCS_TOKEN": "anon", "STORAGE_EMULATOR_HOST": emulator_url,
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "SAM_RUN_NAME": run_name,
    }
    return {**operator, **chart}


def json_records(text: str) -> list[dict]:
    """The log lines that are JSON objects."""
    out = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def non_json_lines(text: str) -> list[str]:
    """The non-empty log lines that are not JSON objects."""
    bad = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            ok = isinstance(json.loads(line), dict)
        except ValueError:
            ok = False
        if not ok:
            bad.append(line)
    return bad


def _cpus() -> list[str]:
    cpus = sorted(os.sched_getaffinity(0))
    return [str(cpus[0]), str(cpus[1])] if len(cpus) >= 2 else []


@dataclass
class TwoNodeJob:
    """Master and Worker containers of one job; :meth:`start` may be called again (a restart)."""

    image: str
    emulator_url: str
    shards: str
    workdir: Path
    prefix: str = field(default_factory=lambda: f"sam-test-{uuid.uuid4().hex[:8]}")
    containers: list[Container] = field(default_factory=list)
    attempt: int = 0

    @property
    def master(self) -> Container:
        return self.containers[-2]

    @property
    def worker(self) -> Container:
        return self.containers[-1]

    def run_dir(self, name: str) -> str:
        return f"gs://{SHARDS_BUCKET}/runs/{self.prefix}-{name}"

    def start(self, run_dir: str, max_iters: int, every: int) -> None:
        """Start Master then Worker with the default command on a fresh rendezvous port."""
        self.attempt += 1
        config = self.workdir / f"config-{self.attempt}.toml"
        config.write_text(config_toml(self.shards, run_dir, max_iters, every))
        config.chmod(0o644)  # read by uid 1000 in the container
        port = free_port()
        cpus = _cpus()
        for rank, role in enumerate(("master", "worker")):
            extra = ["--cpuset-cpus", cpus[rank]] if cpus else []
            container = Container(
                name=f"{self.prefix}-{role}-{self.attempt}", image=self.image,
                env=pytorchjob_env(rank, port, self.emulator_url, run_name=self.prefix),
                volumes=[f"{config}:/etc/sam-train/config.toml:ro"], network="host", extra=extra)
            self.containers.append(container)
            container.start()

    def wait(self, timeout: float = 240) -> tuple[int, int]:
        """Exit codes of (Master, Worker) of the latest start."""
        deadline = time.monotonic() + timeout
        codes = []
        for container in (self.master, self.worker):
            codes.append(container.wait(max(1.0, deadline - time.monotonic())))
        return codes[0], codes[1]

    def logs(self) -> tuple[str, str]:
        """``docker logs`` of (Master, Worker) of the latest start."""
        return self.master.logs(), self.worker.logs()

    def describe(self) -> str:
        """Both containers' logs (tails), for assertion messages."""
        master, worker = self.logs()
        return (f"\n--- {self.master.name} ---\n{master[-6000:]}"
                f"\n--- {self.worker.name} ---\n{worker[-4000:]}")

    def progress_step(self) -> int:
        """The newest step in the Master's progress lines (0 before the first)."""
        steps = [r["step"] for r in json_records(self.master.logs())
                 if r.get("logger") == "trainer.metrics" and isinstance(r.get("step"), int)]
        return max(steps, default=0)

    def remove(self) -> None:
        """``docker rm -f`` every container this job started."""
        for container in self.containers:
            container.remove()
