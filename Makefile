# Fresh machine: `make demo` (the paper's experiment on the embedded suite, CPU), `make study` (the papers'
# findings tested over seeds and tasks on the embedded study suite, CPU) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_DIR ?= runs/demo
STUDY_DIR ?= runs/study

.PHONY: setup test demo study clean

$(VENV)/.installed: requirements.txt requirements-test.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements-test.txt
	touch $@

setup: $(VENV)/.installed

# Two pytest-xdist workers, one test file each at a time (module fixtures stay shared within a file), in
# collection order (tests/conftest.py puts the longest file first).
TEST_WORKERS ?= 2

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

demo: setup
	$(PY) -m mhr_jax.experiment --gin_file=configs/experiments/demo.gin --gin.MODEL_DIR="'$(RUN_DIR)'"

study: setup
	$(PY) -m mhr_jax.experiment.study --gin_file=configs/studies/embedded.gin --gin.MODEL_DIR="'$(STUDY_DIR)'"

clean:
	rm -rf $(VENV) .pytest_cache
