# Two commands do all the set-up on a fresh machine (Python 3.10+ with pip):
#   make demo   - install, then run the main job on embedded defaults
#   make test   - install with test extras, then run the whole test suite
PYTHON ?= python3
# CPU wheel for laptops and CI; GPU images bring their own CUDA build of torch.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-test install-system demo test bench manifests e2e-kind

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
SYSTEM_TOOLS = prometheus:prometheus promtool:prometheus dockerd:docker.io debootstrap:debootstrap shellcheck:shellcheck
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

bench: install-test
	$(PYTHON) benchmarks/bench_encoder.py
	$(PYTHON) benchmarks/bench_data.py --small
	$(PYTHON) benchmarks/bench_prompts.py
	$(PYTHON) benchmarks/bench_step.py
	$(PYTHON) benchmarks/bench_metrics.py

# Regenerate manifests/ (kustomize base + overlays) from the Helm chart; a test checks they agree.
manifests:
	$(PYTHON) -m tests.e2e.manifests --write

# The kind end-to-end test (needs kind, docker, kubectl, helm; what .github/workflows/e2e-kind.yaml runs).
e2e-kind:
	bash tests/e2e/kind_e2e.sh
