"""Every solver on CUDA against the same solve on CPU, to float tolerance (float64 problems, so
ties and rounding cannot change a choice). Skipped without CUDA. ``OSBC_TEST_DEVICE=cpu`` runs the
same comparisons CPU against CPU, which exercises this file where no GPU is lent."""
import os

import pytest
import torch

import osbc
from osbc import solvers as S
from osbc.quant import fit_grid

DEV = os.environ.get("OSBC_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(), reason="needs CUDA")


def problem(R=12, d=40, seed=0, dead=3):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(3 * d, d, generator=g, dtype=torch.float64)
    A[:, :dead] = 0.0                                   # a few inputs that never fire
    H = A.T @ A / d
    W = torch.randn(R, d, generator=g, dtype=torch.float64)
    return W, H


def both(fn, *tensors):
    """fn on CPU tensors and on DEV copies; the DEV result brought back to the CPU."""
    cpu = fn(*tensors)
    dev = fn(*[t.to(DEV) for t in tensors])
    to_cpu = lambda x: x.cpu() if isinstance(x, torch.Tensor) else x   # noqa: E731
    return cpu, (tuple(map(to_cpu, dev)) if isinstance(dev, tuple) else to_cpu(dev))


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kw", [dict(), dict(block=4), dict(nm=(2, 4), sparsity=None)])
def test_prune_exact(kw):
    W, H = problem()
    sp = kw.pop("sparsity", 0.7)
    (Wc, kc, lc), (Wd, kd, ld) = both(lambda W, H: S.prune_exact(W, H, sp, **kw), W, H)
    assert torch.equal(kc, kd)
    close(Wc, Wd)
    close(lc, ld)


def test_obs_path():
    W, H = problem()
    pc, pd = both(lambda W, H: S.obs_path(W, H), W, H)
    assert torch.equal(pc.order, pd.order.cpu())
    close(pc.loss, pd.loss.cpu())


def test_prune_restricted():
    W, H = problem(R=16, d=120)
    (Wc, kc, lc), (Wd, kd, ld) = both(lambda W, H: S.prune_restricted(W, H, 0.95), W, H)
    assert torch.equal(kc, kd)
    close(Wc, Wd)


@pytest.mark.parametrize("fn", [lambda W, H: S.prune_sparsegpt(W, H, 0.7),
                                lambda W, H: S.prune_sparsegpt(W, H, None, nm=(2, 4)),
                                lambda W, H: S.prune_magnitude(W, 0.7)])
def test_sweeps_and_magnitude(fn):
    W, H = problem()
    (Wc, kc), (Wd, kd) = both(fn, W, H)
    assert torch.equal(kc, kd)
    close(Wc, Wd)


def test_solve_on_support():
    W, H = problem()
    keep = torch.rand(W.shape, generator=torch.Generator().manual_seed(3)) < 0.4
    c, d = both(lambda W, H, k: S.solve_on_support(W, H, k), W, H, keep)
    close(c, d)


@pytest.mark.parametrize("solver", ["obq", "exact", "gptq", "rtn"])
def test_quantizers(solver):
    W, H = problem()
    fns = {"obq": S.quantize_obq, "exact": S.quantize_exact,
           "gptq": lambda W, H, g: S.quantize_gptq(W, H, g), "rtn": lambda W, H, g: S.quantize_rtn(W, g)}

    def run(W, H):
        return fns[solver](W, H, fit_grid(W, 3))
    c, d = both(run, W, H)
    close(c, d)


@pytest.mark.parametrize("task", ["prune", "quantize"])
def test_whole_model(task):
    """osbc.prune / osbc.quantize with device= on a small LIF MLP give the CPU's weights."""
    from osbc import snn
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(2), torch.nn.Linear(64, 32), snn.LIF(), torch.nn.Linear(32, 10), snn.LIF())
    model.double()
    calib = (torch.rand(24, 8, 64, generator=torch.Generator().manual_seed(1)) < 0.2).double()
    kw = dict(sparsity=0.8, solver="exact") if task == "prune" else dict(bits=3, solver="exact")
    fn = getattr(osbc, task)
    a = fn(model, calib, device="cpu", verbose=False, **kw).model
    b = fn(model, calib, device=DEV, verbose=False, **kw).model
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q.cpu(), rtol=1e-6, atol=1e-8, msg=n)


def test_default_memory_budget_and_chunking():
    """The default max_memory on the device (a GPU: an eighth of its free memory, so a layer's rows
    go in few chunks) and the smallest budget (a row per chunk) give the same weights."""
    budget = S.memory_budget(None, DEV)
    if DEV == "cuda":
        assert S.DEFAULT_MAX_MEMORY <= budget <= torch.cuda.mem_get_info()[1]
    else:
        assert budget == S.DEFAULT_MAX_MEMORY
    W, H = problem(R=24, d=160)
    W, H = W.to(DEV), H.to(DEV)
    for fn in (lambda **k: S.prune_restricted(W, H, 0.9, **k)[0], lambda **k: S.prune_exact(W, H, 0.9, **k)[0],
               lambda **k: S.quantize_obq(W, H, fit_grid(W, 3), **k)):
        close(fn().cpu(), fn(max_memory=1).cpu())
