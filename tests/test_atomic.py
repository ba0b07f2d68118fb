"""Atomic writes: complete or absent, also when the process is killed with SIGTERM mid-write."""

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from osbc.atomic import atomic_write

_CHILD = r"""
import sys, time
from osbc.atomic import atomic_write

def slow(tmp):
    with open(tmp, "wb") as f:
        f.write(b"half a file")
        f.flush()
        print("writing", flush=True)
        time.sleep(30)
        f.write(b" and the rest")

atomic_write(sys.argv[1], slow)
"""


def _killed_mid_write(tmp_path, sig, pre=""):
    out = tmp_path / "out.bin"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    p = subprocess.Popen([sys.executable, "-c", pre + _CHILD, str(out)], stdout=subprocess.PIPE, env=env)
    try:
        assert p.stdout.readline().strip() == b"writing"
        assert [f.name for f in tmp_path.iterdir() if f.name.endswith(".tmp")]  # the temporary exists now
        p.send_signal(sig)
        rc = p.wait(timeout=20)
    finally:
        p.kill()
        p.wait()
    return rc, sorted(f.name for f in tmp_path.iterdir())


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name != "posix", reason="POSIX signals")
def test_sigterm_mid_write_leaves_nothing_and_still_kills(tmp_path):
    rc, left = _killed_mid_write(tmp_path, signal.SIGTERM)
    assert rc == -signal.SIGTERM  # died of the signal, as without the cleanup
    assert left == []


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_sigterm_with_a_python_handler_raising_cleans_up(tmp_path):
    pre = "import signal, sys\nsignal.signal(signal.SIGTERM, lambda s, f: sys.exit(3))\n"
    rc, left = _killed_mid_write(tmp_path, signal.SIGTERM, pre)
    assert rc == 3 and left == []


def test_handlers_restored_and_thread_writes_work(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    atomic_write(tmp_path / "a.txt", lambda tmp: Path(tmp).write_text("a"))
    assert signal.getsignal(signal.SIGTERM) is before
    errors = []

    def in_thread():
        try:
            atomic_write(tmp_path / "b.txt", lambda tmp: Path(tmp).write_text("b"))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    assert not errors
    assert sorted(f.name for f in tmp_path.iterdir()) == ["a.txt", "b.txt"]
    assert (tmp_path / "b.txt").read_text() == "b"


def test_failed_write_removes_the_temporary(tmp_path):
    def boom(tmp):
        Path(tmp).write_text("partial")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "x", boom)
    assert list(tmp_path.iterdir()) == []
