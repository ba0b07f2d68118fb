"""The osbc command under bad conditions: only user errors become one line, internal errors keep
their traceback, Ctrl-C and memory exhaustion end cleanly, every output path is checked before any
work, and outputs are written all or none."""

import errno
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from osbc import checkpoint, models, trace
from osbc.cli import outputs
from osbc.errors import OsbcError

from test_cli import assert_user_error, inproc

cli_main = importlib.import_module("osbc.cli.main")  # the module; osbc.cli.main is also the function
SRC = str(Path(__file__).resolve().parents[1] / "src")
#: a folder nobody (root included) can create files in
UNWRITABLE = Path("/proc")


@pytest.fixture(autouse=True)
def _cache_env(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("OSBC_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """An untrained digits MLP (no training needed to exercise the error paths)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ck") / "tiny.safetensors"
    checkpoint.save(models.build("nmnist_mlp", in_shape=(2, 34, 34), hidden=8), path, data="digits", frames=2)
    return path


# ---- which errors are one line ----------------------------------------------------------------

def test_internal_value_error_keeps_its_traceback(monkeypatch, capsys):
    def broken(*a, **k):
        raise ValueError("internal bug")

    monkeypatch.setattr(trace, "find_modules", broken)
    with pytest.raises(ValueError, match="internal bug"):
        cli_main.main(["info", "--arch", "nmnist_mlp"])


def test_osbc_error_from_deep_code_is_one_line(monkeypatch, capsys):
    def refuses(*a, **k):
        raise OsbcError("layer fc1: unsupported neuron")

    monkeypatch.setattr(trace, "find_modules", refuses)
    code, _, err = inproc(capsys, "info", "--arch", "nmnist_mlp")
    assert_user_error(code, err, match="layer fc1: unsupported neuron")


def test_debug_env_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("OSBC_DEBUG", "1")
    with pytest.raises(OsbcError, match="unknown --arch"):
        cli_main.main(["info", "--arch", "resnet50"])


@pytest.mark.parametrize("exc", [MemoryError(), RuntimeError("DefaultCPUAllocator: can't allocate memory: 1e12 bytes")])
def test_out_of_memory_is_one_line(monkeypatch, capsys, exc):
    def exhausted(*a, **k):
        raise exc

    monkeypatch.setattr(trace, "find_modules", exhausted)
    code, _, err = inproc(capsys, "info", "--arch", "nmnist_mlp")
    assert_user_error(code, err, match="out of memory")
    assert "--frames" in err and "--batch-size" in err


def test_other_runtime_errors_keep_their_traceback(monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("shape mismatch in a kernel")

    monkeypatch.setattr(trace, "find_modules", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        cli_main.main(["info", "--arch", "nmnist_mlp"])


# ---- Ctrl-C ------------------------------------------------------------------------------------

def test_ctrl_c_during_a_command(monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(trace, "find_modules", interrupted)
    code, out, err = inproc(capsys, "info", "--arch", "nmnist_mlp")
    assert code == 130 and err == "osbc: interrupted\n"


def test_ctrl_c_while_building_the_parser(monkeypatch, capsys):
    """The commands' modules are imported inside main's guard, so an early Ctrl-C is one line too."""
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_main, "build_parser", interrupted)
    assert cli_main.main(["--help"]) == 130
    assert capsys.readouterr().err == "osbc: interrupted\n"


def test_importing_the_command_line_is_light():
    """Importing osbc.cli and building its parser loads none of the heavy modules; the commands
    import them when they run, inside main's Ctrl-C guard."""
    code = ("import sys, osbc.cli\n"
            "osbc.cli.build_parser()\n"
            "heavy = ['osbc.compress', 'osbc.training', 'osbc.data', 'osbc.checkpoint', 'osbc.trace',\n"
            "         'osbc.solvers', 'safetensors', 'matplotlib', 'sklearn']\n"
            "print([m for m in heavy if m in sys.modules])\n")
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


# ---- bad invocations that used to print tracebacks ---------------------------------------------

@pytest.mark.parametrize("argv", [
    ["info", "--arch", "nmnist_mlp", "--arch-arg", "hidden=1000000000"],
    ["info", "--arch", "nmnist_mlp", "--arch-arg", "hidden=-1"],
    ["eval", "--model", "m.safetensors", "--frames", "100000"],
    ["train", "--arch-arg", "in_shape=[2,10,10]", "--frames", "2", "--epochs", "1", "--out", "m.safetensors"],
    ["prune", "--model", "m.safetensors", "-s", "0.5", "-o", "p.safetensors", "--batch-size", "100000000"],
])
def test_bad_invocations_are_one_line(capsys, tmp_path, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    code, _, err = inproc(capsys, *argv)
    assert code != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("osbc: error: "), err
    assert not (tmp_path / "m.safetensors").exists()


def test_frames_bound_names_the_option(capsys):
    code, _, err = inproc(capsys, "eval", "--model", "m.safetensors", "--frames", "100000")
    assert_user_error(code, err, want_code=2, match="--frames: 100000 is too large: at most 1000")


# ---- every output path is checked before any work ---------------------------------------------

@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a command starts working (loads a model or data, builds a model)."""
    from osbc.cli import common

    def work(*a, **k):
        raise AssertionError("the command started working before checking its outputs")

    for name in ("load_model", "build_model", "dataset", "device"):
        monkeypatch.setattr(common, name, work)


@pytest.mark.parametrize("argv,culprit", [
    (["prune", "-s", "0.5", "-o", "{tmp}/p.safetensors", "--report", "{bad}/r.json"], "{bad}"),
    (["prune", "-s", "0.5", "-o", "{bad}/p.safetensors"], "{bad}"),
    (["quantize", "-b", "4", "-o", "{tmp}/q.safetensors", "--report", "{bad}/r.json"], "{bad}"),
    (["eval", "--json", "{bad}/e.json"], "{bad}"),
    (["info", "--json", "{bad}/i.json"], "{bad}"),
    (["train", "-o", "{bad}/t.safetensors"], "{bad}"),
    (["sweep", "--bits", "4", "-o", "{bad}/sweep"], "{bad}"),
    (["demo", "-o", "{bad}/demo"], "{bad}"),
])
def test_unwritable_outputs_fail_before_any_work(capsys, tmp_path, tiny_ckpt, no_work, argv, culprit):
    argv = [a.format(tmp=tmp_path, bad=UNWRITABLE) for a in argv]
    if argv[0] not in ("train", "demo"):
        argv += ["--model", str(tiny_ckpt)]
    code, _, err = inproc(capsys, *argv)
    assert_user_error(code, err, match=f"folder {culprit.format(bad=UNWRITABLE)} is not writable")
    assert os.listdir(tmp_path) == []


# ---- all outputs or none ------------------------------------------------------------------------

def test_write_all_writes_every_file_with_the_usual_permissions(tmp_path):
    seen = []

    def writer(text):
        def write(tmp):
            seen.append(Path(tmp))
            Path(tmp).write_text(text)
        return write

    a, b = tmp_path / "a.json", tmp_path / "sub" / "b.png"
    outputs.write_all([(a, writer("A")), (b, writer("B"))])
    assert a.read_text() == "A" and b.read_text() == "B"
    assert [p.suffix for p in seen] == [".json", ".png"]  # writers that go by the extension work
    mask = os.umask(0)
    os.umask(mask)
    assert a.stat().st_mode & 0o777 == 0o666 & ~mask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "sub"]


def test_write_all_leaves_nothing_when_a_later_output_fails(tmp_path):
    keep = tmp_path / "old.json"
    keep.write_text("previous run")
    made = tmp_path / "new"  # a folder write_all has to create

    def full_disk(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OsbcError, match="no output was written"):
        outputs.write_all([(keep, lambda tmp: Path(tmp).write_text("replaced")),
                           (made / "x.bin", lambda tmp: Path(tmp).write_bytes(b"x")),
                           (tmp_path / "last.txt", full_disk)])
    assert keep.read_text() == "previous run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json"]  # no temporary files, no new folder


def test_failed_report_write_removes_the_checkpoint(capsys, tmp_path, tiny_ckpt, monkeypatch):
    from osbc.cli import prune_quantize

    def no_space(text):
        def write(tmp):
            raise OSError(errno.ENOSPC, "No space left on device")
        return write

    monkeypatch.setattr(prune_quantize, "text_writer", no_space)
    work = tmp_path / "work"
    work.mkdir()
    out, rep = work / "p.safetensors", work / "r.json"
    code, _, err = inproc(capsys, "prune", "--model", tiny_ckpt, "-s", "0.5", "--method", "magnitude", "--no-eval",
                          "--calib-samples", 16, "--frames", 2, "--device", "cpu", "-o", out, "--report", rep, "-q")
    assert_user_error(code, err, match="No space left on device")
    assert os.listdir(work) == []
