"""Seeded, bounded fuzzing of the checkpoint loader: mutated checkpoints (bit flips, truncation, header
JSON edits) either load the original weights or raise OsbcError - no other exception, no big allocation."""

import json
import random
import resource
import struct
import sys

import pytest
import torch

from osbc import models
from osbc.checkpoint import load, save
from osbc.errors import OsbcError

_JUNK = [None, True, -1, 0, 1.5, 10 ** 12, 10 ** 40, 1e308, "x", "", [], {}, [1, 2], {"a": 1}, "float32", "csr"]


def _bases(tmp_path):
    """(path, state) of checkpoints covering every layout: CSR, bitmask, dense, int codes, BN, PLIF."""
    torch.manual_seed(0)
    a = models.build("nmnist_mlp", in_shape=[2, 8, 8], hidden=16, neuron="plif")
    b = models.build("small_conv", in_shape=[2, 8, 8], channels=4, hidden=12)
    with torch.no_grad():
        a.fc1.weight.mul_(torch.rand_like(a.fc1.weight) < 0.03)       # CSR
        w = a.fc2.weight
        s = w.abs().amax(1, keepdim=True) / 7
        w.copy_(torch.round(w / s).clamp(-7, 7) * s)                  # 4-bit codes
        b.fc1.weight.mul_(torch.rand_like(b.fc1.weight) < 0.5)        # bitmask
    out = []
    for name, m in (("a", a), ("b", b)):
        p = save(m, tmp_path / f"{name}.safetensors", data="digits", frames=4, info={"acc": 0.5})
        out.append((p.read_bytes(), {k: v.clone() for k, v in m.state_dict().items()}))
    return out


def _split(raw):
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header, data):
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def _mutate_json(rng, node):
    """Change one random place in a JSON value: a wrong type, a huge number, a missing or an extra key."""
    path = []
    while isinstance(node, (dict, list)) and node and rng.random() < 0.75:
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        path.append((node, key))
        node = node[key]
    if not path:
        return rng.choice(_JUNK)
    parent, key = path[-1]
    op = rng.random()
    if op < 0.2 and isinstance(parent, dict):
        del parent[key]
    elif op < 0.3 and isinstance(parent, dict):
        parent[f"extra{rng.randrange(9)}"] = rng.choice(_JUNK)
    elif op < 0.5 and isinstance(parent[key], int) and not isinstance(parent[key], bool):
        parent[key] = rng.choice([parent[key] + 1, parent[key] - 1, -parent[key], parent[key] * 2 ** 20, 2 ** 62])
    else:
        parent[key] = rng.choice(_JUNK)
    return path[0][0]


def _mutate(rng, raw):
    kind = rng.choice(["flip", "flip", "truncate", "header", "meta", "meta", "legacy"])
    header, data = _split(raw)
    if kind == "flip":
        b = bytearray(raw)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return kind, bytes(b), True
    if kind == "truncate":
        return kind, raw[:rng.randrange(len(raw))], True
    if kind == "header":  # a tensor's dtype, shape or offsets
        name = rng.choice([k for k in header if k != "__metadata__"])
        header[name] = _mutate_json(rng, header[name])
        return kind, _join(header, data), True
    meta = header["__metadata__"]
    field = rng.choice(sorted(meta))
    if kind == "legacy":  # an old file (no hashes) with damaged tensor data: checks, not hashes, must hold
        enc = json.loads(meta["storage"])
        enc.pop("hashes")
        enc.pop("encoding_hash")
        meta["storage"] = json.dumps(enc)
        b = bytearray(data)
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return kind, _join(header, bytes(b)), False
    try:
        value = json.loads(meta[field])
    except ValueError:
        value = meta[field]
    value = _mutate_json(rng, value)
    meta[field] = value if isinstance(value, str) and rng.random() < 0.5 else json.dumps(value)
    return kind, _join(header, data), True


def _max_rss_mb():
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2 ** 20 if sys.platform == "darwin" else r / 1024


@pytest.mark.parametrize("seed", [0, 1])
def test_fuzz_checkpoint_loader(tmp_path, seed):
    rng = random.Random(seed)
    bases = _bases(tmp_path)
    rss0 = _max_rss_mb()
    outcomes = {"loaded": 0, "rejected": 0}
    for i in range(200):
        raw, state = rng.choice(bases)
        kind, mutated, hashed = _mutate(rng, raw)
        p = tmp_path / "fuzz.safetensors"
        p.write_bytes(mutated)
        try:
            m = load(p)
        except OsbcError as e:
            assert str(p) in str(e) and "\n" not in str(e), (i, kind, str(e))
            outcomes["rejected"] += 1
            continue
        except Exception as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f"seed {seed} case {i} ({kind}): {type(e).__name__}: {e}")
        outcomes["loaded"] += 1
        if hashed:  # integrity is checked: whatever loads is the original weights, bit for bit
            got = m.state_dict()
            assert list(got) == list(state), (i, kind)
            for k, v in state.items():
                assert torch.equal(got[k], v), (i, kind, k)
    assert outcomes["rejected"] > 100 and outcomes["loaded"] > 5, outcomes
    # nothing the metadata asks for was allocated: the peak memory hardly moved (the models are tiny)
    assert _max_rss_mb() - rss0 < 200
