"""Compute backends for the MoE layer and the MoE transformer (plain functions, not components).

- ``torch`` (every device): attention through ``F.scaled_dot_product_attention`` with a
  key-padding mask; the MoE dispatcher's torch plans (``dispatcher.py``).
- ``xformers`` (CUDA only, optional extra ``audiomoe[gpu]``): attention through
  ``xformers.ops.memory_efficient_attention`` on packed variable-length sequences with a
  block-diagonal mask (no padding computed); the dispatcher's ``xformers`` plan gathers and
  combines through xformers' Triton ``index_select_cat`` / ``scaled_index_add`` (one call per top-k
  slot so indices are unique). Nothing is timed at run time: the choice is configuration. xformers
  has no CPU kernels and, since 0.0.34, no fused SwiGLU, so nothing else of it is used.

``resolve_backend`` decides once per (request, device) and logs one line saying which and why.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Optional

import torch
import torch.nn.functional as F

from audiomoe.core.errors import AudioMoEError

log = logging.getLogger("audiomoe.experts")
_LOGGED: set[tuple[str, str, str]] = set()
BACKENDS = ("auto", "torch", "xformers")


def xformers_available() -> bool:
    """True when the ``xformers`` package can be imported (checked without importing it)."""
    return importlib.util.find_spec("xformers") is not None


def resolve_backend(requested: str, device: torch.device) -> str:
    """``"torch"`` or ``"xformers"`` for ``requested`` in ``auto|torch|xformers`` on ``device``.

    ``xformers`` is used only on CUDA with xformers installed; ``auto`` (and an explicit
    ``xformers`` request that cannot be met) falls back to ``torch``. One log line per decision.
    """
    if requested not in BACKENDS:
        raise AudioMoEError(f"backend {requested!r} is not one of {', '.join(BACKENDS)}")
    if requested == "torch":
        chosen, why = "torch", "requested"
    elif device.type != "cuda":
        chosen, why = "torch", f"xformers needs CUDA, tensors are on {device.type}"
    elif not xformers_available():
        chosen, why = "torch", "xformers is not installed (pip install 'audiomoe[gpu]')"
    else:
        chosen, why = "xformers", "CUDA and xformers available"
    key = (requested, device.type, chosen)
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.info("audiomoe MoE backend: %s (%s; requested %s)", chosen, why, requested)
    return chosen


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    padding_mask: Optional[torch.Tensor],
    backend: str,
    causal: bool = False,
) -> torch.Tensor:
    """Multi-head self-attention of ``q, k, v`` [B, N, H, Dh] with key padding; returns [B, N, H, Dh].

    ``causal`` lets position t attend only to positions <= t (decoders, e.g. the codec head).
    The xformers path packs the valid tokens of all sequences into one row and uses a
    block-diagonal mask, so padded frames cost nothing; padded output rows are zero.
    """
    if backend == "xformers" and padding_mask is not None:
        return _xformers_packed(q, k, v, padding_mask, causal)
    if backend == "xformers":
        import xformers.ops as xops
        from xformers.ops.fmha.attn_bias import LowerTriangularMask

        return xops.memory_efficient_attention(q, k, v, attn_bias=LowerTriangularMask() if causal else None)
    mask = None
    n = q.shape[1]
    if padding_mask is not None:
        # a sequence with no valid frame would softmax over nothing (NaN): let it attend to itself
        keep = ~padding_mask | padding_mask.all(-1, keepdim=True)
        mask = keep[:, None, None, :]
    if causal:
        tri = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        mask = tri if mask is None else (mask & tri) | torch.eye(n, dtype=torch.bool, device=q.device)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def _xformers_packed(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, padding_mask: torch.Tensor, causal: bool = False
) -> torch.Tensor:
    import xformers.ops as xops
    from xformers.ops.fmha.attn_bias import BlockDiagonalCausalMask, BlockDiagonalMask

    b, n, h, dh = q.shape
    valid = ~padding_mask
    lens = valid.sum(-1).tolist()
    flat = valid.reshape(-1).nonzero(as_tuple=True)[0]
    pack = lambda t: t.reshape(b * n, h, dh).index_select(0, flat).unsqueeze(0)
    bias = (BlockDiagonalCausalMask if causal else BlockDiagonalMask).from_seqlens([int(x) for x in lens if x > 0])
    out = xops.memory_efficient_attention(pack(q), pack(k), pack(v), attn_bias=bias)[0]
    return q.new_zeros(b * n, h, dh).index_copy(0, flat, out).reshape(b, n, h, dh)
