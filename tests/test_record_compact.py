"""Recording state is saved compactly (only what differs from an empty slot) and loads back to
the bit; states saved whole, as stores recorded before did, load the same."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from scope import ScopeError
from scope.record import compact
from scope.record.state import EMPTY_KEY, FILL, FeatureState, load_states
from scope.store import Store


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype and a.shape == b.shape and torch.equal(compact.bits(a), compact.bits(b))
    )


def test_mask_bits_first_entry_lowest():
    mask = torch.tensor([9, 128], dtype=torch.uint8)
    assert compact.unpackbits(mask, 12).tolist() == [True, False, False, True] + [False] * 8
    for n in (1001, 1007, 1008, 1009, 40001):  # the last byte part full, or full
        t = torch.zeros(n)
        t[torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.02] = 1.0
        packed = compact.pack("t", t, 0)
        assert packed["t.mask"].numel() == -(-n // 8)
        assert bits_equal(compact.unpack(packed)["t"], t)


DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.mark.parametrize("device", DEVICES)
def test_pack_keeps_every_bit(device):
    t = torch.zeros(30, 4, 50, device=device)
    t[0, 1, 2], t[1, 0, 0], t[2, 3, 4] = -0.0, float("nan"), 2.5
    packed = compact.pack("acts", t, 0)
    assert set(packed) == {"acts.mask", "acts.values", "acts.shape", "acts.fill"}
    kept = compact.unpackbits(packed["acts.mask"], t.numel()).nonzero().view(-1).tolist()
    assert kept == [52, 200, 554]  # -0.0 is not 0.0's bits
    assert bits_equal(compact.unpack(packed)["acts"], t)
    keys = torch.full((2, 300), EMPTY_KEY, device=device)
    keys[1, 7] = -3
    back = compact.unpack({**compact.pack("k", keys, EMPTY_KEY), "other": torch.ones(2)})
    assert bits_equal(back["k"], keys) and back["other"].tolist() == [1.0, 1.0]
    assert back["k"].device == keys.device
    dense = torch.arange(1, 1000, device=device)
    assert compact.pack("d", dense, 0) == {"d": dense}  # nothing to gain: kept whole
    empty = torch.full((400,), float("-inf"), device=device)
    assert bits_equal(compact.unpack(compact.pack("e", empty, float("-inf")))["e"], empty)


def state_path(store: Path) -> tuple[Path, str]:
    s = Store(store)
    (key,) = s.saes
    assert s.manifest.state_version is not None
    return store / s.manifest.state_version, key


def test_saved_state_is_compact_and_loads_to_the_bit(app_store, tmp_path):
    version, key = state_path(app_store)
    state = load_states(version, [key], torch.device("cpu"))[key]
    assert state.top_acts.shape == (256, 5, 32) and state.count.dtype == torch.int64
    whole = state.tensors()
    assert int(state.tokens) > 2000 and (state.top_win >= 0).float().mean() > 0.5
    stored = (version / "state" / f"{key}.safetensors").stat().st_size
    dense = sum(t.numel() * t.element_size() for t in whole.values())
    assert stored < dense / 2, (stored, dense)
    assert set(load_file(version / "state" / f"{key}.safetensors")) >= {
        "top_acts.mask",
        "top_acts.values",
        "smp_key.mask",
        "hist.mask",
    }
    # a store recorded before the compact files: every tensor whole
    (tmp_path / "state").mkdir()
    save_file(
        {n: t.contiguous() for n, t in whole.items()}, tmp_path / "state" / f"{key}.safetensors"
    )
    old = load_states(tmp_path, [key], torch.device("cpu"))[key]
    for name, t in whole.items():
        assert bits_equal(getattr(old, name), t), name


def test_empty_state_is_all_fill():
    st = FeatureState.empty(8, k=2, ctx=4, m=3, device=torch.device("cpu"))
    for name, t in st.tensors().items():
        want = torch.full_like(t, FILL.get(name, 0))
        assert bits_equal(t, want), name


def test_damaged_state_is_named(app_store, tmp_path):
    version, key = state_path(app_store)
    tensors = load_file(version / "state" / f"{key}.safetensors")
    del tensors["top_acts.values"]
    (tmp_path / "state").mkdir()
    save_file(tensors, tmp_path / "state" / f"{key}.safetensors")
    with pytest.raises(ScopeError, match=r"damaged .*cannot be resumed"):
        load_states(tmp_path, [key], torch.device("cpu"))
