# The trainer image: sam-k8s-trainer[gcs,s3] on a PyTorch base, run as a PyTorchJob pod.
#
# GPU image (A100/H100; the base brings CUDA torch and Python 3.11, which is NOT reinstalled):
#   docker build -t sam-train:0.1.0 \
#     --build-arg VERSION=0.1.0 --build-arg REVISION=$(git rev-parse HEAD) .
#
# CPU image (kind, laptops, CI; a slim Python base plus the CPU torch wheel):
#   docker build -t sam-train:cpu \
#     --build-arg BASE_IMAGE=python:3.11-slim \
#     --build-arg TORCH_SPEC=torch==2.13.0 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#
# Offline (no PyPI inside `docker build`): put every wheel the install needs in .whl/ at the
# repo root (torch, the runtime dependencies with extras gcs,s3, setuptools>=68 and wheel for
# the project's build backend), then add --build-arg PIP_OFFLINE=1. tests/image/docker_env.py
# builds such a wheelhouse on the host (`pip wheel`) and the CPU image from a local base:
#   docker build -t sam-train:cpu-test --build-arg BASE_IMAGE=<local bookworm base> \
#     --build-arg PIP_OFFLINE=1 --build-arg TORCH_SPEC=torch==2.13.0 .
# Without PIP_OFFLINE the wheelhouse is ignored (and may be absent) and pip uses PyPI.
#
# Nothing here needs a GPU. Works with the legacy builder and with BuildKit; no `# syntax`
# line, so BuildKit uses its built-in frontend (no registry needed).
#
# Stages: `pip` holds the wheelhouse and an empty venv; `wheel` builds the project's wheel;
# `venv` installs torch, the dependencies, then the wheel with its extras into /opt/venv;
# `runtime` is the base plus that venv and a non-root user. The wheelhouse, the source
# tree, pip's cache and build tools stay in the discarded stages.
# The default command is the Helm chart's pod command; the chart sets `command:` itself.

ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime

# --------------------------------------------------------------------------- pip
# What the two build stages share: the optional wheelhouse and an empty venv.
FROM ${BASE_IMAGE} AS pip
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
# The wheelhouse is optional: README.md always matches, so the legacy builder accepts a
# `.whl*` that matches nothing (it fails only when no source at all matches), and BuildKit
# allows an empty wildcard. A matched directory is copied by its contents.
COPY README.md .whl* /wheelhouse/
# A venv keeps pip away from the base's packages (Debian's Python refuses system installs,
# PEP 668); --system-site-packages lets it see a PyTorch base's torch.
RUN python3 -m venv --system-site-packages /opt/venv

# --------------------------------------------------------------------------- wheel
FROM pip AS wheel
ARG PIP_OFFLINE=0
COPY pyproject.toml README.md /src/
COPY trainer /src/trainer
# The build backend (setuptools) comes from the wheelhouse when offline.
RUN set -e; \
    if [ "$PIP_OFFLINE" = 1 ]; then set -- --no-index --find-links /wheelhouse; else set --; fi; \
    /opt/venv/bin/pip wheel "$@" --no-deps --wheel-dir /dist /src; \
    ls -l /dist

# --------------------------------------------------------------------------- requirements
# The runtime dependencies with extras gcs and s3, read from pyproject.toml (tomllib: Python
# >= 3.11; on an older base the list stays empty and they come with the wheel below).
FROM ${BASE_IMAGE} AS requirements
# The package extras to install, comma-separated: gcs,s3 for training; add kfp for the image
# the Kubeflow Pipelines steps run on (pipelines/: `--build-arg EXTRAS=gcs,s3,kfp`).
ARG EXTRAS=gcs,s3
COPY pyproject.toml /src/
RUN if ! EXTRAS="$EXTRAS" python3 -c 'import os, tomllib; p = tomllib.load(open("/src/pyproject.toml", "rb"))["project"]; x = p.get("optional-dependencies", {}); print("\n".join(p["dependencies"] + [d for e in os.environ["EXTRAS"].split(",") if e for d in x[e]]))' > /requirements.txt; \
    then : > /requirements.txt; fi; cat /requirements.txt

# --------------------------------------------------------------------------- venv
FROM pip AS venv
ARG PIP_OFFLINE=0
ARG EXTRAS=gcs,s3
# Empty: keep the base's torch (GPU bases). Else a pip requirement such as torch==2.13.0,
# from TORCH_INDEX_URL when set (e.g. https://download.pytorch.org/whl/cpu).
ARG TORCH_SPEC=
ARG TORCH_INDEX_URL=
RUN set -e; \
    if [ "$PIP_OFFLINE" = 1 ]; then set -- --no-index --find-links /wheelhouse; \
    elif [ -n "$TORCH_INDEX_URL" ]; then set -- --index-url "$TORCH_INDEX_URL"; else set --; fi; \
    if [ -n "$TORCH_SPEC" ]; then /opt/venv/bin/pip install "$@" "$TORCH_SPEC"; fi; \
    if ! /opt/venv/bin/python -c "import torch"; then \
      echo "error: no torch in the base image and TORCH_SPEC is empty (pip would pull a multi-GB" \
           "CUDA build): use a PyTorch base or --build-arg TORCH_SPEC=torch==X.Y.Z" >&2; exit 1; fi; \
    /opt/venv/bin/python -c "import torch; print(torch.__version__)" > /opt/torch-version
# The dependencies first, so that a change to the code (or to pyproject.toml outside the
# runtime dependencies) rebuilds only the layers below: the `requirements` stage extracts
# them, and this COPY is cached while that list is unchanged.
COPY --from=requirements /requirements.txt /src/requirements.txt
RUN set -e; \
    if [ "$PIP_OFFLINE" = 1 ]; then set -- --no-index --find-links /wheelhouse; else set --; fi; \
    if [ -s /src/requirements.txt ]; then /opt/venv/bin/pip install "$@" -r /src/requirements.txt; fi
# The wheel with its extras (EXTRAS); torch must stay the one chosen above.
COPY --from=wheel /dist /dist
RUN set -e; \
    if [ "$PIP_OFFLINE" = 1 ]; then set -- --no-index --find-links /wheelhouse; else set --; fi; \
    /opt/venv/bin/pip install "$@" "$(ls /dist/sam_k8s_trainer-*.whl)[$EXTRAS]"; \
    before=$(cat /opt/torch-version); after=$(/opt/venv/bin/python -c "import torch; print(torch.__version__)"); \
    if [ "$before" != "$after" ]; then echo "error: installing the trainer replaced torch $before by $after" >&2; exit 1; fi; \
    echo "torch $after"; \
    /opt/venv/bin/pip check || echo "warning: pip check reports conflicts (see above)" >&2

# --------------------------------------------------------------------------- runtime
FROM ${BASE_IMAGE} AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="sam-k8s-trainer" \
      org.opencontainers.image.description="Train Segment Anything (SAM) from scratch: PyTorch DDP trainer for Kubernetes (PyTorchJob, KFP, TorchX)." \
      org.opencontainers.image.source="https://github.com/sam-k8s/sam-k8s-trainer" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
# Fixed UID/GID 1000 so runAsUser/fsGroup in the chart can name them; a base that already
# has a user or group 1000 (e.g. ubuntu:24.04's `ubuntu`) gives it up first.
RUN set -e; \
    old=$(getent passwd 1000 | cut -d: -f1); if [ -n "$old" ] && [ "$old" != sam ]; then userdel -r "$old" 2>/dev/null || userdel "$old"; fi; \
    old=$(getent group 1000 | cut -d: -f1); if [ -n "$old" ] && [ "$old" != sam ]; then groupdel "$old"; fi; \
    groupadd --gid 1000 sam; \
    useradd --uid 1000 --gid 1000 --create-home --home-dir /home/sam --shell /bin/sh sam; \
    mkdir -p /home/sam/work /home/sam/.cache/matplotlib; \
    chown -R 1000:1000 /home/sam
COPY --from=venv /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH} \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    SAM_LOG_FORMAT=json \
    HOME=/home/sam \
    MPLCONFIGDIR=/home/sam/.cache/matplotlib
# Numeric, so the kubelet can check runAsNonRoot without reading /etc/passwd.
USER 1000:1000
WORKDIR /home/sam/work
# The operator's PET_* variables feed torchrun (trainer.dist): no rendezvous flags here.
CMD ["python", "-m", "trainer.dist", "-m", "trainer.train", "--config", "/etc/sam-train/config.toml"]
