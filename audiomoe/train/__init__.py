"""Training: recipes and stages (``recipe.py``, ``stages.py``), the engine (``trainer.py``, ``steploop.py``),
atomic checkpoints (``checkpoint.py``), locked run directories (``rundir.py``), logs (``runlog.py``),
DDP under torchrun (``distributed.py``), evaluation (``evaluate.py``); ``loop.py`` is the flat-options API.

Names are loaded on first use, so ``audiomoe --help`` (which registers the train command) does not import torch.
"""

from __future__ import annotations

from audiomoe.core.lazy import lazy_getattr

_LAZY = {
    "CheckpointError": "checkpoint",
    "load_checkpoint": "checkpoint",
    "load_trainer_state": "checkpoint",
    "save_checkpoint": "checkpoint",
    "evaluate": "evaluate",
    "evaluate_checkpoint": "evaluate",
    "format_report": "evaluate",
    "TrainConfig": "loop",
    "TrainingInterrupted": "loop",
    "train": "loop",
    "Recipe": "recipe",
    "list_recipes": "recipe",
    "load_recipe": "recipe",
    "RunDirError": "rundir",
    "open_run_dir": "rundir",
    "RunOptions": "trainer",
    "run_recipe": "trainer",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY, globals())
