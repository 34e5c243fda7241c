"""Time alignment and frame stacking for mixtures of encoders (plain functions, no components).

- :func:`align_time`: resample a weak encoder's frames [b, Nw, C] (frame rate ``src_rate``) onto
  the base encoder's frame grid (``dst_rate``, ``n_out`` frames), per item, never reading past an
  item's valid frames. Frame j of the output covers time ``[j, j+1) / dst_rate``.
  ``"interpolate"``: linear interpolation at the frame centre, source position
  ``s = (j + 1/2) * src_rate / dst_rate - 1/2`` clamped to the item's valid frames.
  ``"pool"``: mean of the source frames whose index lies in ``[floor(j r), ceil((j+1) r))``,
  ``r = src_rate / dst_rate`` (at least one frame; the last valid frame beyond the item's end).
- :func:`stack_frames`: concatenate every ``k`` consecutive frames along the feature axis
  ([B, N, D] -> [B, ceil(N/k), k D]); a stacked frame is valid when any of its frames is.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from audiomoe.core.errors import AudioMoEError


def align_time(
    feats: torch.Tensor, valid: torch.Tensor, src_rate: float, dst_rate: float, n_out: int, mode: str = "interpolate"
) -> torch.Tensor:
    """Map ``feats`` [b, Nw, C] with ``valid`` [b] frames per item onto ``n_out`` frames at ``dst_rate``."""
    b, nw, c = feats.shape
    if nw == 0 or n_out == 0:
        return feats.new_zeros(b, n_out, c)
    r = float(src_rate) / float(dst_rate)
    last = (valid - 1).clamp_min(0)[:, None]  # [b, 1]
    j = torch.arange(n_out, device=feats.device, dtype=torch.float64)
    if mode == "interpolate":
        src = ((j + 0.5) * r - 0.5).clamp_min(0.0)[None, :].expand(b, n_out)
        src = torch.minimum(src, last.to(torch.float64))
        lo = src.floor().long()
        hi = torch.minimum(lo + 1, last)
        frac = (src - lo.to(torch.float64)).to(feats.dtype)[..., None]
        g_lo = feats.gather(1, lo[..., None].expand(b, n_out, c))
        g_hi = feats.gather(1, hi[..., None].expand(b, n_out, c))
        out = g_lo + (g_hi - g_lo) * frac
    elif mode == "pool":
        start = torch.floor(j * r + 1e-9).long()[None, :].expand(b, n_out)
        end = torch.ceil((j + 1) * r - 1e-9).long()[None, :].expand(b, n_out)
        start = torch.minimum(start, last)
        end = torch.minimum(torch.maximum(end, start + 1), last + 1)
        csum = F.pad(feats.cumsum(1), (0, 0, 1, 0))  # [b, Nw + 1, C], csum[:, i] = sum of frames < i
        total = csum.gather(1, end[..., None].expand(b, n_out, c)) - csum.gather(
            1, start[..., None].expand(b, n_out, c)
        )
        out = total / (end - start).to(feats.dtype)[..., None]
    else:
        raise AudioMoEError(f"align mode must be 'interpolate' or 'pool', got {mode!r}")
    return out * (valid > 0).to(feats.dtype)[:, None, None]


def stack_frames(x: torch.Tensor, padding_mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``k`` consecutive frames: [B, N, D] -> [B, ceil(N/k), k*D]; returns the new padding mask."""
    if k == 1:
        return x, padding_mask
    b, n, d = x.shape
    n_new = math.ceil(n / k)
    extra = n_new * k - n
    x = F.pad(x, (0, 0, 0, extra)).reshape(b, n_new, k * d)
    pad = F.pad(padding_mask, (0, extra), value=True).reshape(b, n_new, k).all(-1)
    return x, pad
