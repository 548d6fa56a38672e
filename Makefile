# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines here take a local CPU wheel for this exact version; elsewhere PyPI serves the CUDA build.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow bench reproduce-darkroom reproduce-darkroom-cpu reproduce-darkroom-permuted reproduce-dark-key-to-door clean

$(STAMP): setup.cfg
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dicp-ray pipeline --config tune_configs/demo.yaml --output runs/demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -m "not slow" -q

test-slow: $(STAMP)
	$(PY) -m pytest -m slow -q || [ $$? -eq 5 ]  # exit 5 = no test is marked slow at the moment

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[test,bench]"
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

# The paper's grid-world results (issue #18): six methods x the config's 5 split seeds on one shared dataset, at the
# paper's scale (tune_configs/<env>.yaml; GPU for training, a cluster or a big node for collection). Extra dicp-ray
# arguments: make reproduce-darkroom ARGS="--address auto". Layout and resume: scripts/reproduce.sh.
reproduce-darkroom: $(STAMP)
	scripts/reproduce.sh darkroom $(ARGS)

# The six methods on Darkroom at a 2-core CPU scale (issue #23, docs/results/darkroom_cpu/): two method pairs at a
# time, one model per core (tune_configs/darkroom_cpu.yaml says the scale). Resumable: re-run after a failure.
reproduce-darkroom-cpu: $(STAMP)
	REPRODUCE_JOBS=2 REPORT_OUT=docs/results/darkroom_cpu scripts/reproduce.sh darkroom_cpu $(ARGS)

reproduce-darkroom-permuted: $(STAMP)
	scripts/reproduce.sh darkroom_permuted $(ARGS)

reproduce-dark-key-to-door: $(STAMP)
	scripts/reproduce.sh dark_key_to_door $(ARGS)

clean:
	rm -rf runs .pytest_cache
