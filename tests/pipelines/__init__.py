"""Tests of the Kubeflow Pipelines v2 pipeline (``pipelines/``).

They run in their own environment, ``.venv-kfp`` (``make test-kfp``, which sets
``SAM_TEST_ENV=kfp``): kfp 2.17 pins urllib3 2.x and cannot share an environment with
torchx 0.7.0 (LAUNCH.md section 0). Each test module calls :func:`require_kfp` before
importing kfp: in another environment the module is skipped, in the kfp one a missing kfp
(or kfp-kubernetes) is a failure (a broken install must not pass as skipped).
"""

from __future__ import annotations

import os

import pytest

ENV_NAME = "kfp"
SKIP_REASON = "runs in .venv-kfp: make test-kfp"


def require_kfp() -> None:
    """Skip the calling test module unless kfp and kfp-kubernetes import; fail if this is the kfp env."""
    try:
        import kfp  # noqa: F401
        from kfp import kubernetes  # noqa: F401
    except ImportError as err:
        if os.environ.get("SAM_TEST_ENV") == ENV_NAME:
            pytest.fail(f"SAM_TEST_ENV={ENV_NAME} but kfp is not importable ({err}): the venv lacks the kfp "
                        f"extra (pip install -e '.[gcs,kfp,test]')", pytrace=False)
        pytest.skip(SKIP_REASON, allow_module_level=True)
