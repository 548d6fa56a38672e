# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines here take a local CPU wheel for this exact version; elsewhere PyPI serves the CUDA build.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow bench reproduce-darkroom reproduce-darkroom-cpu reproduce-darkroom-permuted reproduce-dark-key-to-door reproduce-darkroom-permuted-cpu reproduce-dark-key-to-door-cpu reproduce-ml1-cpu gpu-wheels device-smoke clean

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

# AD and DICP-AD on Darkroom-Permuted (split seeds 0-2) and Dark Key-to-Door (split 0, 400 train tasks) at a 2-core
# scale (issue #23; the configs' headers give the scale). Resumable.
reproduce-darkroom-permuted-cpu: $(STAMP)
	REPRODUCE_JOBS=2 REPRODUCE_VARIANTS=ad scripts/reproduce.sh darkroom_permuted_cpu $(ARGS)

reproduce-dark-key-to-door-cpu: $(STAMP)
	REPRODUCE_JOBS=2 REPRODUCE_VARIANTS=ad scripts/reproduce.sh dark_key_to_door_cpu $(ARGS)

# IDT and DICP-IDT on the five ML1 tasks of the paper's Table 1, split 0, at a 2-core scale (issue #24;
# tune_configs/ml1_cpu.yaml says the scale), one task after another, each into docs/results/ml1_<task>_cpu/.
ML1_CPU_TASKS ?= reach push pick_place sweep peg_insert_side
reproduce-ml1-cpu: $(STAMP)
	for task in $(ML1_CPU_TASKS); do \
	  REPRODUCE_JOBS=2 REPRODUCE_VARIANTS=idt scripts/reproduce.sh ml1_$${task}_cpu $(ARGS) || exit 1; done

# A bare GPU box (issue #25: PyTorch, numpy, pyarrow, pyyaml, tqdm, tensorboard, matplotlib; no Ray, no package index)
# lacks gymnasium: download it and its small pure-Python dependencies (numpy is there) for Python 3.12 into
# .gpu_wheels/ (git-ignored), carry that folder, and scripts/device_run.sh unpacks them onto PYTHONPATH when
# gymnasium is missing (or: pip install --no-index --find-links .gpu_wheels gymnasium). README: "Running on a GPU box
# without Ray".
GPU_WHEELS ?= .gpu_wheels
GPU_PYTHON_VERSION ?= 3.12
gpu-wheels:
	$(PYTHON) -m pip download --only-binary=:all: --python-version $(GPU_PYTHON_VERSION) \
		--platform manylinux2014_x86_64 --implementation cp --no-deps -d $(GPU_WHEELS) \
		gymnasium==1.2.2 cloudpickle==3.1.3 farama-notifications==0.0.6 typing-extensions==4.16.0
	ls -l $(GPU_WHEELS)

# The device run at tiny sizes on this machine's CPU (also part of make test: tests/integration/test_device_run.py).
device-smoke: $(STAMP)
	PYTHON=$(PY) OUT=runs/device_smoke WORK=runs/device_smoke_work scripts/device_run.sh --smoke

clean:
	rm -rf runs .pytest_cache
