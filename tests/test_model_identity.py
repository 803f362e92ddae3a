"""The model fingerprint: equal to a brute-force reference, the same in any dtype or memory
layout, different for other weights; stores holding the older host fingerprint still compare."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from scope import testing as fixtures
from scope.identity import (
    FINGERPRINT_SCHEME,
    ModelIdentity,
    legacy_fingerprint,
    model_fingerprint,
)

M64 = (1 << 64) - 1


def signed(x: int) -> int:
    x &= M64
    return x - (1 << 64) if x >> 63 else x


def splitmix(i: int) -> int:
    """splitmix64 as torch computes it on int64: wrapping products, arithmetic shifts."""
    x = signed(i + 0x9E3779B97F4A7C15)
    x = signed((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9)
    x = signed((x ^ (x >> 27)) * 0x94D049BB133111EB)
    return x ^ (x >> 31)


def reference_fingerprint(model, sample: int, tiles: int) -> str:
    """The fingerprint as its docstring says, with Python integers and loops."""
    h = hashlib.sha256()
    values: list[int] = []
    for name, p in sorted(model.named_parameters(), key=lambda item: item[0]):
        h.update(f"{name}{tuple(p.shape)};".encode())
        if p.dim() < 2 or name == "embed.W_E":
            continue
        bits = p.detach().to(torch.bfloat16).view(torch.int16).numpy().astype(np.int64)
        mat = bits.reshape(-1, bits.shape[-1])
        if mat.size <= sample:
            values += mat.reshape(-1).tolist()
            continue
        rows, cols = mat.shape
        high = min(rows, 32)
        wide = min(cols, sample // (tiles * high))
        for k in range(tiles):
            r = k * (rows - high) // (tiles - 1)
            c = (k * 5 % tiles) * (cols - wide) // (tiles - 1)
            values += mat[r : r + high, c : c + wide].reshape(-1).tolist()
    total = signed(sum(v * splitmix(i) for i, v in enumerate(values)))
    h.update(str(total).encode())
    return FINGERPRINT_SCHEME + h.hexdigest()[:16]


def test_fingerprint_equals_reference(tiny_model, monkeypatch):
    assert model_fingerprint(tiny_model) == reference_fingerprint(tiny_model, 1 << 14, 16)
    # with a small sample every matrix is read in tiles (the tiny model's are all smaller)
    monkeypatch.setattr("scope.identity.FINGERPRINT_SAMPLE", 512)
    monkeypatch.setattr("scope.identity.FINGERPRINT_TILES", 4)
    assert model_fingerprint(tiny_model) == reference_fingerprint(tiny_model, 512, 4)


def test_fingerprint_ignores_dtype_and_layout(tmp_path, monkeypatch):
    """fp32 and bf16 loads of one checkpoint, whose d_model (48) makes the embedding scale
    sqrt(d_model) round differently in each, as gemma-2-2b's 2304 does; either memory layout."""
    from scope import load_model

    ckpt = fixtures.build_gemma2(tmp_path / "m", n_layers=2, d_model=48)
    monkeypatch.setattr("scope.identity.FINGERPRINT_SAMPLE", 512)  # tiles, not whole matrices
    fp32 = model_fingerprint(load_model(ckpt, device="cpu"))
    bf16 = load_model(ckpt, device="cpu", dtype="bfloat16")
    assert not torch.equal(bf16.W_E, load_model(ckpt, device="cpu").W_E.to(torch.bfloat16))
    assert model_fingerprint(bf16) == fp32
    mlp = bf16.blocks[1].mlp  # load_model lays W_in out transposed; lay it out row-major
    assert not mlp.W_in.is_contiguous()
    mlp.W_in = torch.nn.Parameter(mlp.W_in.detach().contiguous())
    assert mlp.W_in.is_contiguous()
    assert model_fingerprint(bf16) == fp32


def test_fingerprint_tells_weights_apart(tmp_path, tiny_dir, monkeypatch):
    from scope import load_model

    model = load_model(tiny_dir, device="cpu")
    before = model_fingerprint(model)
    other = load_model(fixtures.build_gemma2(tmp_path / "other", seed=1), device="cpu")
    assert model_fingerprint(other) != before
    with torch.no_grad():  # one weight of the last layer, moved by more than bf16 rounds away
        model.blocks[-1].mlp.W_out[3, 5] += 0.25
    assert model_fingerprint(model) != before


def test_identity_takes_a_stores_legacy_fingerprint(tiny_model):
    new = ModelIdentity.of(tiny_model)
    assert new.fingerprint.startswith(FINGERPRINT_SCHEME)
    old = ModelIdentity.of(tiny_model, like=ModelIdentity(**{**vars(new), "fingerprint": "0" * 16}))
    assert old.fingerprint == legacy_fingerprint(tiny_model)
    h = hashlib.sha256()  # the host hash stores were written with
    for t in (tiny_model.W_E[:256], tiny_model.blocks[0].attn.W_Q, tiny_model.blocks[-1].mlp.W_out):
        h.update(t.detach().to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    assert old.fingerprint == h.hexdigest()[:16]
    assert ModelIdentity.of(tiny_model, like=new) == new


@pytest.mark.parametrize("shape", [(300, 700), (5, 64, 900)])
def test_sample_is_taken_by_logical_position(shape, monkeypatch):
    from scope.identity import _weight_sample

    monkeypatch.setattr("scope.identity.FINGERPRINT_SAMPLE", 4096)
    p = torch.randn(*shape)
    flipped = p.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert torch.equal(_weight_sample(p), _weight_sample(flipped))
    assert _weight_sample(p).numel() == 4096


def test_store_with_a_legacy_fingerprint_resumes_and_refuses(tmp_path, tiny_model, tiny_sae_dir):
    """A store written when fingerprints were host hashes takes more corpus from the same model
    (its fingerprint kept as written) and refuses another model, as before."""
    import json

    from scope import ScopeError, load_model, load_sae
    from scope.corpus import CorpusSpec
    from scope.record import RecordSettings, record

    docs = [d for d in fixtures.training_text() if len(d) > 200]
    (tmp_path / "a.txt").write_text(docs[0])
    (tmp_path / "b.txt").write_text(docs[1])
    sae = load_sae(tiny_sae_dir, device="cpu")
    store, settings = tmp_path / "store", RecordSettings(ctx=24, k=2, samples=2, batch_size=4)
    record(tiny_model, [sae], CorpusSpec(paths=(str(tmp_path / "a.txt"),), ctx=24), store, settings)
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["model"]["fingerprint"] == model_fingerprint(tiny_model)
    manifest["model"]["fingerprint"] = legacy_fingerprint(tiny_model)
    (store / "manifest.json").write_text(json.dumps(manifest))
    b = CorpusSpec(paths=(str(tmp_path / "b.txt"),), ctx=24)
    other = load_model(fixtures.build_gemma2(tmp_path / "other", seed=1), device="cpu")
    with pytest.raises(ScopeError, match=r"was recorded with model .*, not .*other"):
        record(other, [sae], b, store, settings)
    record(tiny_model, [sae], b, store, settings)
    after = json.loads((store / "manifest.json").read_text())
    assert len(after["parts"]) == 2
    assert after["model"]["fingerprint"] == legacy_fingerprint(tiny_model)
