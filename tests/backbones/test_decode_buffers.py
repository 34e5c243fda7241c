"""Issue 28: the MoE stack's decoding cache is preallocated and written in place (``blocks.KVBuffer``).

Without autograd a step writes its keys/values into room kept in the buffer (no ``torch.cat`` of the past);
with autograd the positions are concatenated, the former path. Both give the same hidden states and greedy
ids over many steps, across the buffer growing, and beam selection copies rows.
"""

from __future__ import annotations

import pytest
import torch

from audiomoe.backbones.blocks import KVBuffer
from audiomoe.core.decoding import positions_from_mask
from audiomoe.testing import build_component


def _stack(name: str):
    torch.manual_seed(0)
    params = {"num_layers": 2, "num_heads": 2, "positions": "rope"}
    if name == "unimoe_transformer":
        params["moe"] = {"name": "moe", "params": {"num_experts": 4, "num_null": 1, "num_shared": 1}}
    return build_component("backbone", name, params, {"d_model": 16}).eval()


def _greedy(bb, prefix, mask, steps: int, table: torch.Tensor):
    """Greedy ids and last hidden states of ``steps`` cached calls (next input: the embedding of the argmax)."""
    state = bb.decode(prefix, mask, positions_from_mask(mask))
    ids, hs = [], []
    pos = positions_from_mask(mask)[:, -1:]
    for _ in range(steps):
        h = state.hidden[:, -1]
        hs.append(h)
        nxt = (h @ table.t()).argmax(-1)
        ids.append(nxt)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        pos = pos + 1
        state = bb.decode(table[nxt][:, None], mask, pos, state.cache)
    return torch.stack(ids, 1), torch.stack(hs, 1), state


@pytest.mark.parametrize("name", ["moe_transformer", "unimoe_transformer"])
def test_buffered_cache_equals_the_concatenating_path_over_many_steps(name):
    bb = _stack(name)
    g = torch.Generator().manual_seed(1)
    prefix = torch.randn(3, 5, 16, generator=g)
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[1, :2] = 0  # a left-padded row
    table = torch.randn(32, 16, generator=g)
    steps = 80  # the first buffer has room for 5 + 64 positions: it grows on the way
    with torch.no_grad():
        ids_buf, h_buf, state = _greedy(bb, prefix, mask, steps, table)
    assert all(isinstance(kv, KVBuffer) for kv in state.cache)
    assert state.cache[0].n == 5 + steps and state.cache[0].k.shape[1] >= 5 + steps
    with torch.enable_grad():  # autograd on: every step concatenates, as before the buffers
        ids_cat, h_cat, state_cat = _greedy(bb, prefix, mask, steps, table)
    assert state_cat.cache[0].k.shape[1] == state_cat.cache[0].n == 5 + steps  # no room kept
    assert torch.equal(ids_buf, ids_cat)
    torch.testing.assert_close(h_buf, h_cat.detach(), rtol=0, atol=1e-6)
    # and both equal running the whole sequence again (the uncached reference)
    full = torch.cat([prefix, table[ids_buf[:, :-1]]], 1)
    fmask = torch.cat([mask, mask.new_ones(3, steps - 1)], 1)
    with torch.no_grad():
        ref = bb.decode(full, fmask, positions_from_mask(fmask)).hidden[:, 4:]
    torch.testing.assert_close(h_buf, ref, rtol=1e-5, atol=1e-5)


def test_writes_go_into_the_buffer_and_selection_copies_rows():
    bb = _stack("moe_transformer")
    x = torch.randn(2, 3, 16)
    mask = torch.ones(2, 3, dtype=torch.long)
    with torch.no_grad():
        st = bb.decode(x, mask, positions_from_mask(mask))
        kv = st.cache[0]
        storage = kv.k.data_ptr()
        sel = bb.select_cache(st.cache, torch.tensor([1, 1]))
        mask2 = torch.ones(2, 4, dtype=torch.long)
        st2 = bb.decode(torch.randn(2, 1, 16), mask2, torch.full((2, 1), 3), st.cache)
    assert st2.cache[0] is kv and kv.k.data_ptr() == storage and kv.n == 4  # in place, no new allocation
    assert sel[0].n == 3 and torch.equal(sel[0].k[0, :3], kv.k[1, :3]) and torch.equal(sel[0].k[1, :3], kv.k[1, :3])
    assert sel[0].k.data_ptr() != storage
