"""bench/temporal_task.py (the timing-only synthetic task) and a tiny run of bench/bench_accuracy.py."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

from osbc.errors import OsbcError  # noqa: E402
from temporal_task import DEFAULTS, make_task, templates  # noqa: E402


def test_seeded_and_deterministic():
    a_tr, a_te = make_task(0, 100, 50)
    b_tr, b_te = make_task(0, 100, 50)
    assert torch.equal(a_tr.X, b_tr.X) and torch.equal(a_tr.y, b_tr.y)
    assert torch.equal(a_te.X, b_te.X) and torch.equal(a_te.y, b_te.y)
    c_tr, c_te = make_task(1, 100, 50)
    assert not torch.equal(a_tr.X, c_tr.X) and not torch.equal(a_te.X, c_te.X)
    # the splits are separate streams: more test samples leave the training split as it was
    d_tr, _ = make_task(0, 100, 70)
    assert torch.equal(a_tr.X, d_tr.X)


def test_shapes_balance_and_disjoint_splits():
    tr, te = make_task(0, 200, 100)
    T, k = DEFAULTS["steps"], DEFAULTS["classes"]
    assert tr.X.shape == (200, T, 2, 34, 34) and te.X.shape == (100, T, 2, 34, 34)
    assert tr.X.dtype == torch.uint8 and tr.y.dtype == torch.int64
    assert set(torch.unique(tr.X).tolist()) == {0, 1}
    assert torch.bincount(tr.y, minlength=k).tolist() == [200 // k] * k
    assert torch.bincount(te.y, minlength=k).tolist() == [100 // k] * k
    assert tr.num_classes == k and tr.targets == tr.y.tolist()
    assert len(tr.y.unique()) == k and not torch.equal(tr.y, tr.y.sort().values)   # shuffled
    train_rows = {bytes(x.flatten().numpy()) for x in tr.X}
    assert len(train_rows) == 200
    assert not any(bytes(x.flatten().numpy()) in train_rows for x in te.X)


def test_classes_differ_in_timing_only():
    """Every class fires the same inputs as often: a nearest-class-mean classifier of the spike
    counts summed over time is at chance, while the same classifier on the frames is not."""
    pool, pref = templates(0, DEFAULTS["classes"], DEFAULTS["steps"], DEFAULTS["pixels"])
    assert len(set(pool.tolist())) == DEFAULTS["pixels"] and pref.shape == (DEFAULTS["classes"], DEFAULTS["pixels"])
    tr, te = make_task(0, 1000, 500)

    def ncm(f):
        Xtr, Xte = f(tr.X.float()).flatten(1), f(te.X.float()).flatten(1)
        mu = torch.stack([Xtr[tr.y == c].mean(0) for c in range(tr.num_classes)])
        return (torch.cdist(Xte, mu).argmin(1) == te.y).float().mean().item()

    assert ncm(lambda x: x.sum(1)) < 0.2              # chance is 0.1
    assert ncm(lambda x: x) > 0.6


def test_bad_sizes():
    with pytest.raises(OsbcError, match="multiple of classes"):
        make_task(0, 15, 10)
    with pytest.raises(OsbcError, match="pixels"):
        make_task(0, 10, 10, pixels=0)


def test_tiny_bench_run(tmp_path):
    import bench_accuracy
    out = tmp_path / "acc.json"
    argv = ["--datasets", "temporal", "--limit", "100", "--epochs", "1", "--calib", "20", "--sparsities", "0.95",
            "--solvers", "fast", "--threads", "1", "--cache", str(tmp_path / "cache"), "--png", ""]
    res = bench_accuracy.main(argv + ["--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(res["rows"]))
    (info,) = saved["datasets"]
    assert info["dataset"] == "temporal" and info["train_samples"] == 100 and info["frames"] == DEFAULTS["steps"]
    assert 0 <= info["dense_test_accuracy"] <= 1 and not info["cached"]
    (row,) = saved["rows"]
    assert set(row) == {"dataset", "sparsity", "solver", "test_accuracy", "membrane_error", "seconds",
                        "solve_seconds", "peak_mb", "achieved_sparsity", "layer_solvers"}
    assert row["solver"] == "fast" and row["layer_solvers"] == {"fc1": "fast", "fc2": "fast"}
    assert abs(row["achieved_sparsity"] - 0.95) < 1e-3 and row["membrane_error"] > 0 and row["seconds"] > 0
    assert {"command", "threads", "loadavg"} <= set(saved["meta"])
    assert list((tmp_path / "cache").glob("temporal_mlp_*.safetensors"))
    # a second run reads the trained model back from the cache and measures the same accuracies
    again = bench_accuracy.main(argv + ["--json", str(tmp_path / "again.json")])
    assert again["datasets"][0]["cached"]
    assert again["datasets"][0]["dense_test_accuracy"] == info["dense_test_accuracy"]
    # the same weights (not the seeded initialisation): the same membrane error to the last bit
    assert again["rows"][0]["membrane_error"] == row["membrane_error"]
    assert again["rows"][0]["test_accuracy"] == row["test_accuracy"]
