# Two commands do all the set-up on a fresh machine (Python 3.10+ with pip):
#   make demo   - install, then run the main job on embedded defaults
#   make test   - install with test extras, then run the whole test suite
PYTHON ?= python3
# CPU wheel for laptops and CI; GPU images bring their own CUDA build of torch.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-test demo test bench

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -e ".[gcs,s3]"

install-test:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -e ".[gcs,s3,test]"

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
