# Two commands do all the set-up on a fresh machine (Python 3.10+ with pip):
#   make demo   - install, then run the main job on embedded defaults
#   make test   - install with test extras, then run the whole test suite
PYTHON ?= python3
# CPU wheel for laptops and CI; GPU images bring their own CUDA build of torch.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-test install-prometheus demo test bench

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -e ".[gcs,s3]"

install-test:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -e ".[gcs,s3,test]"
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || $(MAKE) --no-print-directory install-prometheus

# The monitoring tests run a real Prometheus server and promtool (Debian/Ubuntu package
# `prometheus`). Installed when apt-get can run as root; elsewhere those tests skip, saying why.
install-prometheus:
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus; \
	else \
	  echo "note: prometheus/promtool not on PATH and apt-get is not usable here: the Prometheus tests will skip"; \
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
