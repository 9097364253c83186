"""Fast checks of the image-test helpers (no Docker needed)."""

from __future__ import annotations

import pytest

from . import docker_env


def test_missing_docker_skips_locally_and_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(docker_env.shutil, "which", lambda name: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="docker.io"):
        docker_env.ensure_engine()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI: needs the `docker` client"):
        docker_env.ensure_engine()


def test_wheelhouse_holds_cpu_torch_runtime_deps_extras_and_build_backend() -> None:
    reqs = docker_env.wheelhouse_requirements()
    assert reqs[0] == docker_env.TORCH_SPEC == "torch==2.13.0"
    names = {r.split(">")[0].split("=")[0].split("[")[0] for r in reqs}
    assert {"numpy", "gcsfs", "s3fs", "setuptools", "wheel", "prometheus-client"} <= names
    assert "pytest" not in names  # the test extra is not in the image
    assert len(reqs) == len(set(reqs))
