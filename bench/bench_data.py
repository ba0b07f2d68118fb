"""Event-data throughput: reading each format, frame-cache keys, integrating frames, building and
loading Digits.

    python bench/bench_data.py            # full run (about a minute on 2 cores)
    python bench/bench_data.py --quick    # smaller files, no MLP check

Figures are best-of-`--repeat` times on synthetic files written to a temporary folder; nothing
is downloaded. Rates use the CPU time of this process (``--clock wall`` for wall time), which
stays meaningful on a machine shared with other jobs; both are printed. The Digits figures use a
fresh cache folder (cold), then the same folder again (warm).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from osbc.data import (
    Digits,
    events_to_frames,
    make_events,
    read_aedat20,
    read_aedat31,
    read_nmnist,
    saccade_events,
    upsample_images,
    write_aedat20,
    write_aedat31,
    write_nmnist,
)


CLOCK = "cpu"
_last_wall = 0.0


class _Timer:
    """Measures CPU and wall time of a block; `.seconds` is the one chosen by --clock."""

    def __enter__(self):
        self.cpu, self.wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.cpu, self.wall = time.process_time() - self.cpu, time.perf_counter() - self.wall

    @property
    def seconds(self):
        return self.cpu if CLOCK == "cpu" else self.wall


def best(fn, repeat):
    global _last_wall
    runs = []
    for _ in range(repeat):
        with _Timer() as t:
            fn()
        runs.append(t)
    pick = min(runs, key=lambda r: r.seconds)
    _last_wall = pick.wall
    return pick.seconds


def timed(fn):
    return best(fn, 1)


def events(n, size, t_max, seed=0):
    rng = np.random.default_rng(seed)
    return make_events(rng.integers(0, size, n), rng.integers(0, size, n),
                       np.sort(rng.integers(0, t_max, n)), rng.integers(0, 2, n))


def row(results, what, seconds, n_events=None, unit=None, n_units=None):
    results.append({"what": what, "clock": CLOCK, "seconds": seconds, "wall_seconds": _last_wall,
                    "events": n_events, "events_per_s": n_events / seconds if n_events else None,
                    "unit": unit, "per_s": n_units / seconds if n_units else None})
    rate = f"{n_events / seconds / 1e6:8.1f} M events/s" if n_events else " " * 19
    extra = f"   {n_units / seconds:9.0f} {unit}/s" if n_units else ""
    print(f"{what:<56} {seconds * 1e3:9.1f} ms (wall {_last_wall * 1e3:9.1f})  {rate}{extra}", flush=True)


def bench_readers(tmp: Path, quick: bool, repeat: int, results: list) -> None:
    n_files, per_file = (50, 4000) if quick else (500, 4000)
    nm = [events(per_file, 34, 300_000, seed=i) for i in range(n_files)]
    for i, ev in enumerate(nm):
        write_nmnist(tmp / "nmnist" / f"{i:05d}.bin", ev)
    paths = sorted((tmp / "nmnist").glob("*.bin"))
    row(results, f"read_nmnist, {n_files} files of {per_file} events",
        best(lambda: [read_nmnist(p) for p in paths], repeat), n_files * per_file, "files", n_files)
    big = 1_000_000 if quick else 5_000_000
    write_nmnist(tmp / "big.bin", events(big, 34, 1 << 23))
    row(results, f"read_nmnist, one file of {big:,} events", best(lambda: read_nmnist(tmp / "big.bin"), repeat), big)

    ges = 1_000_000 if quick else 5_000_000  # a DVS128 Gesture recording holds a few million
    write_aedat31(tmp / "user01_led.aedat", events(ges, 128, 70_000_000), events_per_packet=4096)
    row(results, f"read_aedat31, {ges:,} events in 4096-event packets",
        best(lambda: read_aedat31(tmp / "user01_led.aedat"), repeat), ges)

    cif = 200_000  # about one CIFAR10-DVS recording
    n_cif = 5 if quick else 20
    for i in range(n_cif):
        write_aedat20(tmp / "cifar" / f"cifar10_cat_{i}.aedat", events(cif, 128, 1_300_000, seed=i))
    cpaths = sorted((tmp / "cifar").glob("*.aedat"))
    row(results, f"read_aedat20, {n_cif} files of {cif:,} events",
        best(lambda: [read_aedat20(p) for p in cpaths], repeat), n_cif * cif, "files", n_cif)


def bench_cache_keys(tmp: Path, repeat: int, results: list) -> None:
    """The frame cache's key for a file in a folder: stat, plus a hash of the file's first and last
    64 KiB when the stat changed (cold); a warm key is the stat alone. Against a full parse."""
    from osbc.data.archive import open_source

    names = sorted(p.name for p in (tmp / "cifar").glob("*.aedat"))  # written by bench_readers
    n = len(names)
    row(results, f"cache keys, cold (stat + blake2b of 2x64 KiB), {n} files",
        best(lambda: [open_source(tmp / "cifar", None).key(m) for m in names], repeat), None, "files", n)
    warm = open_source(tmp / "cifar", None)
    row(results, f"cache keys, warm (stat only), {n} files",
        best(lambda: [warm.key(m) for m in names], repeat), None, "files", n)
    row(results, f"for scale: read_aedat20 of the same {n} files",
        best(lambda: [read_aedat20(tmp / "cifar" / m) for m in names], repeat), None, "files", n)


def bench_frames(quick: bool, repeat: int, results: list) -> None:
    nm = events(4000, 34, 300_000)
    k = 200 if quick else 1000
    for T in (20, 100):
        for split in ("time", "number"):
            row(results, f"events_to_frames N-MNIST sample (4000 ev), T={T}, {split}",
                best(lambda: [events_to_frames(nm, (34, 34), T, split) for _ in range(k)], repeat),
                4000 * k, "samples", k)
    dvs = events(300_000, 128, 6_000_000)
    for T, ds in ((20, 1), (20, 2), (10, 4)):
        for split in ("time", "number"):
            row(results, f"events_to_frames DVS sample (300k ev), T={T}, {split}, /{ds}",
                best(lambda: events_to_frames(dvs, (128, 128), T, split, ds), repeat), 300_000, "samples", 1)


def bench_saccade(repeat: int, results: list) -> None:
    from sklearn.datasets import load_digits

    imgs = upsample_images(load_digits().images)
    n_ev = []
    sec = best(lambda: n_ev.append(sum(e.size for e in saccade_events(imgs))), repeat)
    row(results, f"saccade_events, {len(imgs)} digits 28x28 -> 34x34", sec, n_ev[0], "images", len(imgs))


def bench_digits(tmp: Path, quick: bool, results: list) -> dict:
    cache = tmp / "cache"  # .bin files go to cache/digits, frames to cache/frames
    d: dict = {}

    def build():
        d["train"] = Digits(train=True, frames=20, cache=cache)  # frame cache on, to time it
        d["test"] = Digits(train=False, frames=20, cache=cache)

    def frames():
        d["X"], d["y"] = d["train"].tensors()
        d["Xt"], d["yt"] = d["test"].tensors()

    def nocache():  # the same .bin files, frames integrated on every access
        root = d["train"].root.parent
        a = Digits(root, train=True, frames=20, cache=False).tensors()
        b = Digits(root, train=False, frames=20, cache=False).tensors()
        return a, b

    row(results, "Digits build, cold (simulate, write 1797 .bin, index)", timed(build))
    n = len(d["train"]) + len(d["test"])
    row(results, "Digits T=20 frames, cold (read .bin, integrate, cache)", timed(frames), None, "samples", n)
    row(results, "Digits T=20, warm (reuse .bin files and frame cache)",
        timed(lambda: (build(), frames())), None, "samples", n)
    row(results, "Digits T=20, cache=False (read .bin + integrate)", timed(nocache), None, "samples", n)
    n_ev = sum(d["train"].events(i).size for i in range(len(d["train"])))
    print(f"  Digits: {len(d['train'])} train / {len(d['test'])} test, "
          f"{n_ev / len(d['train']):.0f} events per sample on average")
    return d


def mlp_check(d: dict) -> float:
    """MLP (2312-128-10) on the time-summed frames, the rate code a first SNN layer sees."""
    import torch

    torch.manual_seed(0)
    a, at = d["X"].sum(1).flatten(1), d["Xt"].sum(1).flatten(1)
    mu, sd = a.mean(0), a.std(0) + 1e-3
    a, at = (a - mu) / sd, (at - mu) / sd
    net = torch.nn.Sequential(torch.nn.Linear(a.shape[1], 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-3, weight_decay=1e-4)
    t = time.perf_counter()
    for _ in range(30):
        perm = torch.randperm(len(a))
        for i in range(0, len(a), 64):
            b = perm[i:i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(a[b]), d["y"][b]).backward()
            opt.step()
    with torch.no_grad():
        acc = (net(at).argmax(1) == d["yt"]).float().mean().item()
    print(f"  MLP on time-summed Digits frames: test accuracy {acc:.3f} ({time.perf_counter() - t:.1f} s)")
    return acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller files, skip the MLP check")
    ap.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="time the rates use")
    args = ap.parse_args()
    global CLOCK
    CLOCK = args.clock
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; rates use {CLOCK} time")
    results: list = []
    with tempfile.TemporaryDirectory(prefix="osbc-bench-") as tmp:
        tmp = Path(tmp)
        print("== readers")
        bench_readers(tmp, args.quick, args.repeat, results)
        print("== frame cache keys")
        bench_cache_keys(tmp, args.repeat, results)
        print("== frame integration")
        bench_frames(args.quick, args.repeat, results)
        print("== events from images, Digits")
        bench_saccade(args.repeat, results)
        d = bench_digits(tmp, args.quick, results)
        acc = None if args.quick else mlp_check(d)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "digits_mlp_accuracy": acc}, indent=1))


if __name__ == "__main__":
    main()
