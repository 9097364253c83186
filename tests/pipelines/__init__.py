"""Tests of the Kubeflow Pipelines v2 pipeline (``pipelines/``).

They run in their own environment, ``.venv-kfp`` (``make test-kfp``, which sets
``SAM_TEST_ENV=kfp``): kfp 2.17 pins urllib3 2.x and cannot share an environment with
torchx 0.7.0 (LAUNCH.md section 0). Each test module calls :func:`require_kfp` before
importing kfp: in another environment the module is skipped, in the kfp one a missing kfp
(or kfp-kubernetes) is a failure (a broken install must not pass as skipped).
"""

from __future__ import annotations

from tests.conftest import require_test_env

ENV_NAME = "kfp"
SKIP_REASON = "runs in .venv-kfp: make test-kfp"


def require_kfp() -> None:
    """Skip the calling test module outside ``.venv-kfp``; fail there if kfp is missing."""
    require_test_env(ENV_NAME, ("kfp", "kfp.kubernetes"), "pip install -e '.[gcs,kfp,test]'")
