"""The osbc command end to end on small digits data: every subcommand, files written, exit codes,
and the user-error paths (one line on stderr, no traceback, no partial output)."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from osbc import cli
from osbc.checkpoint import load, read_meta

T = 4  # frames: keeps every command fast


def run(*argv, env, cwd=None, timeout=300):
    """``python -m osbc.cli ARGV`` in a subprocess; returns (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, "-m", "osbc.cli", *map(str, argv)], capture_output=True, text=True,
                       env=env, cwd=cwd, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def inproc(capsys, *argv):
    """``osbc ARGV`` in this process (same code path as the command, without the start-up cost)."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def assert_user_error(code, err, want_code=1, match=None):
    assert code == want_code, err
    assert "Traceback" not in err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("osbc: error: "), err
    if match:
        assert match in lines[0], lines[0]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _cache_env(cache, monkeypatch):
    monkeypatch.setenv("OSBC_CACHE", str(cache))  # in-process runs: never touch ~/.cache


@pytest.fixture(scope="module")
def env(cache):
    e = dict(os.environ, OSBC_CACHE=str(cache), PYTHONWARNINGS="ignore")
    e["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + e.get("PYTHONPATH", "")
    return e


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The digits events, built once for the module."""
    from osbc.data import load_dataset

    r = tmp_path_factory.mktemp("digits")
    load_dataset("digits", root=r, train=True, frames=T, cache=False)
    return r


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, env, root):
    out = tmp_path_factory.mktemp("ck") / "mlp.safetensors"
    # 17x17 frames (--downsample 2) keep the layers small: 578 inputs instead of 2312
    code, so, se = run("train", "--data", "digits", "--root", root, "--frames", T, "--downsample", 2, "--epochs", 3,
                       "--lr", "5e-3", "--arch-arg", "hidden=32", "--out", out, "-q", env=env)
    assert code == 0, se
    assert "test accuracy" in so
    return out


def data(root):
    """The data options every command that reads data takes."""
    return ["--root", str(root), "--device", "cpu"]


def common(root):
    """... and those of the commands that calibrate."""
    return data(root) + ["--calib-samples", "32"]


# ---- every command ------------------------------------------------------------------------------

def test_train_writes_a_rebuildable_checkpoint(ckpt):
    meta = read_meta(ckpt)
    assert meta["arch"] == "nmnist_mlp" and meta["data"] == "digits" and meta["frames"] == T
    assert meta["kwargs"]["hidden"] == 32 and meta["kwargs"]["in_shape"] == [2, 17, 17]
    assert meta["info"]["test_accuracy"] > 0.3  # 3 epochs of a 32-unit MLP on T=4 frames
    assert meta["info"]["downsample"] == 2
    m = load(ckpt)
    assert tuple(m.fc1.weight.shape) == (32, 578)


def test_eval(ckpt, root, capsys, tmp_path):
    js = tmp_path / "eval.json"
    code, so, se = inproc(capsys, "eval", "--model", ckpt, "--json", js, *data(root))
    assert code == 0, se
    assert "accuracy" in so and "synops" in so and "firing rate" in so
    rep = json.loads(js.read_text())
    assert rep["accuracy"] == pytest.approx(read_meta(ckpt)["info"]["test_accuracy"])
    assert set(rep["firing_rates"]) == {"sn1", "sn2"} and rep["synops"] > 0
    assert rep["bytes_dense"] > 0 and rep["samples"] == 359


def test_info_on_checkpoint_and_architecture(ckpt, env, capsys):
    code, so, se = run("info", "--model", ckpt, env=env)
    assert code == 0, se
    assert "fc1" in so and "32x578" in so and "LIF(tau=2" in so and "2 compressible modules" in so
    code, so, se = inproc(capsys, "info", "--arch", "dvsgesture_net", "--frames", 2)
    assert code == 0, se
    assert "conv5.0" in so and "500x2048" in so and "110x500" in so and "7 compressible modules" in so


@pytest.mark.parametrize("method,subprocess_", [("osbc", True), ("magnitude", False)])
def test_prune(ckpt, root, env, capsys, tmp_path, method, subprocess_):
    out, rep = tmp_path / "p.safetensors", tmp_path / "p.json"
    argv = ["prune", "--model", ckpt, "--sparsity", "0.9", "--method", method, "--solver", "fast",
            "--out", out, "--report", rep, *common(root), "-q"]
    code, so, se = run(*argv, env=env) if subprocess_ else inproc(capsys, *argv)
    assert code == 0, se
    assert f"{method} 90% sparsity: accuracy" in so
    m = load(out)
    w = torch.cat([m.fc1.weight.flatten(), m.fc2.weight.flatten()])
    assert float((w == 0).float().mean()) == pytest.approx(0.9, abs=0.01)
    r = json.loads(rep.read_text())
    assert r["task"] == "prune" and r["method"] == method and len(r["report"]["layers"]) == 2
    assert r["compressed"]["sparsity"] == pytest.approx(0.9, abs=0.01)
    # the report's accuracy is that of the checkpoint written, as osbc eval measures it
    js = tmp_path / "e.json"
    code, _, se = inproc(capsys, "eval", "--model", out, "--json", js, *data(root), "-q")
    assert code == 0, se
    assert json.loads(js.read_text())["accuracy"] == pytest.approx(r["compressed"]["accuracy"])
    assert out.stat().st_size < 0.3 * ckpt.stat().st_size  # stored compactly
    assert read_meta(out)["info"]["compression"]["method"] == method


@pytest.mark.parametrize("method,subprocess_", [("osbc", False), ("rtn", True)])
def test_quantize(ckpt, root, env, capsys, tmp_path, method, subprocess_):
    out = tmp_path / "q.safetensors"
    argv = ["quantize", "--model", ckpt, "--bits", "4", "--method", method, "--solver", "fast", "--out", out,
            *common(root), "-q"]
    code, so, se = run(*argv, env=env) if subprocess_ else inproc(capsys, *argv)
    assert code == 0, se
    assert f"{method} 4 bits: accuracy" in so
    m = load(out)
    for w in (m.fc1.weight, m.fc2.weight):
        levels = (w / w.abs().amax(1, keepdim=True)).mul(7).round().unique()
        assert len(levels) <= 15  # at most 2^4 - 1 symmetric levels per row
    assert out.stat().st_size < 0.25 * ckpt.stat().st_size


def test_sweep(ckpt, root, capsys, tmp_path):
    out = tmp_path / "sweep"
    code, so, se = inproc(capsys, "sweep", "--model", ckpt, "--methods", "osbc,magnitude,rtn", "--sparsities", "0.9",
                          "--bits", "4", "--seeds", 2, "--solver", "fast", "--out", out, *common(root), "-q")
    assert code == 0, se
    assert {p.name for p in out.iterdir()} == {"sweep.json", "sweep.txt", "sweep.png"}
    res = json.loads((out / "sweep.json").read_text())
    assert res["seeds"] == [0, 1]
    points = {(r["task"], r["method"], r["level"]) for r in res["results"]}
    assert points == {("prune", "osbc", 0.9), ("prune", "magnitude", 0.9), ("quantize", "osbc", 4),
                      ("quantize", "rtn", 4)}
    for r in res["results"]:
        accs = [run["accuracy"] for run in r["runs"]]
        assert [run["seed"] for run in r["runs"]] == [0, 1] and r["accuracies"] == accs
        assert r["accuracy"] == pytest.approx(statistics.fmean(accs))
        assert r["accuracy_std"] == pytest.approx(statistics.stdev(accs))
        assert r["drop"] == pytest.approx(res["dense"]["accuracy"] - r["accuracy"])
        if r["task"] == "prune":
            assert all(run["sparsity"] == pytest.approx(0.9, abs=0.01) for run in r["runs"])
    assert "±" in so and "magnitude" in so
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_small_demo(root, env, tmp_path):
    out = tmp_path / "demo"
    code, so, se = run("demo", "--out", out, "--root", root, "--frames", T, "--downsample", 2, "--epochs", 2,
                       "--hidden", 32,
                       "--calib-samples", 32, "--sparsities", "90%", "--bits", "4", "--solver", "fast",
                       env=env)
    assert code == 0, se
    for step in ("[1/4]", "[2/4]", "[3/4]", "[4/4]", "demo finished in"):
        assert step in so
    names = {p.name for p in out.iterdir()}
    assert {"report.json", "results.txt", "accuracy.png", "dense.safetensors",
            "pruned-90-osbc.safetensors", "quantized-4bit-osbc.safetensors"} <= names
    rep = json.loads((out / "report.json").read_text())
    assert len(rep["results"]) == 6  # (osbc, obc, magnitude) at 90% + (osbc, obc, rtn) at 4 bits
    assert [(r["task"], r["method"]) for r in rep["results"]] == [
        ("prune", "osbc"), ("prune", "obc"), ("prune", "magnitude"),
        ("quantize", "osbc"), ("quantize", "obc"), ("quantize", "rtn")]
    assert all(r["membrane_error"] > 0 for r in rep["results"])
    assert all(r["sparsity"] == pytest.approx(0.9, abs=0.01) for r in rep["results"][:3])
    assert rep["settings"]["frames"] == T and rep["dense"]["accuracy"] > 0.2
    # the stored pruned model loads back with its sparsity
    m = load(out / "pruned-90-osbc.safetensors")
    assert float((m.fc1.weight == 0).float().mean()) > 0.8


@pytest.mark.slow
def test_full_demo_default_settings(env, tmp_path):
    out = tmp_path / "demo"
    code, so, se = run("demo", "--out", out, env=env, timeout=900)
    assert code == 0, se
    rep = json.loads((out / "report.json").read_text())
    assert len(rep["results"]) == 21
    assert rep["dense"]["accuracy"] > 0.85


def test_module_entry_points(env):
    p = subprocess.run([sys.executable, "-m", "osbc", "--help"], capture_output=True, text=True, env=env)
    assert p.returncode == 0
    for c in ("demo", "train", "prune", "quantize", "eval", "sweep", "info", "export-nir"):
        assert c in p.stdout
    p = subprocess.run([sys.executable, "-m", "osbc", "--version"], capture_output=True, text=True, env=env)
    assert p.returncode == 0 and p.stdout.startswith("osbc ")


# ---- user errors: one line, no traceback, nothing written ---------------------------------------

def test_missing_model_file(env, root, tmp_path):
    out = tmp_path / "p.safetensors"
    code, _, se = run("prune", "--model", tmp_path / "nope.safetensors", "--sparsity", "0.5", "--out", out,
                      *common(root), env=env)
    assert_user_error(code, se, match="no such checkpoint")
    assert not out.exists()


def test_wrong_dataset_root(env, ckpt, tmp_path):
    out = tmp_path / "p.safetensors"
    code, _, se = run("prune", "--model", ckpt, "--sparsity", "0.5", "--out", out, "--data", "nmnist",
                      "--root", tmp_path / "no-nmnist-here", env=env)
    assert_user_error(code, se, match="N-MNIST")
    assert not out.exists()


def test_existing_output_needs_force(env, ckpt, root, capsys, tmp_path):
    out = tmp_path / "p.safetensors"
    out.write_bytes(b"keep me")
    code, _, se = run("prune", "--model", ckpt, "--sparsity", "0.5", "--method", "magnitude", "--out", out,
                      *common(root), env=env)
    assert_user_error(code, se, match="--force")
    assert out.read_bytes() == b"keep me"
    code, _, se = inproc(capsys, "prune", "--model", ckpt, "--sparsity", "0.5", "--method", "magnitude", "--out", out,
                         "--force", *common(root), "-q")
    assert code == 0, se
    assert load(out).fc1.weight.shape == (32, 578)


def test_demo_into_non_empty_folder_needs_force(capsys, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("x")
    code, _, se = inproc(capsys, "demo", "--out", tmp_path / "d")
    assert_user_error(code, se, match="not empty")
    assert os.listdir(tmp_path / "d") == ["x"]


# The remaining error paths run in-process (same code path as the subprocess, much faster).

@pytest.mark.parametrize("argv,match", [
    (["prune", "--model", "m", "--sparsity", "1.5", "--out", "o"], "sparsity must be in [0, 1)"),
    (["prune", "--model", "m", "--sparsity", "abc", "--out", "o"], "sparsity must be a number"),
    (["quantize", "--model", "m", "--bits", "9", "--out", "o"], "bits must be an integer from 2 to 8"),
    (["train", "--frames", "0", "--out", "o"], "positive integer"),
    (["train", "--epochs", "-2", "--out", "o"], "positive integer"),
    (["train", "--data", "imagenet", "--out", "o"], "invalid choice"),
    (["sweep", "--model", "m", "--methods", "osbc,foo"], "unknown foo"),
    (["prune", "--model", "m", "--sparsity", "0.5", "--out", "o", "--nm", "4:2"], "N:M"),
    (["prune", "--sparsity", "0.5", "--out", "o"], "required"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_exit_2(capsys, tmp_path, monkeypatch, argv, match):
    monkeypatch.chdir(tmp_path)
    code, out, err = inproc(capsys, *argv)
    assert_user_error(code, err, want_code=2, match=match)
    assert os.listdir(tmp_path) == []


def test_garbage_checkpoint(capsys, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 100)
    code, _, err = inproc(capsys, "eval", "--model", bad)
    assert_user_error(code, err, match="not a safetensors checkpoint")
    code, _, err = inproc(capsys, "info", "--model", bad)
    assert_user_error(code, err, match="not a safetensors checkpoint")


def test_output_folder_missing(capsys, tmp_path, ckpt):
    code, _, err = inproc(capsys, "prune", "--model", ckpt, "--sparsity", "0.5", "--out", tmp_path / "no" / "p.st")
    assert_user_error(code, err, match="does not exist")


def test_unknown_arch(capsys, tmp_path):
    code, _, err = inproc(capsys, "info", "--arch", "resnet50")
    assert_user_error(code, err, match="unknown --arch")
    code, _, err = inproc(capsys, "train", "--arch", "resnet50", "--out", tmp_path / "m.safetensors")
    assert_user_error(code, err, match="unknown --arch")
    code, _, err = inproc(capsys, "info", "--arch", "nmnist_mlp", "--arch-arg", "widht=3")
    assert_user_error(code, err, match="no argument")
    assert not (tmp_path / "m.safetensors").exists()


def test_too_many_calibration_samples(capsys, tmp_path, ckpt, root):
    out = tmp_path / "p.safetensors"
    code, _, err = inproc(capsys, "prune", "--model", ckpt, "--sparsity", "0.5", "--out", out, "--root", root,
                         "--calib-samples", "100000")
    assert_user_error(code, err, match="--calib-samples 100000")
    assert not out.exists()


def test_cuda_without_cuda(capsys, tmp_path, ckpt):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    code, _, err = inproc(capsys, "eval", "--model", ckpt, "--device", "cuda")
    assert_user_error(code, err, match="CUDA is not available")


def test_sweep_needs_a_grid(capsys, tmp_path, ckpt):
    code, _, err = inproc(capsys, "sweep", "--model", ckpt, "--out", tmp_path / "s")
    assert_user_error(code, err, match="--sparsities")
    assert not (tmp_path / "s").exists()


def test_same_file_for_report_and_out(capsys, tmp_path, ckpt):
    p = tmp_path / "x"
    code, _, err = inproc(capsys, "prune", "--model", ckpt, "--sparsity", "0.5", "--out", p, "--report", p)
    assert_user_error(code, err, match="same file")


def test_real_dataset_reader_via_root(ckpt, root, capsys):
    """--data nmnist reads N-MNIST's own layout (Train/<digit>/<id>.bin); the digits are stored in it."""
    folder = next(p for p in Path(root).iterdir() if (p / "Test").is_dir())
    code, so, se = inproc(capsys, "eval", "--model", ckpt, "--data", "nmnist", "--root", folder, "--downsample", 2,
                          "--max-samples", 50)
    assert code == 0, se
    assert "on nmnist (test, T=4)" in so and "(50 samples)" in so


def test_downsampling_is_remembered(root, capsys, tmp_path):
    ck = tmp_path / "ds.safetensors"
    code, so, se = inproc(capsys, "train", "--root", root, "--frames", T, "--downsample", 2, "--epochs", 1,
                          "--arch-arg", "hidden=8", "--out", ck, "-q")
    assert code == 0, se
    assert load(ck).in_shape == (2, 17, 17) and read_meta(ck)["info"]["downsample"] == 2
    code, so, se = inproc(capsys, "eval", "--model", ck, "--root", root, "--max-samples", 20)
    assert code == 0, se  # --downsample 2 comes from the checkpoint
    code, so, se = inproc(capsys, "eval", "--model", ck, "--root", root, "--downsample", 1)
    assert_user_error(code, se, match="expects input (2, 17, 17)")


# ---- compression options: each one's observable effect on the report and the checkpoint -------

def compress(capsys, tmp_path, ckpt, root, task, *argv, name="c"):
    """``osbc TASK`` on the test checkpoint; returns (report JSON, compressed model)."""
    out, rep = tmp_path / f"{name}.safetensors", tmp_path / f"{name}.json"
    code, _, se = inproc(capsys, task, "--model", ckpt, "--out", out, "--report", rep, *common(root), "-q", *argv)
    assert code == 0, se
    return json.loads(rep.read_text()), load(out)


def layer_sparsity(w):
    return float((w == 0).float().mean())


@pytest.mark.parametrize("solver", ["exact", "blocked", "restricted", "auto"])
def test_prune_solvers(ckpt, root, capsys, tmp_path, solver):
    r, m = compress(capsys, tmp_path, ckpt, root, "prune", "--sparsity", "0.8", "--solver", solver,
                    "--allocation", "uniform", "--no-eval")
    # auto: at 80% the restricted greedy on the 32x578 layer (its estimate is under exact's), the
    # exact greedy on the 10x32 one (exact's estimate is the smaller there)
    want = ["restricted", "exact"] if solver == "auto" else [solver, solver]
    assert [l["solver"] for l in r["report"]["layers"]] == want
    assert r["report"]["settings"]["solver"] == solver
    for w in (m.fc1.weight, m.fc2.weight):
        assert layer_sparsity(w) == pytest.approx(0.8, abs=0.01)


def test_quantize_exact_solver(ckpt, root, capsys, tmp_path):
    r, m = compress(capsys, tmp_path, ckpt, root, "quantize", "--bits", "3", "--solver", "exact", "--no-eval")
    assert [l["solver"] for l in r["report"]["layers"]] == ["exact", "exact"]
    assert [l["bits"] for l in r["report"]["layers"]] == [3, 3]
    for w in (m.fc1.weight, m.fc2.weight):
        assert len((w / w.abs().amax(1, keepdim=True)).mul(3).round().unique()) <= 7  # 2^3 - 1 levels


def test_sequential_calibration_changes_only_later_layers(ckpt, root, capsys, tmp_path):
    argv = ("--sparsity", "0.8", "--solver", "fast", "--allocation", "uniform", "--no-eval")
    _, dense_cal = compress(capsys, tmp_path, ckpt, root, "prune", *argv, name="d")
    r, seq_cal = compress(capsys, tmp_path, ckpt, root, "prune", *argv, "--calibration", "sequential", name="s")
    assert r["report"]["settings"]["calibration"] == "sequential"
    # the first layer sees the same inputs either way; the second sees the pruned first layer's spikes
    assert torch.equal(dense_cal.fc1.weight, seq_cal.fc1.weight)
    assert not torch.equal(dense_cal.fc2.weight, seq_cal.fc2.weight)


def test_global_allocation_shares_sparsity_unevenly(ckpt, root, capsys, tmp_path):
    r, m = compress(capsys, tmp_path, ckpt, root, "prune", "--sparsity", "0.9", "--allocation", "global",
                    "--solver", "fast", "--no-eval")
    per_layer = [l["sparsity"] for l in r["report"]["layers"]]
    assert r["report"]["settings"]["allocation"] == "global"
    assert r["report"]["sparsity"] == pytest.approx(0.9, abs=0.01)
    assert abs(per_layer[0] - per_layer[1]) > 0.02  # one OBS-loss threshold, not one sparsity per layer
    assert layer_sparsity(m.fc1.weight) == pytest.approx(per_layer[0], abs=1e-6)


def test_calibration_from_the_test_set(ckpt, root, capsys, tmp_path):
    r, _ = compress(capsys, tmp_path, ckpt, root, "quantize", "--bits", "4", "--method", "rtn", "--calib-from", "test")
    assert r["calib_from"] == "test"
    # evaluated on the test samples left after the 32 calibration samples (digits: 359 test samples)
    assert r["dense"]["samples"] == r["compressed"]["samples"] == 359 - 32


def nm_groups(w, m=4):
    """Nonzero weights in every group of ``m`` consecutive inputs of each row; a last, shorter
    group is padded with zeros (it may keep N of its weights too)."""
    pad = -w.shape[1] % m
    nz = torch.nn.functional.pad((w != 0).int(), (0, pad))
    return nz.reshape(w.shape[0], -1, m).sum(-1)


def nm_sparsity(d, n=2, m=4):
    """The 2:4 rule's sparsity of a row of ``d`` inputs: every group of m keeps n, a partial last
    group keeps at most n of its weights."""
    return (d // m * (m - n) + max(0, d % m - n)) / d


@pytest.fixture(scope="module")
def nm_pruned(ckpt, root, tmp_path_factory):
    out, rep = tmp_path_factory.mktemp("nm") / "nm.safetensors", tmp_path_factory.mktemp("nm") / "nm.json"
    code = cli.main(["prune", "--model", str(ckpt), "--nm", "2:4", "--solver", "fast", "--no-eval", "--out", str(out),
                     "--report", str(rep), *common(root), "-q"])
    assert code == 0
    return json.loads(rep.read_text()), load(out)


def test_nm_sparsity_pattern(nm_pruned):
    r, m = nm_pruned
    assert r["report"]["settings"]["allocation"] == "2:4"  # --nm alone: no --sparsity needed
    sizes = [m.fc1.weight.shape[1], m.fc2.weight.shape[1]]
    assert [l["sparsity"] for l in r["report"]["layers"]] == [pytest.approx(nm_sparsity(d), abs=1e-9) for d in sizes]
    assert int(nm_groups(m.fc2.weight).max()) <= 2  # fc2: at most 2 of every 4 consecutive weights


def test_nm_pattern_holds_when_inputs_are_not_a_multiple_of_m(nm_pruned):
    _, m = nm_pruned
    assert m.fc1.weight.shape[1] % 4 != 0
    assert int(nm_groups(m.fc1.weight).max()) <= 2
    assert (nm_groups(m.fc1.weight) == 2).all()  # every group keeps exactly N (the tail too: it has 2 inputs)


def scales_and_codes(w, qmax):
    """Per-row scale max|w|/qmax and the codes w/scale (integers when w sits on that grid)."""
    s = w.abs().amax(1, keepdim=True) / qmax
    return s, w / s


def test_quantize_per_layer_shares_one_scale(ckpt, root, capsys, tmp_path):
    _, per_layer = compress(capsys, tmp_path, ckpt, root, "quantize", "--bits", "4", "--method", "rtn", "--per",
                            "layer", "--no-eval", name="l")
    _, per_channel = compress(capsys, tmp_path, ckpt, root, "quantize", "--bits", "4", "--method", "rtn",
                              "--no-eval", name="c")
    for m, one_grid in ((per_layer, True), (per_channel, False)):
        w = m.fc1.weight
        # one scale per layer: at most 15 distinct values in the whole layer; per channel: many more
        assert (len(w.unique()) <= 15) == one_grid


def test_quantize_mse_shrinks_some_scales(ckpt, root, capsys, tmp_path):
    _, plain = compress(capsys, tmp_path, ckpt, root, "quantize", "--bits", "3", "--method", "rtn", "--no-eval",
                        name="p")
    _, mse = compress(capsys, tmp_path, ckpt, root, "quantize", "--bits", "3", "--method", "rtn", "--mse",
                      "--no-eval", name="m")
    dense = load(ckpt).fc1.weight
    top_plain, top_mse = plain.fc1.weight.abs().amax(1), mse.fc1.weight.abs().amax(1)
    assert torch.allclose(top_plain, dense.abs().amax(1))   # round to nearest keeps each row's maximum
    assert bool((top_mse < 0.99 * top_plain).any())         # the MSE fit clips some rows' outliers
    assert not bool((top_mse > top_plain * (1 + 1e-6)).any())


def on_pow2_grid(row, qmax):
    """The nonzero values of ``row`` are integers <= qmax times one power of two."""
    v = row[row != 0].detach().double().abs()
    for e in range(-40, 10):
        q = v / 2.0 ** e
        if bool((q - q.round()).abs().max() < 1e-4) and float(q.max()) <= qmax + 1e-4:
            return True
    return False


def test_quantize_pow2_scales(ckpt, root, capsys, tmp_path):
    _, pow2 = compress(capsys, tmp_path, ckpt, root, "quantize", "--bits", "4", "--method", "rtn", "--pow2",
                       "--no-eval", name="p2")
    _, plain = compress(capsys, tmp_path, ckpt, root, "quantize", "--bits", "4", "--method", "rtn", "--no-eval",
                        name="pl")
    assert all(on_pow2_grid(row, 7) for row in pow2.fc1.weight)
    assert not all(on_pow2_grid(row, 7) for row in plain.fc1.weight)  # the check can fail


@pytest.mark.parametrize("flag", ["--include", "--exclude"])
def test_include_exclude(ckpt, root, capsys, tmp_path, flag):
    r, m = compress(capsys, tmp_path, ckpt, root, "prune", "--sparsity", "0.9", "--solver", "fast",
                    "--allocation", "uniform", flag, "fc1", "--no-eval")
    touched = "fc1" if flag == "--include" else "fc2"
    left = "fc2" if touched == "fc1" else "fc1"
    assert [l["name"] for l in r["report"]["layers"]] == [touched]
    dense = load(ckpt)
    assert torch.equal(getattr(m, left).weight, getattr(dense, left).weight)
    assert layer_sparsity(getattr(m, touched).weight) == pytest.approx(0.9, abs=0.01)


def test_export_nir_takes_model_like_every_command(ckpt, capsys, tmp_path):
    nir = pytest.importorskip("nir")
    ck = tmp_path / "mlp.safetensors"
    ck.write_bytes(Path(ckpt).read_bytes())
    code, so, se = inproc(capsys, "export-nir", "--model", ck, "--dt", "1e-4")
    assert code == 0, se
    out = tmp_path / "mlp.nir"  # default: the checkpoint's name with .nir
    assert f"wrote {out}" in so
    g = nir.read(str(out))
    assert float(g.metadata["dt"]) == pytest.approx(1e-4)
    assert {"fc1", "fc2"} <= set(g.nodes)
    code, _, se = inproc(capsys, "export-nir", "--model", ck, "-o", tmp_path / "b.nir", tmp_path / "other.safetensors")
    assert_user_error(code, se, match="two checkpoints")
    code, _, se = inproc(capsys, "export-nir", "-o", tmp_path / "c.nir")
    assert_user_error(code, se, match="-m/--model")
    assert not (tmp_path / "b.nir").exists() and not (tmp_path / "c.nir").exists()
