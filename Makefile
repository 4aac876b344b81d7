# Everything installs into .venv. torch is pinned to the CPU build first: a bare `torch`
# requirement with no torch installed would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
DEMO   := build/demo

.PHONY: install test demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet -e ".[test]"
	touch $@

test: install
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

bench: install
	$(BIN)/python bench/bench_foundation.py
	$(BIN)/python bench/bench_surgery.py

clean:
	rm -rf $(VENV) build .pytest_cache
