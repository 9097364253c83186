"""Test helpers for ``trainer.launch``: a fake Kubernetes API server and recorded job histories."""

from __future__ import annotations

import importlib


from tests.conftest import unavailable


def require_kubernetes() -> None:
    """Skip where the ``kubernetes`` client (the ``launch`` extra) is missing; under CI, fail.

    ``make test`` installs the extra, so under CI a missing client is a broken install, not a reason to skip.
    """
    try:
        importlib.import_module("kubernetes")
    except ImportError as err:
        unavailable(f"needs the kubernetes client (the test and launch extras install it): {err}")
