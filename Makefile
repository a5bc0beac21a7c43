# Two entry points: `make demo` (fine-tune the embedded default model) and `make test`.
# torch is installed first and exactly (2.13.0 is a CPU wheel); everything else after it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test install bench clean

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/subtune demo

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

clean:
	rm -rf $(VENV) runs
