# Two commands do all the set-up on a fresh machine (Python 3.10+ with pip):
#   make demo   - install, then run the main job on embedded defaults
#   make test   - install with test extras, then run the whole test suite
PYTHON ?= python3
# CPU wheel for laptops and CI; GPU images bring their own CUDA build of torch.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-test install-system demo test test-torchx test-kfp bench bench-quick bench-gpu manifests e2e-kind pipeline

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -e ".[gcs,s3]"

install-test:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -e ".[gcs,s3,test]"
	@$(MAKE) --no-print-directory install-system

# System packages some tests need for real: Prometheus and promtool (the monitoring tests),
# Docker and debootstrap (the image tests build the trainer image and run it; no registry is
# needed: the base image is made locally), shellcheck (the kind e2e script). Installed with apt-get when it can run as root;
# elsewhere those tests skip, saying why (under CI=true they fail instead).
SYSTEM_TOOLS = prometheus:prometheus promtool:prometheus dockerd:docker.io debootstrap:debootstrap shellcheck:shellcheck g++:g++
install-system:
	@missing=""; for pair in $(SYSTEM_TOOLS); do \
	  tool=$${pair%%:*}; pkg=$${pair#*:}; \
	  command -v $$tool >/dev/null || case " $$missing " in *" $$pkg "*) ;; *) missing="$$missing $$pkg";; esac; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	else \
	  echo "note: missing$$missing and apt-get is not usable here: the tests that need them will skip"; \
	fi

demo: install
	$(PYTHON) -m trainer demo

test: install-test
	$(PYTHON) -m pytest -q
	@$(MAKE) --no-print-directory test-torchx test-kfp

# torchx 0.7.0 and kfp 2.17 cannot share an environment (urllib3 pins, LAUNCH.md section 0):
# each launch path is tested in a venv of its own, with the extra a user of that path installs.
VENV_TORCHX ?= .venv-torchx
VENV_KFP ?= .venv-kfp
define venv_test  # $(1): venv dir, $(2): extras, $(3): SAM_TEST_ENV, $(4): test dir
	@test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	@$(1)/bin/python -c "import torch" 2>/dev/null || $(1)/bin/pip install -q "$(TORCH_SPEC)"
	$(1)/bin/pip install -q -e ".[$(2)]"
	$(1)/bin/pip check
	SAM_TEST_ENV=$(3) $(1)/bin/python -m pytest -q $(4)
endef

TORCHX_EXTRAS := gcs,torchx,test
KFP_EXTRAS := gcs,kfp,test

test-torchx:
	$(call venv_test,$(VENV_TORCHX),$(TORCHX_EXTRAS),torchx,tests/torchx)

test-kfp:
	$(call venv_test,$(VENV_KFP),$(KFP_EXTRAS),kfp,tests/pipelines)

# The Kubeflow Pipelines IR (in the kfp venv): pipelines/sam_pipeline.yaml.
pipeline:
	@test -x $(VENV_KFP)/bin/python || $(MAKE) --no-print-directory test-kfp
	$(VENV_KFP)/bin/python -m pipelines.sam_pipeline --out pipelines/sam_pipeline.yaml

# The benchmark suite (issue 11): ours vs the official modules, MFU, profile, scaling, data,
# metrics, checkpoint -> benchmarks/REPORT.md (~12 minutes on 2 cores); bench-quick ~2 minutes.
bench: install-test
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PYTHON) benchmarks/report.py

bench-quick: install-test
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PYTHON) benchmarks/report.py --quick

# The GPU part, one short script for a machine with a CUDA device -> benchmarks/REPORT-gpu.md.
bench-gpu:
	bash benchmarks/gpu.sh

# Regenerate manifests/ (kustomize base + overlays) from the Helm chart; a test checks they agree.
manifests:
	$(PYTHON) -m tests.e2e.manifests --write

# The kind end-to-end test (needs kind, docker, kubectl, helm; what .github/workflows/e2e-kind.yaml runs).
e2e-kind:
	bash tests/e2e/kind_e2e.sh
