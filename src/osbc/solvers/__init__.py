"""Layer solvers: exact greedy OBS/OBQ (OBC), SparseGPT, GPTQ, magnitude and round-to-nearest.

Pure tensors, no nn.Module. ``W`` is [R, d] (R output rows, d inputs), ``H`` the Hessian of the
per-row loss: [d, d] shared, [R, d, d] per row, or a list of ``(rows, H)`` groups (``groups``),
with H = 2 E[(KX)^T (KX)] (its scale does not matter). Losses are 1/2 dw^T H dw: removing w_q
alone, optimally compensated, costs w_q^2 / (2 [H^-1]_qq).

Modules: ``reference`` (the greedy in plain numpy: the equations), ``damping`` (H + lambda I and
its inverse), ``obs`` (exact and blocked greedy pruning: paths, budgets), ``fixed_support`` (the
optimum on a kept support), ``obq`` (exact quantization), ``restricted`` (the exact greedy
on a forward-selected candidate support: near-exact at high sparsity, far faster), ``sweep``
(SparseGPT, GPTQ), ``refine`` (GPTQ's or OBQ's result refined by exact coordinate descent on the grid), ``baselines`` (magnitude, round-to-nearest), ``engine`` (the lazy batched H^-1 machinery behind
obs and obq), ``options`` (its tuning, ``EngineOptions``, and counters, ``EngineStats``).

Work is vectorised over rows, chunked so the chunks' working sets stay under ``max_memory`` bytes
(None, the default: 384 MiB on CPU, an eighth of the free memory on a GPU; ``memory_budget``),
and runs on W's device in float32 (float64 when W is float64). Inputs whose diagonal of H is zero
("dead": they never fired) carry no loss and are removed first.
"""
from .baselines import prune_magnitude, quantize_rtn
from .damping import damp_inverse
from .fixed_support import solve_on_support
from .obq import quantize_exact, quantize_obq
from .obs import PrunePath, budget_counts, obs_path, prune_exact
from .options import DEFAULT_MAX_MEMORY, EngineOptions, EngineStats, memory_budget
from .refine import quantize_refined, refine_on_grid
from .restricted import prune_restricted
from .sweep import prune_sparsegpt, quantize_gptq

__all__ = ["damp_inverse", "PrunePath", "obs_path", "budget_counts", "solve_on_support", "prune_exact",
           "prune_restricted", "prune_sparsegpt", "prune_magnitude", "quantize_obq", "quantize_gptq", "quantize_exact",
           "quantize_refined", "refine_on_grid", "quantize_rtn",
           "EngineOptions", "EngineStats", "DEFAULT_MAX_MEMORY", "memory_budget"]
