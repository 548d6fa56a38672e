# Sourced by the scripts/device_*.sh runs: the repo on PYTHONPATH, and gymnasium from .gpu_wheels/ (`make
# gpu-wheels`) where the box lacks it (a bare GPU box has PyTorch, numpy, pyarrow, pyyaml, tqdm, tensorboard and
# matplotlib; never Ray, MuJoCo or metaworld, so every stage runs on its local backend). Sets PYTHON and PYTHONPATH.
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PYTHON" -c "import gymnasium" 2>/dev/null; then
  if ! ls .gpu_wheels/*.whl >/dev/null 2>&1; then
    echo "${0##*/}: gymnasium is not importable and .gpu_wheels/ holds no wheels: run 'make gpu-wheels' on a" \
         "machine with network access and carry .gpu_wheels/ here" >&2
    exit 2
  fi
  for wheel in .gpu_wheels/*.whl; do "$PYTHON" -m zipfile -e "$wheel" .gpu_wheels/site; done  # pure-Python wheels
  export PYTHONPATH="$PWD/.gpu_wheels/site:$PYTHONPATH"
fi
