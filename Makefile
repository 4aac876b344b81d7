# Everything installs into .venv, torch first and pinned: the package's bare `torch` requirement
# with no torch installed would pull the newest build, on Linux the CUDA one (~5 GB with its
# nvidia packages). Where torch==2.13.0 itself resolves to that CUDA build (PyPI on Linux), take
# the CPU build from PyTorch's own index: make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
# Two steps, one stamp each: `install` (what running the tool needs: torch, then the package
# without extras; `make demo`, `make bench`) and `install-test` (the test extras on top:
# pytest, accelerate, deepspeed, peft, mergekit; `make test`). A .venv made by `make demo` is
# completed by a later `make test`; a change to pyproject.toml redoes both.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
TORCH_INDEX ?=
DEMO   := build/demo

.PHONY: install install-test test demo bench clean

install: $(VENV)/.installed-run

install-test: $(VENV)/.installed-test

$(VENV)/.installed-run: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)") "$(TORCH)"
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed-run
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet -e ".[test]"
	touch $@

test: install-test
	$(BIN)/python -m pytest -q

demo: install
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(BIN)/python examples/make_demo_checkpoint.py $(DEMO)/finetune.pth $(DEMO)/new_model.pth
	$(BIN)/ckptsurgery inspect $(DEMO)/finetune.pth
	$(BIN)/ckptsurgery inspect $(DEMO)/finetune.pth --tree
	$(BIN)/ckptsurgery convert $(DEMO)/finetune.pth -o $(DEMO)/finetune.safetensors
	$(BIN)/ckptsurgery inspect $(DEMO)/finetune.safetensors --keys 'blocks.0.bn' --json
	$(BIN)/ckptsurgery convert $(DEMO)/finetune.safetensors -o $(DEMO)/roundtrip.pth
	$(BIN)/ckptsurgery inspect $(DEMO)/roundtrip.pth --stats --keys 'head'
	$(BIN)/ckptsurgery merge $(DEMO)/finetune.pth --into $(DEMO)/new_model.pth --on-mismatch overlap -o $(DEMO)/transfer.pth
	$(BIN)/ckptsurgery diff $(DEMO)/roundtrip.pth $(DEMO)/transfer.pth || true
	@echo
	@echo 'Demo done; its files are in $(DEMO). ckptsurgery is installed in $(VENV), not on your PATH:'
	@echo '  $(BIN)/ckptsurgery --help       run it from here'
	@echo '  source $(BIN)/activate          then plain "ckptsurgery" in this shell'
	@echo '  pipx install .                     for everyday use, on your PATH (README: Quickstart)'

bench: install
	$(BIN)/python bench/bench_foundation.py
	$(BIN)/python bench/bench_surgery.py

clean:
	rm -rf $(VENV) build .pytest_cache
