"""Training: the loop (``loop.py``) and atomic checkpoints (``checkpoint.py``)."""

from .checkpoint import load_checkpoint, save_checkpoint
from .loop import TrainConfig, evaluate, train

__all__ = ["TrainConfig", "evaluate", "load_checkpoint", "save_checkpoint", "train"]
