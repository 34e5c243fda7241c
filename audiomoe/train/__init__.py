"""Training: the loop (``loop.py``), atomic checkpoints (``checkpoint.py``), locked run directories (``rundir.py``)."""

from .checkpoint import CheckpointError, load_checkpoint, load_trainer_state, save_checkpoint
from .loop import TrainConfig, TrainingInterrupted, evaluate, train
from .rundir import RunDirError, open_run_dir

__all__ = [
    "CheckpointError",
    "RunDirError",
    "TrainConfig",
    "TrainingInterrupted",
    "evaluate",
    "load_checkpoint",
    "load_trainer_state",
    "open_run_dir",
    "save_checkpoint",
    "train",
]
