"""Build and run the trainer image with a local Docker engine, offline.

What the image tests need, in order (each step cached, each timed):

1. :func:`ensure_engine`: a usable Docker engine (``docker info``); as root with
   ``dockerd`` on PATH, one is started in the background and left running.
2. :func:`ensure_base_image`: a Debian bookworm base with Python 3.11 made by
   ``debootstrap`` and ``docker import`` (no registry can be reached to pull one).
3. :func:`ensure_wheelhouse`: every wheel the image installs, built on the host into
   ``.whl/`` at the repo root (the build context; gitignored), keyed by pyproject.toml.
4. :func:`build_image`: ``docker build`` of the repo's Dockerfile from that base with
   ``PIP_OFFLINE=1``, under ``--network none``, which proves the offline build.

Where a part cannot run (no docker client, not root, no debootstrap) the tests skip with
the reason; under CI (``CI=true``) they fail instead, as ``needs_binary`` in
tests/conftest.py does. Every subprocess has a timeout.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from tests.conftest import unavailable

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
#: The wheelhouse inside the build context (``/.whl/`` is in .gitignore; .dockerignore admits it).
WHEELHOUSE = REPO_ROOT / ".whl"
#: The CPU torch wheel (on our machines pip takes it from local disk).
TORCH_SPEC = "torch==2.13.0"
#: debootstrap's packages: the Python the Dockerfile's venv stage needs.
BASE_PACKAGES = "python3,python3-venv,python3-pip,ca-certificates"
BASE_SUITE = "bookworm"
DEBIAN_MIRROR = os.environ.get("SAM_DEBIAN_MIRROR", "http://deb.debian.org/debian")
IMAGE_TAG = "sam-train:cpu-test"
DOCKERD_LOG = Path("/tmp/sam-test-dockerd.log")
#: A CPU torch wheel is ~200 MB; a CUDA one is several GB.
MAX_TORCH_WHEEL_BYTES = 600 * 2**20

#: Seconds each stage took in this session (printed at the end of the session).
TIMINGS: dict[str, float] = {}


@contextlib.contextmanager
def timed(label: str) -> Iterator[None]:
    """Record, print (visible with ``pytest -s``) and log how long a stage took."""
    start = time.monotonic()
    try:
        yield
    finally:
        TIMINGS[label] = TIMINGS.get(label, 0.0) + time.monotonic() - start
        line = f"[image tests] {label}: {time.monotonic() - start:.1f} s"
        print(line, flush=True)
        log.info(line)


def run(cmd: Sequence[str], timeout: float, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` with captured text output and a timeout; ``check`` raises with the tail."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}\n"
                             f"stdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}")
    return proc


def docker(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``docker ARGS`` (captured, with a timeout)."""
    return run(["docker", *args], timeout=timeout, check=check)


# --------------------------------------------------------------------------- engine


def engine_ready() -> bool:
    """Whether ``docker info`` reaches a running engine."""
    try:
        proc = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and bool(proc.stdout.strip())


def _start_dockerd(timeout: float = 90) -> None:
    """Start ``dockerd`` detached (it outlives the test session), wait for its socket."""
    log_file = DOCKERD_LOG.open("ab")
    proc = subprocess.Popen(["dockerd"], stdin=subprocess.DEVNULL, stdout=log_file,
                            stderr=subprocess.STDOUT, start_new_session=True)
    log_file.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine_ready():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    tail = DOCKERD_LOG.read_text(errors="replace")[-2000:]
    unavailable(f"dockerd did not come up (exit {proc.poll()}); log {DOCKERD_LOG}:\n{tail}")


def ensure_engine() -> None:
    """Make sure a Docker engine answers; start ``dockerd`` as root when it is installed."""
    if shutil.which("docker") is None:
        unavailable("needs the `docker` client and engine (package docker.io; `make install-test` "
                    "installs it with apt as root)")
    if engine_ready():
        return
    if os.geteuid() != 0 or shutil.which("dockerd") is None:
        unavailable("no Docker engine answers `docker info`, and dockerd cannot be started here "
                    "(needs root and dockerd, package docker.io)")
    with timed("start dockerd"):
        _start_dockerd()


def build_env() -> dict[str, str]:
    """Environment for ``docker build``: the legacy builder where buildx is missing.

    A docker CLI >= 23 without the buildx plugin refuses ``DOCKER_BUILDKIT=1`` and warns
    otherwise; Debian's docker.io 20.10 CLI uses the legacy builder by default. An explicit
    ``DOCKER_BUILDKIT`` in the environment wins (the Dockerfile works with both).
    """
    env = dict(os.environ)
    if "DOCKER_BUILDKIT" not in env:
        buildx = subprocess.run(["docker", "buildx", "version"], capture_output=True, timeout=30)
        if buildx.returncode != 0:
            env["DOCKER_BUILDKIT"] = "0"
    return env


def buildkit_client() -> str | None:
    """A docker CLI that builds with BuildKit here, or None.

    With the buildx plugin any CLI does; without it only a CLI older than 23 (Debian's
    docker.io 20.10) has BuildKit built in (``DOCKER_BUILDKIT=1``).
    """
    for client in dict.fromkeys(c for c in (shutil.which("docker"), "/usr/bin/docker") if c and os.path.exists(c)):
        if subprocess.run([client, "buildx", "version"], capture_output=True, timeout=30).returncode == 0:
            return client
        proc = subprocess.run([client, "version", "--format", "{{.Client.Version}}"],
                              capture_output=True, text=True, timeout=30)
        major = proc.stdout.strip().split(".")[0]
        if major.isdigit() and int(major) < 23:
            return client
    return None


def image_exists(tag: str) -> bool:
    """Whether the engine has an image ``tag``."""
    return docker("image", "inspect", tag, check=False).returncode == 0


# --------------------------------------------------------------------------- base image


def base_image_tag() -> str:
    """Tag of the local base; changes when its recipe does (so a stale one is not reused)."""
    recipe = f"{BASE_SUITE} minbase {BASE_PACKAGES}"
    return f"sam-train-base:{BASE_SUITE}-{hashlib.sha256(recipe.encode()).hexdigest()[:10]}"


def _unmount_under(root: Path) -> None:
    """Lazily unmount anything debootstrap left mounted in ``root`` (after a kill)."""
    try:
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return
    for point in sorted((m for m in mounts if m.startswith(f"{root}/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)


def _import_rootfs(rootfs: Path, tag: str, timeout: float = 300) -> None:
    """``tar -C rootfs -c . | docker import - tag``, with the PATH a Debian image has."""
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "--exclude=./var/cache/apt/archives/*.deb",
                            "--exclude=./var/lib/apt/lists/*", "-c", "."], stdout=subprocess.PIPE)
    try:
        proc = subprocess.run(
            ["docker", "import",
             "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "--change", 'CMD ["/bin/bash"]', "-", tag],
            stdin=tar.stdout, capture_output=True, text=True, timeout=timeout)
    finally:
        assert tar.stdout is not None
        tar.stdout.close()
        tar.wait(timeout=60)
    if proc.returncode != 0 or tar.returncode != 0:
        raise AssertionError(f"docker import failed (tar {tar.returncode}, import {proc.returncode}): "
                             f"{proc.stderr[-2000:]}")


def ensure_base_image() -> str:
    """The bookworm + Python 3.11 base image's tag, made with debootstrap when missing."""
    tag = base_image_tag()
    if image_exists(tag):
        print(f"[image tests] base image {tag}: cached", flush=True)
        return tag
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        unavailable(f"the base image {tag} is missing and cannot be made here: needs root and "
                    "debootstrap (package debootstrap)")
    rootfs = Path(tempfile.mkdtemp(prefix="sam-rootfs-", dir="/var/tmp"))
    try:
        with timed("base image (debootstrap + docker import)"):
            proc = run(["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}",
                        BASE_SUITE, str(rootfs), DEBIAN_MIRROR], timeout=900, check=False)
            if proc.returncode != 0:
                unavailable(f"debootstrap {BASE_SUITE} from {DEBIAN_MIRROR} failed "
                            f"(exit {proc.returncode}): {(proc.stdout + proc.stderr)[-1500:]}")
            _import_rootfs(rootfs, tag)
    finally:
        _unmount_under(rootfs)
        shutil.rmtree(rootfs, ignore_errors=True)
    return tag


# --------------------------------------------------------------------------- wheelhouse


def _pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def wheelhouse_requirements() -> list[str]:
    """What the offline build installs: torch, the runtime deps with extras gcs and s3,
    and the build backend (pip builds the project's wheel in an isolated env)."""
    project = _pyproject()
    extras = project["project"].get("optional-dependencies", {})
    reqs = [TORCH_SPEC, *project["project"]["dependencies"], *extras.get("gcs", []),
            *extras.get("s3", []), *project["build-system"]["requires"], "wheel"]
    return list(dict.fromkeys(reqs))


def wheelhouse_key() -> str:
    """Cache key: the requirements (from pyproject.toml) and the host's Python ABI."""
    text = "\n".join([*wheelhouse_requirements(), sys.implementation.cache_tag, sys.platform])
    return hashlib.sha256(text.encode()).hexdigest()


def _check_torch_wheel(folder: Path) -> Path:
    wheels = sorted(folder.glob("torch-*.whl"))
    assert len(wheels) == 1, f"expected one torch wheel in {folder}, found {[w.name for w in wheels]}"
    wheel = wheels[0]
    size = wheel.stat().st_size
    assert "+cpu" in wheel.name and size < MAX_TORCH_WHEEL_BYTES, (
        f"{wheel.name} ({size / 2**20:.0f} MiB) is not the CPU build of {TORCH_SPEC}: "
        "pip would put a multi-GB CUDA torch into the test image")
    return wheel


def ensure_wheelhouse() -> Path:
    """``.whl/`` with every wheel the offline image build needs (cached by :func:`wheelhouse_key`)."""
    if sys.version_info[:2] != (3, 11):
        unavailable(f"the wheelhouse is built with the host's pip for bookworm's Python 3.11; "
                    f"this is Python {sys.version_info.major}.{sys.version_info.minor}")
    key = wheelhouse_key()
    marker = WHEELHOUSE / ".key"
    if marker.exists() and marker.read_text().strip() == key:
        _check_torch_wheel(WHEELHOUSE)
        print(f"[image tests] wheelhouse {WHEELHOUSE}: cached", flush=True)
        return WHEELHOUSE
    staging = WHEELHOUSE / ".staging"
    with timed("wheelhouse (pip wheel on the host)"):
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            run([sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(staging),
                 *wheelhouse_requirements()], timeout=1800)
            _check_torch_wheel(staging)
            for old in WHEELHOUSE.iterdir():
                if old != staging:
                    old.unlink() if old.is_file() else shutil.rmtree(old)
            for wheel in staging.iterdir():
                wheel.rename(WHEELHOUSE / wheel.name)
            marker.write_text(key + "\n")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    total = sum(p.stat().st_size for p in WHEELHOUSE.glob("*.whl"))
    print(f"[image tests] wheelhouse: {len(list(WHEELHOUSE.glob('*.whl')))} wheels, "
          f"{total / 2**20:.0f} MiB", flush=True)
    return WHEELHOUSE


# --------------------------------------------------------------------------- image


def _revision() -> str:
    try:
        proc = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def build_args(base: str) -> dict[str, str]:
    """The ``--build-arg`` values of the offline CPU test image."""
    return {"BASE_IMAGE": base, "PIP_OFFLINE": "1", "TORCH_SPEC": TORCH_SPEC,
            "VERSION": _pyproject()["project"]["version"], "REVISION": _revision()}


def build_image(base: str, tag: str = IMAGE_TAG, log_path: Path | None = None, timeout: float = 1500) -> str:
    """``docker build`` the repo's Dockerfile offline (``--network none``); returns ``tag``."""
    cmd = ["docker", "build", "--network", "none", "-t", tag, "-f", str(REPO_ROOT / "Dockerfile")]
    for name, value in build_args(base).items():
        cmd += ["--build-arg", f"{name}={value}"]
    env = build_env()
    previous = _image_id(tag)
    with timed(f"docker build (DOCKER_BUILDKIT={env.get('DOCKER_BUILDKIT', 'default')})"):
        proc = subprocess.run([*cmd, str(REPO_ROOT)], capture_output=True, text=True, timeout=timeout, env=env)
    output = proc.stdout + proc.stderr
    if log_path is not None:
        log_path.write_text(output)
    assert proc.returncode == 0, f"docker build failed ({proc.returncode}):\n{output[-6000:]}"
    if previous and previous != _image_id(tag):
        # The replaced image (1.5 GB) would stay behind untagged after every code change.
        docker("rmi", previous, check=False)
    return tag


def _image_id(tag: str) -> str | None:
    proc = docker("image", "inspect", "-f", "{{.Id}}", tag, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


# --------------------------------------------------------------------------- containers


@dataclass
class Container:
    """One ``docker run -d`` container, named so teardown can always remove it."""

    name: str
    image: str
    env: dict[str, str] = field(default_factory=dict)
    volumes: list[str] = field(default_factory=list)
    network: str = "host"
    extra: list[str] = field(default_factory=list)
    started_at: float = 0.0

    def start(self, *cmd: str) -> None:
        """Start detached; no ``cmd`` keeps the image's default command, as a pod would."""
        args = ["run", "-d", "--name", self.name, "--network", self.network, *self.extra]
        for key, value in self.env.items():
            args += ["-e", f"{key}={value}"]
        for volume in self.volumes:
            args += ["-v", volume]
        docker(*args, self.image, *cmd, timeout=60)
        self.started_at = time.monotonic()

    def wait(self, timeout: float) -> int:
        """The container's exit code; AssertionError with its logs after ``timeout``."""
        try:
            proc = docker("wait", self.name, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {timeout:.0f} s\n{self.logs()[-4000:]}") from None
        return int(proc.stdout.strip().splitlines()[-1])

    def running(self) -> bool:
        """Whether the container is still running."""
        proc = docker("inspect", "-f", "{{.State.Running}}", self.name, check=False)
        return proc.stdout.strip() == "true"

    def logs(self) -> str:
        """stdout and stderr so far (interleaving between the two is not exact)."""
        proc = docker("logs", self.name, timeout=60, check=False)
        return proc.stdout + proc.stderr

    def kill(self, signal: str) -> None:
        """``docker kill --signal SIGNAL`` (what the kubelet sends on a drain is TERM)."""
        docker("kill", "--signal", signal, self.name, timeout=30)

    def remove(self) -> None:
        """``docker rm -f`` (no error when it is already gone)."""
        docker("rm", "-f", self.name, timeout=60, check=False)


def container_run(image: str, *cmd: str, timeout: float = 120, network: str = "none",
                  extra: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """``docker run --rm`` a short command (no network by default)."""
    return docker("run", "--rm", "--network", network, *extra, image, *cmd, timeout=timeout, check=False)
