"""Bit-reproducibility: a seeded demo gives the same numbers and weights in every process, whatever
the thread settings of the environment (issue: two demo runs on one machine disagreed)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from osbc import models
from osbc.data import upsample_images
from osbc.data.saccade import _matmul
from osbc.training import pinned_threads, train

SRC = str(Path(__file__).resolve().parents[1] / "src")
TIMING = {"seconds", "wall_seconds"}  # the only fields allowed to differ between two runs


def _env(threads: int, cache: Path | None = None) -> dict:
    """The environment of a child process with ``threads`` threads in OpenMP, MKL and OpenBLAS."""
    e = dict(os.environ, PYTHONWARNINGS="ignore")
    if cache is not None:
        e["OSBC_CACHE"] = str(cache)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        e[var] = str(threads)
    e["PYTHONPATH"] = SRC + os.pathsep + e.get("PYTHONPATH", "")
    return e


def _untimed(o):
    if isinstance(o, dict):
        return {k: _untimed(v) for k, v in o.items() if k not in TIMING}
    if isinstance(o, list):
        return [_untimed(v) for v in o]
    return o


@pytest.mark.slow
def test_demo_is_bit_identical_across_processes_and_thread_settings(tmp_path):
    """The demo's path (events from scratch, training, one prune, one quantize, evaluation) in two
    processes, one started with 1 thread everywhere, one with 2: same report, same tensors."""
    outs = []
    for threads in (1, 2):
        out = tmp_path / f"demo-{threads}"
        p = subprocess.run([sys.executable, "-m", "osbc", "demo", "--out", str(out), "--frames", "4", "--epochs", "2",
                            "--calib-samples", "64", "--sparsities", "90%", "--bits", "4", "--methods", "osbc",
                            "--quiet"], capture_output=True, text=True, timeout=900,
                           env=_env(threads, tmp_path / f"cache-{threads}"))
        assert p.returncode == 0, p.stderr
        outs.append(out)
    a, b = (json.loads((o / "report.json").read_text()) for o in outs)
    assert [r["task"] for r in a["results"]] == ["prune", "quantize"]
    threads = [a["settings"].pop("threads"), b["settings"].pop("threads")]
    assert _untimed(a) == _untimed(b)  # floats compared exactly: accuracies, losses, errors
    tables = [[line.rsplit(None, 1)[0] for line in (o / "results.txt").read_text().splitlines()] for o in outs]
    assert tables[0] == tables[1]  # the printed table, but for its last column (seconds)
    files = sorted(f.name for f in outs[0].glob("*.safetensors"))
    assert files == ["dense.safetensors", "pruned-90-osbc.safetensors", "quantized-4bit-osbc.safetensors"]
    assert files == sorted(f.name for f in outs[1].glob("*.safetensors"))
    for name in files:
        ta, tb = load_file(outs[0] / name), load_file(outs[1] / name)
        assert ta.keys() == tb.keys()
        for k in ta:
            assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), (name, k)
    assert threads == [1, 1]  # the demo ran on one intra-op thread, not on the environment's count


def _train_state(ambient: int, threads):
    """The demo's MLP trained one epoch (two steps) on fixed random events, ``ambient`` threads set."""
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(128, 4, 2, 34, 34, generator=g) < 0.1).float()
    y = torch.arange(128) % 10
    torch.manual_seed(0)
    model = models.build("nmnist_mlp", in_shape=(2, 34, 34), hidden=256, classes=10)
    before = torch.get_num_threads()
    torch.set_num_threads(ambient)
    try:
        res = train(model, (x, y), epochs=1, batch_size=64, lr=5e-3, progress=False, log=None, threads=threads)
        assert torch.get_num_threads() == ambient  # the caller's count is restored
    finally:
        torch.set_num_threads(before)
    return res.model.state_dict()


def test_train_threads_pins_the_intra_op_thread_count():
    free = [_train_state(n, None) for n in (1, 2)]
    if all(torch.equal(free[0][k], free[1][k]) for k in free[0]):
        pytest.skip("this torch build gives the same bits on 1 and 2 threads: nothing to pin")
    pinned = [_train_state(n, 1) for n in (1, 2)]
    for k, v in pinned[0].items():
        assert torch.equal(v, pinned[1][k]), k
        assert torch.equal(v, free[0][k]), k  # pinned to 1 == a plain run on 1 thread


def test_pinned_threads_restores_the_count():
    before = torch.get_num_threads()
    with pinned_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pinned_threads(None):
        assert torch.get_num_threads() == before


def test_saccade_products_sum_in_index_order():
    """Against the sums written out term by term in Python floats (IEEE doubles, like numpy's)."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 3, 4)), rng.standard_normal((4, 5))
    got = _matmul(a, b)
    assert got.shape == (2, 3, 5)
    for n in range(2):
        for i in range(3):
            for j in range(5):
                want = float(a[n, i, 0]) * float(b[0, j])
                for k in range(1, 4):
                    want += float(a[n, i, k]) * float(b[k, j])
                assert got[n, i, j] == want
    imgs = rng.uniform(0, 16, (3, 8, 8))
    assert np.allclose(upsample_images(imgs), _einsum_upsample(imgs), rtol=1e-12, atol=1e-12)


def _einsum_upsample(imgs):
    """The same enlargement through numpy's BLAS-backed einsum (equal up to rounding)."""
    from osbc.data.saccade import _linear_matrix

    up = _linear_matrix(8, 20)
    placed = np.zeros((28, 8))
    placed[4:24] = up
    r = np.arange(28)
    g = np.exp(-0.5 * ((r[:, None] - r[None, :]) / 0.8) ** 2)
    placed = (g / g.sum(1, keepdims=True)) @ placed
    return np.einsum("ij,njk,lk->nil", placed, imgs, placed, optimize=True)


@pytest.mark.slow
def test_digit_images_do_not_depend_on_blas_threads():
    """The 1797 enlarged digits hash the same with numpy's BLAS on 1 and on 2 threads (through
    BLAS, the last bits of the products changed with the thread count)."""
    pytest.importorskip("sklearn")
    code = ("import hashlib; from sklearn.datasets import load_digits; from osbc.data import upsample_images; "
            "print(hashlib.sha256(upsample_images(load_digits().images).tobytes()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300,
                              env=_env(n)).stdout for n in (1, 2)}
    assert len(digests) == 1, digests
