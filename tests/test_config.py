"""Typed run settings: validated once, equivalent to the flat keyword arguments."""

import dataclasses

import pytest
import torch

import osbc
from osbc.config import PRUNE_METHODS, QUANT_SOLVERS, SOLVERS, PruneConfig, QuantConfig
from osbc.errors import OsbcError

from helpers import MLP, spikes


@pytest.fixture(scope="module")
def calib():
    return spikes(16, 6, 40, rate=0.2, dead=0.2)


def mlp():
    torch.manual_seed(0)
    return MLP(d_in=40, hidden=16, out=4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(sparsity=1.0), "sparsity"), (dict(sparsity=True), "sparsity"), (dict(method="rtn"), "method"),
    (dict(allocation="x"), "allocation"), (dict(solver="x"), "solver"), (dict(calibration="x"), "calibration"),
    (dict(nm="2-4"), "nm"), (dict(nm=(3, 3)), "N < M"), (dict(damp=1.0), "damp"), (dict(batch_size=0), "batch_size"),
    (dict(max_kernel_groups=0), "max_kernel_groups"), (dict(lamp_power=0), "lamp_power"),
    (dict(method="magnitude", allocation="global"), "global"), (dict(device="nonsense"), "device"),
    (dict(seed="x"), "seed"), (dict(seed=-1), "seed"), (dict(seed=1.5), "seed"),
])
def test_prune_config_rejects(kwargs, match):
    with pytest.raises(OsbcError, match=match):
        PruneConfig(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=1), "bits"), (dict(bits=4.0), "bits"), (dict(bits=True), "bits"), (dict(per="row"), "per"),
    (dict(solver="blocked"), "pruning"), (dict(solver="restricted"), "pruning"), (dict(method="magnitude"), "method"),
])
def test_quant_config_rejects(kwargs, match):
    with pytest.raises(OsbcError, match=match):
        QuantConfig(**kwargs)


def test_nm_is_parsed_and_fixes_the_sparsity():
    cfg = PruneConfig(nm="2:4", sparsity=0.3)
    assert cfg.nm == (2, 4) and cfg.sparsity == 0.5
    assert PruneConfig(nm=(1, 4)).sparsity == 0.75


def test_configs_are_frozen_and_choices_shared():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PruneConfig().sparsity = 0.5
    assert "blocked" not in QUANT_SOLVERS and "restricted" not in QUANT_SOLVERS
    assert "restricted" in SOLVERS
    from osbc.cli import options   # the CLI offers exactly the config's choices
    assert (options.PRUNE_METHODS, options.SOLVERS) == (PRUNE_METHODS, SOLVERS)


def test_config_equals_flat_keywords(calib):
    kw = dict(method="obc", solver="exact", allocation="uniform", damp=0.02, verbose=False)
    a = osbc.prune(mlp(), calib, 0.6, **kw)
    b = osbc.prune(mlp(), calib, config=PruneConfig(sparsity=0.6, **kw))
    c = osbc.prune(mlp(), calib, config=PruneConfig(sparsity=0.1, **kw), sparsity=0.6)   # keywords win
    for x in (b, c):
        for p, q in zip(a.model.parameters(), x.model.parameters()):
            assert torch.equal(p, q)
    assert a.report.settings == b.report.settings
    qa = osbc.quantize(mlp(), calib, 3, method="obc", solver="fast", verbose=False)
    qb = osbc.quantize(mlp(), calib, config=QuantConfig(bits=3, method="obc", solver="fast", verbose=False))
    for p, q in zip(qa.model.parameters(), qb.model.parameters()):
        assert torch.equal(p, q)


def test_unknown_keyword_and_wrong_config_type(calib):
    with pytest.raises(TypeError, match="spars"):
        osbc.prune(mlp(), calib, spars=0.5)
    with pytest.raises(OsbcError, match="PruneConfig"):
        osbc.prune(mlp(), calib, config=QuantConfig())


def test_cuda_without_cuda_is_a_user_error(calib, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for call in (lambda: osbc.prune(mlp(), calib, 0.5, device="cuda", verbose=False),
                 lambda: osbc.quantize(mlp(), calib, 4, device="cuda:0", verbose=False),
                 lambda: osbc.inspect(mlp(), calib, device="cuda")):
        with pytest.raises(OsbcError, match="CUDA"):
            call()
