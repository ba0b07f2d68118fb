"""The lazy batched H^-1 machinery of the exact greedy (OBS / OBQ, one or k weights per step).

``lazy``: per-row H^-1 = Hi - U^T U with the pending rank-1 terms U applied a batch at a time
(lower triangle, panel by panel), the surviving positions compacted to the front at each flush.
``greedy``: the steps between flushes (torch ops, or compiled by ``jit`` on CPU).
``workers``: row chunks within a memory budget, solved concurrently on CPU.
"""
