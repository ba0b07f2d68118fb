"""The exact greedy in plain numpy, one weight per step: the equations the solvers implement.

Per row w with H^-1 of its damped Hessian, each step removes the weight that costs least,
compensates the others optimally and drops q from H^-1:

    q    = argmin_q  w_q^2 / [H^-1]_qq                  (loss of the step: w_q^2 / (2 [H^-1]_qq))
    w   -= w_q / [H^-1]_qq * H^-1[:, q]                  (w_q becomes 0)
    H^-1 -= H^-1[:, q] H^-1[q, :] / [H^-1]_qq

``obs.obs_path`` computes the same path for all rows at once (lazily batched downdates, compiled
steps, chunks on threads); the tests check it against this. Slow: for small layers only.
"""
from __future__ import annotations

import numpy as np

__all__ = ["damped", "greedy_path"]


def damped(H, damp: float = 0.01):
    """(H + lambda I, dead): dead inputs (zero diagonal) decoupled with a unit diagonal, lambda =
    damp * mean of the live diagonal."""
    H = 0.5 * (np.asarray(H, dtype=np.float64) + np.asarray(H, dtype=np.float64).T)
    dead = np.diag(H) <= 0
    H[dead, :], H[:, dead] = 0.0, 0.0
    mean = np.diag(H)[~dead].mean() if (~dead).any() else 1.0
    H[dead, dead] = 1.0
    return H + damp * mean * np.eye(len(H)), dead


def greedy_path(w, H, damp: float = 0.01):
    """Order of removal, each step's loss (made non-decreasing by a running max, as in
    ``PrunePath``) and the weights after each step, for one row w [d]. Dead inputs go first."""
    w = np.array(w, dtype=np.float64)
    Hd, dead = damped(H, damp)
    Hinv = np.linalg.inv(Hd)
    removed = np.zeros(len(w), bool)
    order, loss, states = [], [], []
    for _ in range(len(w)):
        with np.errstate(divide="ignore", invalid="ignore"):    # removed: [H^-1]_qq = 0
            score = np.where(removed, np.inf, w ** 2 / np.diag(Hinv))
        score[dead & ~removed] = -np.inf                    # free: never fired
        q = int(np.argmin(score))
        loss.append(0.0 if dead[q] else w[q] ** 2 / (2 * Hinv[q, q]))
        w -= w[q] / Hinv[q, q] * Hinv[:, q]
        w[q] = 0.0
        Hinv -= np.outer(Hinv[:, q], Hinv[q, :]) / Hinv[q, q]
        removed[q] = True
        order.append(q)
        states.append(w.copy())
    return np.array(order), np.maximum.accumulate(loss), states
