"""Fixtures for the image tests: the built image, a bucket with shards, 2-node jobs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from .docker_env import TIMINGS, build_image, ensure_base_image, ensure_engine, ensure_wheelhouse, timed
from .jobs import SHARDS_BUCKET, TwoNodeJob


@pytest.fixture(scope="session")
def base_image() -> str:
    """A running engine and the local bookworm + Python 3.11 base image (tag)."""
    ensure_engine()
    return ensure_base_image()


@pytest.fixture(scope="session")
def image(base_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The CPU trainer image built offline from the repo's Dockerfile (tag)."""
    with timed("image ready (wheelhouse + build)"):
        ensure_wheelhouse()
        tag = build_image(base_image, log_path=tmp_path_factory.mktemp("docker-build") / "build.log")
    yield tag
    summary = ", ".join(f"{label} {seconds:.1f} s" for label, seconds in TIMINGS.items())
    print(f"\n[image tests] timings: {summary}", flush=True)


@pytest.fixture(scope="session")
def shards_url(gcs_server) -> str:
    """Two synthetic SA-1B shards in a fake-gcs-server bucket, written by ``sam-train synth``."""
    bucket = gcs_server.bucket(SHARDS_BUCKET)
    with timed("synth shards to gs://"):
        proc = subprocess.run(
            [sys.executable, "-m", "trainer", "synth", "--out", f"{bucket}/shards", "--images", "8",
             "--shards", "2", "--min-side", "160", "--max-side", "288", "--min-masks", "3", "--max-masks", "8"],
            capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return f"{bucket}/shards/sa_*.tar"


@pytest.fixture
def job(image: str, gcs_server, shards_url: str, tmp_path: Path) -> Iterator[TwoNodeJob]:
    """A Master + Worker pair of containers; removed (``docker rm -f``) after the test."""
    job = TwoNodeJob(image=image, emulator_url=gcs_server.url, shards=shards_url, workdir=tmp_path)
    try:
        yield job
    finally:
        job.remove()
