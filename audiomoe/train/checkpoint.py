"""Atomic checkpoints: ``step-000100/`` directories and the ``latest`` pointer.

Checkpoints are directories ``step-000100/`` holding ``model.safetensors`` (weights, via
safetensors), ``spec.yaml`` (the resolved spec: ``audiomoe.compose`` rebuilds the model from it)
and ``trainer.pt`` (optimizer state and step). A directory is written under a temporary name and
renamed only when complete, and the ``latest`` pointer file is replaced atomically afterwards, so a
crash mid-write leaves the previous checkpoint intact and ``latest`` pointing at it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
import yaml
from safetensors.torch import load_file, save_file

from ..core.composer import compose
from ..core.errors import AudioMoEError


def save_checkpoint(model: torch.nn.Module, out_dir: str | os.PathLike, step: int, optimizer: Optional[torch.optim.Optimizer] = None, keep: int = 2) -> Path:
    """Write ``out_dir/step-XXXXXX`` atomically and point ``out_dir/latest`` at it; prune old ones."""
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "spec.yaml").write_text(yaml.safe_dump(getattr(model, "spec", {}), sort_keys=False), encoding="utf-8")
        torch.save({"step": step, "optimizer": optimizer.state_dict() if optimizer else None}, tmp / "trainer.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer = root / "latest"
    fd, ptmp = tempfile.mkstemp(prefix=".latest.", dir=root)
    with os.fdopen(fd, "w") as fh:
        fh.write(final.name + "\n")
    os.replace(ptmp, pointer)
    ckpts = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in ckpts[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike) -> torch.nn.Module:
    """Rebuild a model from a checkpoint directory (or a run directory with a ``latest`` pointer)."""
    p = Path(path)
    if (p / "latest").is_file():
        p = p / (p / "latest").read_text().strip()
    if not (p / "spec.yaml").is_file() or not (p / "model.safetensors").is_file():
        raise AudioMoEError(f"'{p}' is not an audiomoe checkpoint (needs spec.yaml and model.safetensors)")
    model = compose(yaml.safe_load((p / "spec.yaml").read_text(encoding="utf-8")))
    model.load_state_dict(load_file(str(p / "model.safetensors")))
    return model
