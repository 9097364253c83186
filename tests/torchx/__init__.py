"""Tests of the TorchX component and the ``pytorchjob`` TorchX scheduler.

They run in their own environment, ``.venv-torchx`` (``make test-torchx``, which sets
``SAM_TEST_ENV=torchx``): torchx 0.7.0 pins ``urllib3<1.27`` and cannot share an environment
with kfp 2.17 (LAUNCH.md section 0). Each test module calls :func:`require_torchx` before
importing torchx: in another environment the module is skipped, in the torchx one a missing
torchx is a failure (a broken install must not pass as skipped).
"""

from __future__ import annotations

from tests.conftest import require_test_env

ENV_NAME = "torchx"
SKIP_REASON = "runs in .venv-torchx: make test-torchx"


def require_torchx() -> None:
    """Skip the calling test module outside ``.venv-torchx``; fail there if torchx is missing."""
    require_test_env(ENV_NAME, ("torchx",), "pip install -e '.[gcs,torchx,test]'")
