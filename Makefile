# Two entry points that do all set-up on a fresh machine:
#   make demo   - the main job: sparsify SmolLM2-135M (from a PyPI wheel) and print quality per tau
#   make test   - the test suite (CPU; Triton kernels run under TRITON_INTERPRET=1)
PY ?= python3
# torch goes in first, on its own (skipped if one is installed): the project's bare `torch`
# requirement would pull several GB of CUDA packages. Our machines resolve torch==2.13.0 to a
# local CPU wheel; on a stock CPU machine pass the CPU index, e.g.
#   make test TORCH="torch --index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.13.0

.PHONY: install demo test

install:
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test,models,gpu,bench]"

demo: install
	$(PY) -m ppcompile demo

test: install
	$(PY) -m pytest -q tests
