"""The trainer state of a checkpoint (``trainer.json``), validated like a recipe before anything uses it.

``trainer.json`` is ``{"format", "step", "optimizer", "rng", "extra"}``: JSON values whose tensors
are ``{"__tensor__": key}`` references into ``trainer.safetensors`` and whose mappings are
``{"__dict__": [[key, value], ...]}`` (optimizer state keys are ints). A hand-edited or damaged
file (``step: -3``, ``2.7``, ``"40"``, a step that is not its directory's) must not be trusted: steps
would be retrained and a later checkpoint overwritten. These functions only say what is wrong;
:func:`audiomoe.train.checkpoint.load_trainer_state` raises it as a ``CheckpointError`` naming the file.
:func:`encode` / :func:`decode` are the codec between state dicts and that JSON + tensors form. The
schema of ``extra`` (:class:`~audiomoe.train.run_state.TrainerExtra`) lives with the run state it saves.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from audiomoe.core.limits import MAX_STEPS
from audiomoe.train.run_state import TrainerExtra  # the saved run state's schema, next to the run state


class TrainerMeta(BaseModel):
    """``trainer.json`` as written by :func:`audiomoe.train.checkpoint.save_checkpoint` (values still encoded)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    format: StrictInt
    step: StrictInt = Field(ge=0, le=MAX_STEPS)
    optimizer: Optional[dict[str, Any]] = None
    rng: Optional[dict[str, Any]] = None
    extra: Optional[dict[str, Any]] = None


def _first(exc: ValidationError, prefix: str = "") -> str:
    err = exc.errors()[0]
    key = prefix + ".".join(str(x) for x in err["loc"])
    got = f" (got {err['input']!r:.60})" if "input" in err and err["type"] not in ("missing", "extra_forbidden") else ""
    return f"field '{key}': {err['msg']}{got}"


def meta_problem(raw: Any, dir_step: Optional[int]) -> Optional[str]:
    """What is wrong with a parsed ``trainer.json`` (``dir_step``: the step its directory's name says), else None."""
    if not isinstance(raw, dict):
        return f"must hold a JSON object, not {type(raw).__name__}"
    try:
        meta = TrainerMeta.model_validate(raw)
    except ValidationError as exc:
        return _first(exc)
    if dir_step is not None and meta.step != dir_step:
        return f"field 'step': {meta.step} is not the step of its directory (step-{dir_step:06d})"
    return None


def extra_problem(extra: Any) -> Optional[str]:
    """What is wrong with the decoded ``extra`` mapping, else None."""
    if not isinstance(extra, dict):
        return f"field 'extra': must be a mapping, not {type(extra).__name__}"
    try:
        TrainerExtra.model_validate(extra)
    except ValidationError as exc:
        return _first(exc, "extra.")
    return None


def encode(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` as JSON values, its tensors moved into ``tensors`` (CPU) under their dotted ``key``.

    ``TypeError`` naming the key for a value checkpoints cannot store.
    """
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().contiguous().cpu()
        return {"__tensor__": key}
    if isinstance(obj, dict):  # keys may be ints (optimizer state): keep them typed
        return {"__dict__": [[k, encode(v, f"{key}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"trainer state at '{key}' holds a {type(obj).__name__}, which checkpoints cannot store")


def _is_pair(kv: Any) -> bool:
    return isinstance(kv, list) and len(kv) == 2 and isinstance(kv[0], (str, int))


def decode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """An encoded value with its tensors put back; ``ValueError`` naming the field (``where``) when malformed."""
    if isinstance(obj, dict) and "__tensor__" in obj:
        key = obj["__tensor__"]
        if not isinstance(key, str) or key not in tensors:
            raise ValueError(f"field '{where}': names tensor {key!r:.60}, which trainer.safetensors does not hold")
        return tensors[key]
    if isinstance(obj, dict) and "__dict__" in obj:
        pairs = obj["__dict__"]
        if not isinstance(pairs, list) or not all(_is_pair(kv) for kv in pairs):
            raise ValueError(f"field '{where}': a mapping must be a list of [key, value] pairs with str or int keys")
        return {k: decode(v, tensors, f"{where}.{k}") for k, v in pairs}
    if isinstance(obj, dict):
        raise ValueError(f'field \'{where}\': an object must be a {{"__tensor__"}} or {{"__dict__"}} reference')
    if isinstance(obj, list):
        return [decode(v, tensors, f"{where}.{i}") for i, v in enumerate(obj)]
    return obj
