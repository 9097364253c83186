"""``trainer.allocator``: the glibc mallopt settings apply here and are wired to the config."""

from __future__ import annotations

import platform

import pytest

from trainer import allocator
from trainer.config import TrainConfig


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallopt's knobs are glibc's; other libcs keep their defaults")
def test_retain_freed_memory_applies_on_glibc() -> None:
    assert allocator.retain_freed_memory() is True


def test_missing_mallopt_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_libc(*_args, **_kwargs):
        raise OSError("no such library")

    monkeypatch.setattr(allocator.ctypes, "CDLL", no_libc)
    assert allocator.retain_freed_memory() is False


def test_on_by_default_and_switchable() -> None:
    assert TrainConfig().cpu_retain_memory is True
    assert TrainConfig(cpu_retain_memory=False).cpu_retain_memory is False
