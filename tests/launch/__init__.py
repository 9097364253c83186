"""Test helpers for ``trainer.launch``: a fake Kubernetes API server and recorded job histories."""

from __future__ import annotations

import importlib
import os

import pytest


def require_kubernetes() -> None:
    """Skip where the ``kubernetes`` client (the ``launch`` extra) is missing; under CI, fail.

    ``make test`` installs the extra, so under CI a missing client is a broken install, not a reason to skip.
    """
    try:
        importlib.import_module("kubernetes")
    except ImportError as err:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI: the kubernetes client is not importable although the launch extra installs it: {err}")
        pytest.skip(f"needs the kubernetes client (pip install -e '.[launch]'): {err}", allow_module_level=True)
