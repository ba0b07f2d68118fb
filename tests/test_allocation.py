"""Layer budgets against brute-force rankings."""

import pytest
import torch

from osbc import allocation as A


def lamp_brute(weights, sparsity, p):
    scores = []
    for li, w in enumerate(weights):
        a = w.reshape(-1).abs().double() ** p
        for i in range(a.numel()):
            scores.append((float(a[i] / a[a >= a[i]].sum()), li))
    scores.sort()
    k = round(sparsity * sum(w.numel() for w in weights))
    counts = [0] * len(weights)
    for _, li in scores[:k]:
        counts[li] += 1
    return [c / w.numel() for c, w in zip(counts, weights)]


def test_lamp_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(6, 7, generator=g), torch.randn(3, 5, generator=g) * 0.1, torch.randn(4, 4, generator=g) * 3]
    for s in (0.1, 0.5, 0.9):
        for p in (1.0, 2.0, 3.0):
            assert A.lamp(ws, s, p) == lamp_brute(ws, s, p)


def test_lamp_total_sparsity_exact_and_keeps_largest_of_each_layer():
    ws = [torch.randn(50, 40), torch.randn(10, 400)]
    s = A.lamp(ws, 0.97, 2.0)
    assert round(s[0] * 2000) + round(s[1] * 4000) == round(0.97 * 6000)
    assert all(x < 1 for x in s)  # the largest weight of a layer has score 1, never pruned first


def test_global_counts_equal_sorted_relative_losses():
    g = torch.Generator().manual_seed(1)
    losses = [torch.rand(3, 5, generator=g).cumsum(1), torch.rand(2, 8, generator=g).cumsum(1) * 10]
    energies = [2.0, 30.0]
    counts = A.global_counts(losses, energies, 0.5)
    flat = sorted([(float(v) / e, li, r) for li, (L, e) in enumerate(zip(losses, energies))
                   for r in range(L.shape[0]) for v in L[r]])
    want = [torch.zeros(3, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)]
    for _, li, r in flat[:round(0.5 * 31)]:
        want[li][r] += 1
    assert all(torch.equal(c, w) for c, w in zip(counts, want))


def test_uniform_gives_every_layer_the_requested_sparsity():
    sizes = [10, 20, 1000]
    for s in (0.0, 0.3, 0.97):
        out = A.uniform(sizes, s)
        assert out == [s] * len(sizes)
        assert sum(o * n for o, n in zip(out, sizes)) == pytest.approx(s * sum(sizes))
