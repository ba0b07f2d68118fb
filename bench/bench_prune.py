"""End-to-end timing of osbc.prune on the paper's N-MNIST MLP (2312 -> 256 -> 10).

The issue's reference workload: prune to 97 % with N=256 calibration samples at T=20. Each
configuration runs in its own subprocess so peak memory (max RSS) is that run's alone.

The calibration spikes are random (per-pixel rates up to 0.2), with a ``--dead`` share of pixels
that never fire. Silent inputs are removed up front, so the exact solver's cost grows about as the
cube of the live inputs: the share in real N-MNIST calibration sets (silent border pixels) is not
measured here, and ``--dead 0`` is the worst case.

    python bench/bench_prune.py                  # exact and fast solvers
    python bench/bench_prune.py --dead 0         # every pixel live
    python bench/bench_prune.py --solvers fast --samples 128 --json out.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CHILD = r"""
import json, resource, sys, time, torch
from torch import nn
import osbc
from osbc import snn
cfg = json.loads(sys.argv[1])
torch.manual_seed(0)
model = nn.Sequential(nn.Flatten(2), nn.Linear(2312, 256, bias=False), snn.LIF(2.0),
                      nn.Linear(256, 10, bias=False), snn.LIF(2.0))
with torch.no_grad():
    for m in model:
        if isinstance(m, nn.Linear):
            m.weight.mul_(4.0)
g = torch.Generator().manual_seed(1)
rate = torch.rand(2, 34, 34, generator=g) * 0.2
rate[torch.rand(2, 34, 34, generator=g) < cfg["dead"]] = 0    # silent pixels
calib = (torch.rand(cfg["samples"], cfg["frames"], 2, 34, 34, generator=g) < rate).float()
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
res = osbc.prune(model, calib, sparsity=cfg["sparsity"], solver=cfg["solver"], method=cfg["method"],
                 allocation="uniform", device="cpu", verbose=False)
wall = time.perf_counter() - t0
rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps(dict(cfg, seconds=wall, layer_seconds={l.name: l.seconds for l in res.report},
                      membrane_error={l.name: l.membrane_error for l in res.report},
                      peak_rss_mb=rss1 / 1024, rss_before_mb=rss0 / 1024)))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--solvers", default="exact,fast")
    ap.add_argument("--method", default="osbc")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--sparsity", type=float, default=0.97)
    ap.add_argument("--dead", type=float, default=0.3, help="share of pixels that never fire")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    rows = []
    for solver in args.solvers.split(","):
        cfg = dict(solver=solver, method=args.method, samples=args.samples, frames=args.frames,
                   sparsity=args.sparsity, dead=args.dead)
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(out.stderr)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"{solver:>6}: {r['seconds']:7.2f} s total  (fc: {r['layer_seconds']})  peak RSS "
              f"{r['peak_rss_mb']:.0f} MB (after imports+data {r['rss_before_mb']:.0f} MB)  "
              f"membrane err {r['membrane_error']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
