# Fresh machine: `make demo` (the paper's experiment on the embedded suite, CPU) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_DIR ?= runs/demo

.PHONY: setup test demo clean

$(VENV)/.installed: requirements.txt requirements-test.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements-test.txt
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q

demo: setup
	$(PY) -m mhr_jax.experiment --gin_file=configs/experiments/demo.gin --gin.MODEL_DIR="'$(RUN_DIR)'"

clean:
	rm -rf $(VENV) .pytest_cache
