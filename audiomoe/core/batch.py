"""The model's input and output records: :class:`AudioBatch` (what a user passes in) and :class:`ModelOutput`.

They live in ``core/`` so that data loading, training and analysis can build and read them without
importing the composed model (``data/`` imports only ``core/``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from audiomoe.core.errors import AudioMoEError
from audiomoe.core.interfaces import Routing


@dataclass
class AudioBatch:
    """What a user passes in.

    - ``waveforms`` [B, T] float (mono; right-padded), at ``sample_rate`` Hz.
    - ``lengths`` [B] valid samples per item (``None``: all of T).
    - ``tasks``: the task name of each item (a key of the model's ``tasks``); one string means all.
    - ``targets``: one target per item (class index, list of labels, transcript, ... as the task
      head expects), or ``None`` for inference.
    - ``prompts``: optional per-item text inputs for heads that read text (``accepts_prompts``;
      e.g. the AudioLLM's template fields ``{"mode": "qa", "question": ...}``); ``None`` elsewhere.

    Targets per head: ``classification``: a class index or label name (multi-label: a list of
    them); ``ctc_asr``: a transcript string; ``audiollm``: an answer string or
    ``{"answer": ..., <template fields>}``; ``codec_generation``: codes ``[num_codebooks, frames]``.
    """

    waveforms: torch.Tensor
    sample_rate: int
    tasks: Sequence[str] | str
    lengths: Optional[torch.Tensor] = None
    targets: Optional[Sequence[Any]] = None
    prompts: Optional[Sequence[Any]] = None

    def task_list(self) -> list[str]:
        """The task name of every item."""
        b = self.waveforms.shape[0]
        if isinstance(self.tasks, str):
            return [self.tasks] * b
        if len(self.tasks) != b:
            raise AudioMoEError(f"batch has {b} waveforms but {len(self.tasks)} task names; give one per item")
        return list(self.tasks)


@dataclass
class ModelOutput:
    """What comes out.

    - ``loss``: the total training loss (task losses, each times its head's ``loss_weight``, +
      auxiliary losses), or ``None`` without targets.
    - ``losses``: every named term (``task/<name>`` unweighted, ``aux/<name>``), for logging;
      a head's routed decoder adds ``aux/heads/<task>/...`` (not scaled by the head's weight).
    - ``outputs``: raw head outputs per task; ``indices``: which batch items each task got.
    - ``predictions``: per task, one prediction per item of that task (in ``indices`` order);
      ``forward(batch, predict=False)`` skips heads whose prediction is costly (``predicts_cheaply
      = False``: generation heads), e.g. during training.
    - ``routing``: the routing trace, one :class:`Routing` record per routed layer anywhere in
      the model (``encoder/...``, ``backbone/...``, ``heads/<task>/...``).
    - ``routing_rows``: for a record that covers only some batch items (a head's decoder pass, the
      backbone pass of the items whose heads read states), the batch index of each of its samples;
      a record not listed covers every item, in order (:meth:`routing_tasks` maps both to tasks).
    """

    loss: Optional[torch.Tensor]
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    indices: dict[str, torch.Tensor] = field(default_factory=dict)
    predictions: dict[str, Any] = field(default_factory=dict)
    routing: dict[str, Routing] = field(default_factory=dict)
    routing_rows: dict[str, torch.Tensor] = field(default_factory=dict)

    def routing_tasks(self, tasks: Sequence[str]) -> dict[str, list[str]]:
        """The task of each sample of every routing record, from the batch's task per item."""
        return {
            n: [tasks[i] for i in self.routing_rows[n].tolist()] if n in self.routing_rows else list(tasks)
            for n in self.routing
        }
