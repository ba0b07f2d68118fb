"""Reference architectures: the paper's shapes, multi-step conventions, registry, discovery."""

import pytest
import torch
from torch import nn

from osbc import models, snn
from osbc.trace import find_modules


def _weights(model):
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def test_registry_lists_the_paper_models():
    assert {"nmnist_mlp", "dvsgesture_net", "cifar10dvs_net", "cifar10dvs_net64", "small_conv"} <= set(models.available())


def test_nmnist_mlp_matches_the_paper():
    m = models.build("nmnist_mlp")
    assert _weights(m) == {"fc1": (256, 2312), "fc2": (10, 256)}
    assert m.fc1.bias is None and m.fc2.bias is None
    assert isinstance(m.sn1, snn.LIF) and float(m.sn1.tau) == 2.0 and m.sn1.decay_input
    assert m.sn1.v_threshold == 1.0 and m.sn1.v_reset == 0.0
    assert m.in_shape == (2, 34, 34)
    assert m.osbc_config == {"arch": "nmnist_mlp", "kwargs": {}}


def test_dvsgesture_net_matches_the_paper():
    m = models.build("dvsgesture_net")
    w = _weights(m)
    convs = [v for k, v in w.items() if k.startswith("conv")]
    assert convs == [(128, 2, 3, 3)] + [(128, 128, 3, 3)] * 4
    assert w["fc1"] == (500, 2048) and w["fc2"] == (110, 500)
    assert sum(isinstance(x, nn.BatchNorm2d) for x in m.modules()) == 5
    assert sum(isinstance(x, nn.MaxPool2d) for x in m.modules()) == 5
    assert isinstance(m.vote, models.Voting) and m.vote.group == 10
    assert isinstance(m.dropout, models.SeqDropout)


@pytest.mark.parametrize("name,size,fc1,fc2", [("cifar10dvs_net", 128, (512, 8192), (100, 512)),
                                               ("cifar10dvs_net64", 64, (500, 2048), (100, 500))])
def test_cifar10dvs_variants_match_the_paper(name, size, fc1, fc2):
    m = models.build(name)
    w = _weights(m)
    assert len([k for k in w if k.startswith("conv")]) == 4
    assert w["fc1"] == fc1 and w["fc2"] == fc2
    assert m.in_shape == (2, size, size)


def test_cifar10dvs_net_picks_the_64x64_head_from_the_input_size():
    assert _weights(models.build("cifar10dvs_net", in_shape=(2, 64, 64)))["fc1"] == (500, 2048)


@pytest.mark.parametrize("name,kw,classes", [
    ("nmnist_mlp", dict(in_shape=(2, 8, 8), hidden=16), 10),
    ("small_conv", dict(in_shape=(2, 12, 12), channels=4, hidden=16), 10),
    ("dvsgesture_net", dict(in_shape=(2, 32, 32), channels=4, hidden=20), 11),
    ("cifar10dvs_net", dict(in_shape=(2, 16, 16), channels=4, hidden=20), 10),
])
def test_forward_is_multistep(name, kw, classes):
    m = models.build(name, **kw).eval()
    T, B = 3, 2
    x = (torch.rand(T, B, *m.in_shape) < 0.5).float() * 3
    snn.reset(m)
    y = m(x)
    assert y.shape == (T, B, classes)
    assert torch.isfinite(y).all() and (y >= 0).all() and (y <= 1).all()
    snn.reset(m)
    assert torch.equal(m(x), y)  # state cleared -> same result
    # each sample is independent of the others in the batch
    snn.reset(m)
    assert torch.allclose(m(x[:, :1]), y[:, :1], atol=1e-6)


def test_training_mode_backprop_through_time():
    m = models.build("small_conv", in_shape=(2, 8, 8), channels=2, hidden=8)
    x = torch.rand(4, 3, 2, 8, 8) * 4
    snn.reset(m)
    m(x).mean().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_build_errors():
    with pytest.raises(ValueError, match="unknown model"):
        models.build("resnet")
    with pytest.raises(ValueError, match="no argument"):
        models.build("nmnist_mlp", widht=3)
    with pytest.raises(ValueError, match="in_shape"):
        models.build("nmnist_mlp", in_shape=(34, 34))
    with pytest.raises(ValueError, match="too small"):
        models.build("dvsgesture_net", in_shape=(2, 16, 16))
    with pytest.raises(ValueError, match="neuron"):
        models.build("nmnist_mlp", neuron="izhikevich")


@pytest.mark.parametrize("neuron,cls", [("lif", snn.LIF), ("plif", snn.PLIF), ("if", snn.IF)])
def test_neuron_choice(neuron, cls):
    m = models.build("nmnist_mlp", in_shape=(2, 4, 4), hidden=8, neuron=neuron)
    assert isinstance(m.sn1, cls) and isinstance(m.sn2, cls)


def test_register_custom_builder():
    @models.register("tiny_test_net")
    def tiny(in_shape=(2, 2, 2), classes=3):
        return models.nmnist_mlp(in_shape=in_shape, hidden=4, classes=classes)

    m = models.build("tiny_test_net", classes=5)
    assert m.osbc_config == {"arch": "tiny_test_net", "kwargs": {"classes": 5}}
    assert "tiny_test_net" in models.available()


def test_voting_averages_groups():
    v = models.Voting(3)
    x = torch.arange(12.0).reshape(1, 1, 12)
    assert torch.equal(v(x), torch.tensor([[[1.0, 4.0, 7.0, 10.0]]]))
    assert list(v.parameters()) == []


def test_seq_dropout_shares_mask_over_time():
    d = models.SeqDropout(0.5).train()
    y = d(torch.ones(6, 4, 100))
    assert torch.equal(y, y[:1].expand_as(y))
    assert set(y.unique().tolist()) <= {0.0, 2.0}
    assert torch.equal(d.eval()(torch.ones(2, 2, 3)), torch.ones(2, 2, 3))


def test_seq_to_ann_folds_time():
    conv = nn.Conv2d(2, 3, 3, padding=1)
    wrapped = models.SeqToANN(conv)
    x = torch.randn(4, 5, 2, 6, 6)
    y = wrapped(x)
    assert y.shape == (4, 5, 3, 6, 6)
    assert torch.allclose(y[2, 1], conv(x[2, 1:2])[0], atol=1e-6)


def test_core_discovers_conv_bn_neuron_modules():
    m = models.build("dvsgesture_net", in_shape=(2, 32, 32), channels=4, hidden=12).eval()
    targets = find_modules(m, torch.rand(2, 1, *m.in_shape))
    assert [t.name for t in targets] == ["conv1.0", "conv2.0", "conv3.0", "conv4.0", "conv5.0", "fc1", "fc2"]
    assert all(t.bn is not None for t in targets[:5]) and all(t.bn is None for t in targets[5:])
    assert [t.neuron_name for t in targets] == ["sn1", "sn2", "sn3", "sn4", "sn5", "sn_fc1", "sn_fc2"]
    assert {t.mode for t in targets[:5]} == {"flat"} and {t.mode for t in targets[5:]} == {"tb"}


def test_default_arch_per_dataset():
    assert models.default_arch("digits", (2, 34, 34), 10) == ("nmnist_mlp", {"in_shape": [2, 34, 34], "classes": 10})
    assert models.default_arch("dvsgesture", (2, 128, 128), 11)[0] == "dvsgesture_net"
    assert models.default_arch("cifar10dvs", (2, 64, 64), 10)[0] == "cifar10dvs_net"
    with pytest.raises(ValueError):
        models.default_arch("imagenet", (3, 8, 8), 10)


@pytest.mark.parametrize("name,kw,culprit", [
    ("nmnist_mlp", {"hidden": 1000000000}, "hidden"),
    ("nmnist_mlp", {"hidden": -1}, "hidden"),
    ("nmnist_mlp", {"hidden": 2.5}, "hidden"),
    ("nmnist_mlp", {"hidden": True}, "hidden"),
    ("small_conv", {"channels": "16"}, "channels"),
    ("dvsgesture_net", {"blocks": 1000}, "blocks"),
    ("nmnist_mlp", {"in_shape": [2, 10]}, "in_shape"),
    ("nmnist_mlp", {"in_shape": [2, -10, 10]}, "in_shape"),
    ("small_conv", {"in_shape": [2, 3, 3]}, "in_shape"),
    ("dvsgesture_net", {"in_shape": [2, 10, 10]}, "in_shape"),
    ("nmnist_mlp", {"tau": float("nan")}, "tau"),
    ("nmnist_mlp", {"tau": 0.5}, "tau"),
    ("dvsgesture_net", {"dropout": 1.5}, "dropout"),
    ("nmnist_mlp", {"bias": "yes"}, "bias"),
    ("nmnist_mlp", {"hidden": 200000}, "hidden=200000"),  # 464M parameters: over the budget
])
def test_bad_arguments_are_one_line_errors_before_allocation(name, kw, culprit):
    from osbc.errors import OsbcError

    with pytest.raises(OsbcError, match=culprit):
        models.build(name, **kw)
    with pytest.raises(OsbcError, match=culprit):
        models.skeleton(name, **kw)


def test_skeleton_has_the_shapes_of_build_without_weight_memory():
    for name in ("nmnist_mlp", "dvsgesture_net", "cifar10dvs_net", "cifar10dvs_net64", "small_conv"):
        real, meta = models.build(name), models.skeleton(name)
        sr, sm = real.state_dict(), meta.state_dict()
        assert list(sr) == list(sm)
        for k in sr:
            assert sr[k].shape == sm[k].shape and sr[k].dtype == sm[k].dtype, (name, k)
        assert meta.fc1.weight.is_meta and meta.osbc_config == real.osbc_config


def test_budget_counts_parameters():
    # just under / over the budget, decided on the meta device (no 1 GiB allocation either way)
    fc1 = 2 * 4 * 4
    hidden = models.MAX_PARAMETERS // (fc1 + 10)
    models.skeleton("nmnist_mlp", in_shape=[2, 4, 4], hidden=hidden)
    with pytest.raises(ValueError, match="limit"):
        models.skeleton("nmnist_mlp", in_shape=[2, 4, 4], hidden=hidden + 1)
