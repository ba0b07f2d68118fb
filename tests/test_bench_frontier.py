"""bench/bench_frontier.py end to end on a small synthetic layer: every solver's row, exact
sparsity (the bench asserts it), and the restricted greedy no worse than the sweep."""
import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def test_frontier_small_layer(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.syspath_prepend(BENCH)
    import bench_frontier
    out = tmp_path / "f.json"
    bench_frontier.main(["--shapes", "24x300", "--sparsities", "0.9,0.97", "--variants", "forward:1.5",
                         "--repeat", "2", "--json", str(out), "--png", str(tmp_path / "f.png")])
    rows = json.loads(out.read_text())["rows"]
    assert {(r["solver"], r["sparsity"]) for r in rows} == {
        (s, sp) for s in ("exact", "fast", "restricted", "forward1.5") for sp in (0.9, 0.97)}
    by = {(r["solver"], r["sparsity"]): r for r in rows}
    for sp in (0.9, 0.97):
        assert by["exact", sp]["ratio"] == 1.0
        assert by["restricted", sp]["error"] <= by["fast", sp]["error"] * (1 + 1e-6)
        assert by["restricted", sp]["ratio"] < 1.1
    assert (tmp_path / "f.png").stat().st_size > 0
    # --max-memory reaches the solvers (chunks of a row or two) and changes no result
    import osbc.solvers as S
    seen = []
    real = S.prune_restricted
    monkeypatch.setattr(S, "prune_restricted", lambda *a, **k: seen.append(k.get("max_memory")) or real(*a, **k))
    bench_frontier.main(["--shapes", "24x300", "--sparsities", "0.9", "--variants", "", "--skip-exact",
                         "--max-memory", "0.05", "--json", str(out)])
    small = {r["solver"]: r["error"] for r in json.loads(out.read_text())["rows"]}
    assert int(0.05 * 2 ** 20) in seen          # (the warm-up call takes the default)
    assert small["restricted"] == pytest.approx(by["restricted", 0.9]["error"], rel=1e-6)
    sys.modules.pop("bench_frontier", None)
