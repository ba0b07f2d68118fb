"""Row chunks and the threads that solve them.

Rows are independent, so a layer is cut into chunks whose working sets fit the memory budget.
On CPU the chunks run on one worker thread per core: the greedy's per-step work does not speed up
with threads and its products are partly memory-bound, so independent chunks beat one chunk on
all cores.
"""
from __future__ import annotations

import queue
from concurrent.futures import ThreadPoolExecutor

import torch

from ...device import pinned_threads
from ..options import EngineOptions


def _progress(progress: bool, total: int, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="w", unit_scale=True, leave=False)



def _rows_per_chunk(bytes_per_row: float, R: int, max_memory: int) -> int:
    return int(max(1, min(R, max_memory // max(1.0, bytes_per_row))))


def _workers(device, opts: EngineOptions) -> int:
    """Row chunks solved at once: on CPU one per intra-op thread (at most ``opts.workers``)."""
    if torch.device(device).type != "cpu":
        return 1
    return max(1, min(opts.workers, torch.get_num_threads()))


def _step_threads(workers: int, device, opts: EngineOptions):
    """Threads for the greedy's per-step work: ``opts.step_threads`` when one chunk runs at a
    time; each worker already runs on its own share."""
    return pinned_threads(opts.step_threads if workers == 1 else None, device)


def _pooled(pool: queue.SimpleQueue, make):
    """A buffer from ``pool`` (put it back when done), or a new one: one per worker, reused by its
    chunks, which saves re-faulting hundreds of MB per chunk."""
    try:
        return pool.get_nowait()
    except queue.Empty:
        return make()


def _chunks(R: int, c_max: int, workers: int) -> list[slice]:
    """Consecutive row chunks of at most c_max rows, as equal as possible, their count a multiple
    of ``workers`` (when there are enough rows) so the workers finish together."""
    k = -(-R // max(1, c_max))
    k = min(R, -(-k // workers) * workers)
    c = -(-R // k)
    return [slice(r, min(R, r + c)) for r in range(0, R, c)]


def _map(fn, items: list, workers: int) -> list:
    """[fn(item) for item in items]; with several workers, in that many threads, each with its share of
    the intra-op threads. The greedy's per-step ops are small and barely speed up with threads, and
    its products are memory-bound, so independent chunks, one per core, beat one chunk on all cores
    (about 20% on 2 cores)."""
    workers = min(workers, len(items))
    if workers <= 1:
        return [fn(it) for it in items]
    each = max(1, torch.get_num_threads() // workers)

    def run(it):
        if torch.get_num_threads() != each:    # per thread: the caller's setting is not touched
            torch.set_num_threads(each)
        return fn(it)

    with ThreadPoolExecutor(workers, thread_name_prefix="osbc-solver") as ex:
        return list(ex.map(run, items))

