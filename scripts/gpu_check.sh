#!/usr/bin/env bash
# GPU check for issue 18 (static-shape streaming steps, offline throughput): the CUDA tests and the benchmarks
# on one GPU, about 8 minutes on one H200. Run from the repository root after `make setup` with a CUDA torch:
#   bash scripts/gpu_check.sh 2>&1 | tee gpu_check.log
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print(torch.__version__, torch.version.cuda)"
# CUDA tests (-m gpu), including the static-shape steps on CUDA against the default steps (~2 min)
timeout 240 $PY -m pytest -m gpu -q -x
# Streaming throughput: FIXED and ESAPN on 500k rows with ml-20m id spaces; the static-shape steps are the CUDA
# default (method.static_shapes=auto); DARTS and AutoEmb on 200k (~3 min)
timeout 200 $PY -m autorecbench.bench.streaming --device cuda --rows 500000 --methods fixed,esapn --optimizers lazy
timeout 120 $PY -m autorecbench.bench.streaming --device cuda --rows 200000 --methods darts,autoemb --optimizers lazy
# Offline DeepFM on 2M Criteo-format rows (fused Adam on CUDA, data on the device) (~2 min)
timeout 180 $PY -m autorecbench.bench.ctr --device cuda --rows 2000000 --train-rows 1000000
