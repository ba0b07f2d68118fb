#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and a CUDA build of torch: the CUDA-vs-CPU tests, then the
# pruning frontier timed on the GPU (a few minutes). PYTHON selects the interpreter.
set -euo pipefail
PY=${PYTHON:-python}
cd "$(dirname "$0")/.."
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA here'; print(torch.cuda.get_device_name())"
"$PY" -m pytest -q tests/test_cuda.py tests/test_restricted.py -k "cuda or Cuda or test_cuda"
cd bench
"$PY" bench_frontier.py --device cuda --shapes 256x2312,512x4608 --sparsities 0.9,0.97 --variants "" \
    --repeat 2 --json cuda_frontier.json --png cuda_frontier.png
# the GPU's default chunks (an eighth of its free memory) against the CPU's 384 MiB: how much the
# number of sequential chunks costs the exact and restricted solvers there
"$PY" bench_frontier.py --device cuda --shapes 512x4608 --sparsities 0.9,0.97 --variants "" --skip-exact \
    --repeat 2 --max-memory 384 --json cuda_frontier_384m.json
