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
# the restricted solver's batched steps on a GPU: are they bound by the number of sequential steps
# (larger row chunks help) or by the factor's reads? the same layer with 8 GiB chunks
"$PY" bench_frontier.py --device cuda --shapes 512x4608 --sparsities 0.9,0.97 --variants "" --skip-exact \
    --repeat 2 --max-memory 8192 --json cuda_frontier_8g.json
