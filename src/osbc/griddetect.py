"""Detecting the integer grid that quantized weights lie on, exactly.

:mod:`osbc.storage` stores a weight matrix as integer codes and float32 scales when its values are
integer multiples of one scale per row (or per layer): quantizers (:mod:`osbc.quant`, or any other)
leave no record of their grid, so it is recovered from the weights, and only a grid that
reproduces every stored value bit for bit is accepted.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["detect_grid", "code_bits", "bits_of", "MAX_BITS"]

MAX_BITS = 8
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits_of(t: Tensor) -> Tensor:
    """The raw bit patterns of ``t`` as integers of the same width (for exact comparisons)."""
    return t.contiguous().view(_INT_VIEW[t.element_size()])


def code_bits(cmin: int, cmax: int) -> int:
    """Two's-complement width holding codes in [cmin, cmax]."""
    b = 1
    while not (-(1 << (b - 1)) <= cmin and cmax <= (1 << (b - 1)) - 1):
        b += 1
    return b


def _exact_scales(codes: Tensor, vals: Tensor, rows: Tensor, R: int, nz_rows: Tensor) -> Tensor | None:
    """float32 scales ``s[r]`` with ``float32(code * s[row]) == value`` bit for bit for every stored
    entry, searched around ``value / code`` of each row's largest code; None when none exists."""
    dt = vals.dtype
    absc = codes.abs().to(torch.float64)
    # per row, the entry with the largest |code| gives the most precise ratio value / code
    best = torch.full((R,), -1.0, dtype=torch.float64).scatter_reduce(0, rows, absc, "amax")
    is_best = absc == best[rows]
    idx = torch.arange(codes.numel())
    pick = torch.zeros(R, dtype=torch.long).scatter_reduce(0, rows[is_best], idx[is_best], "amax",
                                                           include_self=False)
    base = (vals.to(torch.float64)[pick] / codes.to(torch.float64)[pick]).to(torch.float32)
    base = torch.where(nz_rows, base, torch.ones_like(base))
    scales = base.clone()
    ok = torch.zeros(R, dtype=torch.bool)
    target = bits_of(vals)
    cf = codes.to(torch.float32)
    for step in (0, 1, -1, 2, -2, 3, -3, 4, -4):
        cand = base
        direction = torch.full_like(base, math.inf if step > 0 else -math.inf)
        for _ in range(abs(step)):
            cand = torch.nextafter(cand, direction)
        dec = (cf * cand[rows]).to(dt)
        good_entry = bits_of(dec) == target
        bad_rows = torch.zeros(R, dtype=torch.bool).index_put_((rows[~good_entry],), torch.tensor(True))
        newly = ~bad_rows & ~ok
        scales = torch.where(newly, cand, scales)
        ok |= newly
        if bool(ok.all()):
            return scales
    return None


def detect_grid(W2: Tensor, mask: Tensor):
    """If the stored entries ``W2[mask]`` (rows of ``W2`` = output channels) lie on a symmetric
    integer grid per row of at most 8 bits, return ``(codes int8 [nnz], scales float32 [R or 1],
    bits)`` reproducing them bit for bit; else None."""
    if W2.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return None
    R, C = W2.shape
    vals = W2[mask]
    if vals.numel() == 0 or not torch.isfinite(vals).all():
        return None  # nothing to gain / non-finite values stay float
    rows = torch.nonzero(mask, as_tuple=True)[0]
    v64 = vals.to(torch.float64)
    a = v64.abs()
    amax = torch.zeros(R, dtype=torch.float64).scatter_reduce(0, rows, a, "amax", include_self=False)
    amin = torch.full((R,), math.inf, dtype=torch.float64).scatter_reduce(0, rows, a, "amin", include_self=True)
    nz_rows = amax > 0
    ratio = torch.where(nz_rows, amax / torch.where(nz_rows, amin, torch.ones_like(amin)), torch.ones_like(amax))
    qlim = 1 << (MAX_BITS - 1)
    if bool((ratio > qlim + 0.5).any()):
        return None  # values span more than 8 bits' range in some row
    # The smallest |value| of a row is k * scale for a small integer k: try k = 1, 2, ... and keep
    # the first (largest) scale for which every value of the row is an integer multiple.
    scale = torch.zeros(R, dtype=torch.float64)
    found = ~nz_rows
    tol = 1e-3
    for k in range(1, qlim + 1):
        kr = k * ratio
        cand = ~found & ((kr - kr.round()).abs() < tol * k) & (kr.round() <= qlim)
        if not bool(cand.any()):
            continue
        s = torch.where(cand, amin / k, torch.ones_like(amin))
        x = v64 / s[rows]
        bad = (x - x.round()).abs() >= tol
        bad_rows = torch.zeros(R, dtype=torch.bool).index_put_((rows[bad],), torch.tensor(True))
        good = cand & ~bad_rows
        scale = torch.where(good, s, scale)
        found |= good
        if bool(found.all()):
            break
    if not bool(found.all()):
        return None
    scale = torch.where(nz_rows, scale, torch.ones_like(scale))
    codes = (v64 / scale[rows]).round()
    if codes.numel() and (codes.abs().max() > qlim):
        return None
    # One scale for the whole layer when every row's codes stay in range with the smallest scale.
    layer_codes = None
    smin = scale[nz_rows].min()
    lc = v64 / smin
    if bool(((lc - lc.round()).abs() < tol).all()) and lc.round().abs().max() <= qlim - 1:
        layer_codes = lc.round().to(torch.int64)
    for codes_try, per_layer in ((layer_codes, True), (codes.to(torch.int64), False)):
        if codes_try is None:
            continue
        if per_layer:
            s = _exact_scales(codes_try, vals, torch.zeros_like(rows), 1, torch.ones(1, dtype=torch.bool))
        else:
            s = _exact_scales(codes_try, vals, rows, R, nz_rows)
        if s is None:
            continue
        cmin, cmax = int(codes_try.min()), int(codes_try.max())
        bits = code_bits(cmin, cmax)
        if bits > MAX_BITS:
            continue
        return codes_try.to(torch.int8), s, bits
    return None
