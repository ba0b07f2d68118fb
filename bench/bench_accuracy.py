"""Whole-model accuracy-vs-time frontier of the pruning solvers: held-out test accuracy of the N-MNIST
MLP (``nmnist_mlp``, 2312 -> 256 -> 10 LIF) pruned in one shot by ``osbc.prune(method="osbc")``
with each solver (exact greedy, fast = SparseGPT sweep, restricted greedy, auto) at each sparsity.

Data sets: ``digits`` (the offline digits events, T = 10, as ``osbc demo``) and ``temporal``
(bench/temporal_task.py: classes that differ only in spike timing, T = 20). On each the MLP is
trained (seeded; the best epoch by accuracy on 10% of the training split held out) and its
weights cached as safetensors under ``--cache``; calibration is ``--calib`` stratified samples of
the training split; the test split is only ever evaluated, never used to choose anything.

Per point: test accuracy, the report's relative membrane error (mean over the layers, on the
calibration set), seconds of the whole ``osbc.prune`` call (Hessians, solvers, error measurement)
and of the solvers alone, and peak memory above the start (CPU: resident set sampled every 5 ms;
CUDA: the allocator's peak; bench_frontier.Peak).

  python bench/bench_accuracy.py --threads 1                    # both data sets, 90/95/97/99%, all solvers
  python bench/bench_accuracy.py --datasets temporal --solvers fast,restricted --sparsities 0.97
  python bench/bench_accuracy.py --threads 1 --json acc.json --png docs/accuracy_frontier.png
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DATASETS = ("digits", "temporal")
SOLVERS = ("exact", "fast", "restricted", "auto")
# the training recipe of osbc demo: Adam at 5e-3 with a cosine schedule, MSE on the firing rate
LR, VAL_FRACTION = 5e-3, 0.1
EPOCHS = {"digits": 8, "temporal": 10}
FRAMES_DIGITS = 10


def load_data(name: str, seed: int, limit: int | None):
    """(train, test) TensorSets of a data set; ``limit`` caps each split (stratified, seeded), and
    the description of what was loaded that keys the cached model."""
    from osbc import data as D
    from temporal_task import DEFAULTS, make_task

    if name == "digits":
        train = D.in_memory(D.load_dataset("digits", train=True, frames=FRAMES_DIGITS))
        test = D.in_memory(D.load_dataset("digits", train=False, frames=FRAMES_DIGITS))
        desc = dict(frames=FRAMES_DIGITS)
    elif name == "temporal":
        # the generator balances the classes itself: a limit takes fewer samples of every class
        k = DEFAULTS["classes"]
        n_tr, n_te = (3000, 1000) if limit is None else (k * max(1, limit // k),) * 2
        train, test = make_task(seed, n_tr, n_te)
        limit = None
        desc = dict(DEFAULTS, train=n_tr, test=n_te)
    else:
        from osbc.errors import OsbcError
        raise OsbcError(f"--datasets: unknown data set {name!r}; choose from {', '.join(DATASETS)}")
    if limit is not None:
        train, test = (_cap(ds, limit, seed) for ds in (train, test))
    return train, test, dict(desc, dataset=name, seed=seed, limit=limit)


def _cap(ds, n: int, seed: int):
    from osbc import data as D
    return ds if n >= len(ds) else D.in_memory(D.calibration_split(ds, n, seed)[0])


def trained_model(train, desc: dict, epochs: int, seed: int, cache: str, threads: int | None):
    """nmnist_mlp trained on ``train`` (its weights read from ``cache`` when trained before with the
    same data, recipe and seed); returns (model, training record or None when cached)."""
    import torch
    from safetensors.torch import load_file, save_file
    import osbc
    from osbc import data as D

    key = json.dumps(dict(desc, model="nmnist_mlp", epochs=epochs, lr=LR, val=VAL_FRACTION), sort_keys=True)
    path = os.path.join(cache, f"{desc['dataset']}_mlp_{hashlib.sha1(key.encode()).hexdigest()[:12]}.safetensors")
    torch.manual_seed(seed)
    model = osbc.models.build("nmnist_mlp", in_shape=tuple(train.X.shape[2:]), classes=train.num_classes)
    if os.path.exists(path):
        model.load_state_dict(load_file(path))
        return model.eval(), None
    val, fit = D.calibration_split(train, max(train.num_classes, round(VAL_FRACTION * len(train))), seed)
    res = osbc.train(model, D.materialize(fit), D.materialize(val), epochs=epochs, lr=LR, seed=seed,
                     progress=False, log=None, threads=threads)
    os.makedirs(cache, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return model, res.to_dict()


def prune_point(model, calib, test, sparsity: float, solver: str, args, device) -> dict:
    import osbc
    from osbc.cli.common import mean_err
    from bench_frontier import Peak

    kw = {} if args.auto_seconds is None else {"auto_seconds": args.auto_seconds}
    with Peak(device) as pk:
        t0 = time.perf_counter()
        res = osbc.prune(model, calib, sparsity, method="osbc", solver=solver, seed=args.seed, device=device,
                         verbose=False, **kw)
        sec = time.perf_counter() - t0
    acc = osbc.evaluate(res.model, test, device=device, stats=False).accuracy
    rep = res.report
    return dict(sparsity=sparsity, solver=solver, test_accuracy=acc, membrane_error=mean_err(rep),
                seconds=sec, solve_seconds=sum(l.seconds for l in rep.layers), peak_mb=pk.mb,
                achieved_sparsity=rep.sparsity, layer_solvers={l.name: l.solver for l in rep.layers})


def run_dataset(name: str, args, device) -> tuple[dict, list[dict]]:
    import osbc
    from osbc import data as D

    t0 = time.perf_counter()
    train, test, desc = load_data(name, args.seed, args.limit)
    epochs = args.epochs or EPOCHS[name]
    model, record = trained_model(train, desc, epochs, args.seed, args.cache, args.threads)
    test_xy = (test.X, test.y)
    dense = osbc.evaluate(model, test_xy, device=device, stats=False).accuracy
    info = dict(dataset=name, train_samples=len(train), test_samples=len(test), frames=int(train.X.shape[1]),
                epochs=epochs, dense_test_accuracy=dense, training=record, cached=record is None,
                setup_seconds=time.perf_counter() - t0)
    print(f"{name}: {len(train)} train / {len(test)} test samples, T={info['frames']}, dense test accuracy "
          f"{100 * dense:.2f}% ({'cached model' if record is None else f'trained {epochs} epochs'})", flush=True)
    calib, _ = D.calibration_inputs(train, min(args.calib, len(train) - 1), args.seed)
    rows = []
    for sp in args.sparsities:
        for sv in args.solvers:
            r = dict(dataset=name, **prune_point(model, calib, test_xy, sp, sv, args, device))
            rows.append(r)
            used = "/".join(r["layer_solvers"].values())
            print(f"{name:>9} {sp:5.2f} {sv:>10} ({used:>17})  acc {100 * r['test_accuracy']:6.2f}%  "
                  f"mem.err {r['membrane_error']:.4g}  {r['seconds']:7.2f} s  {r['peak_mb']:6.0f} MB", flush=True)
    return info, rows


def plot(infos: list[dict], rows: list[dict], path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, axes = plt.subplots(1, len(infos), figsize=(5 * len(infos), 3.8), squeeze=False)
    # auto runs restricted on the large layer, so its marker is drawn hollow and larger around it
    style = dict(exact=dict(marker="o"), fast=dict(marker="s"), restricted=dict(marker="D"),
                 auto=dict(marker="o", ms=11, mfc="none"))
    for ax, info in zip(axes[0], infos):
        name = info["dataset"]
        for sv in dict.fromkeys(r["solver"] for r in rows):
            pts = sorted((r for r in rows if r["dataset"] == name and r["solver"] == sv), key=lambda r: r["sparsity"])
            ax.plot([r["seconds"] for r in pts], [100 * r["test_accuracy"] for r in pts], ls="-", lw=0.6,
                    label=sv, **style.get(sv, dict(marker="o")))
            for r in pts if sv != "auto" else []:
                ax.annotate(f"{100 * r['sparsity']:g}%", (r["seconds"], 100 * r["test_accuracy"]), fontsize=6,
                            xytext=(4, -8), textcoords="offset points")
        ax.axhline(100 * info["dense_test_accuracy"], color="grey", ls="--", lw=0.8, label="dense")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"{name} (nmnist_mlp, T={info['frames']}, {info['test_samples']} test samples)", fontsize=9)
        ax.set_xlabel("seconds of osbc.prune")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save(infos, rows, args, device, path: str):
    import torch
    meta = dict(device=str(device), threads=torch.get_num_threads(), cpus=os.cpu_count(), loadavg=os.getloadavg(),
                command=" ".join(sys.argv), calib_samples=args.calib, seed=args.seed)
    with open(path, "w") as f:
        json.dump(dict(meta=meta, datasets=infos, rows=rows), f, indent=1)


def _list(kind, choices=None):
    def parse(s: str):
        items = [kind(v) for v in s.split(",") if v]
        bad = [v for v in items if choices is not None and v not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(f"{s!r}: give a comma-separated list" +
                                             (f" from {', '.join(choices)}" if choices else ""))
        return items
    return parse


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", type=_list(str, DATASETS), default=list(DATASETS),
                    help=f"comma-separated, from {', '.join(DATASETS)} (default: all)")
    ap.add_argument("--sparsities", type=_list(float), default=[0.9, 0.95, 0.97, 0.99],
                    help="comma-separated (default: 0.9,0.95,0.97,0.99)")
    ap.add_argument("--solvers", type=_list(str, SOLVERS), default=list(SOLVERS),
                    help=f"comma-separated, from {', '.join(SOLVERS)} (default: all)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--device", default="cpu", help="where to prune and evaluate (cpu, cuda, ...)")
    ap.add_argument("--calib", type=int, default=256, help="calibration samples from the training split")
    ap.add_argument("--epochs", type=int, default=None,
                    help=f"training epochs (default: {', '.join(f'{k} {v}' for k, v in EPOCHS.items())})")
    ap.add_argument("--limit", type=int, default=None,
                    help="at most this many samples per split (a quick run; the temporal task draws that many)")
    ap.add_argument("--auto-seconds", type=float, default=None,
                    help="solver=auto's per-layer time budget (default: osbc's)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the temporal task, the training and the calibration draw")
    ap.add_argument("--cache", default=os.path.join(os.environ.get("OSBC_CACHE", os.path.expanduser("~/.cache/osbc")),
                                                    "bench"), help="where the trained models are kept")
    ap.add_argument("--json", default="bench_accuracy.json", help="the results, rewritten after each data set")
    ap.add_argument("--png", default="bench_accuracy.png", help="test accuracy vs seconds ('' for no plot)")
    args = ap.parse_args(argv)
    import torch
    from osbc.device import resolve_device
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    infos, rows = [], []
    for name in args.datasets:
        info, r = run_dataset(name, args, device)
        infos.append(info)
        rows += r
        save(infos, rows, args, device, args.json)     # a long run leaves its finished data sets
    if args.png:
        plot(infos, rows, args.png)
    load = os.getloadavg()
    print(f"wrote {args.json}{', ' + args.png if args.png else ''}; load average {load[0]:.1f} {load[1]:.1f} "
          f"{load[2]:.1f}")
    return dict(datasets=infos, rows=rows)


if __name__ == "__main__":
    main()
