"""Codec head: a thin reader of the shared backbone writing multi-codebook codec tokens (UniMoE-Audio's output).

UniMoE-Audio generates speech and music with its one MoE language model: the conditioning (text
prompt tokens, then the adapted audio as soft tokens) and the delayed codec frames form one causal
sequence ``[prompt tokens | audio soft tokens | bos frame | delayed frames ...]``, and a frame's
codebooks are predicted at once from its hidden state (:mod:`audiomoe.heads.codec_frames`: summed
per-codebook embeddings in, one ``K x V`` linear out, ``L = sum_k CE_k``). The head owns only
those embeddings and that output layer; the decoder is the model's backbone (``causal_lm``, or an
MoE transformer with rotary positions), shared with every other task.

Generation samples frame by frame with the backbone's KV cache: the prefix runs once, then one
frame per decoder call (``use_cache=False`` re-runs the whole sequence each frame, for checks and
the benchmark). An optional ``prompt`` template (``"Say: {text}"``) puts the item's text
(``AudioBatch.prompts``: a string, or a mapping of the template's fields) before the audio; it
needs a backbone with a tokenizer.

One codec space (UniMoE-Audio): with ``tasks`` (``{tts: "Speak: {text}", text_to_music: "Play:
{text}"}``) one head serves every task named there, with one set of codebook embeddings and one
``K x V`` output layer; the task is part of each item's prompt, as UniMoE-Audio's
``<|SPEECH_START|>`` / ``<|MUSIC_START|>`` markers: a learned task token opens the prefix
``[task token | the task's prompt tokens | audio soft tokens]`` (``task_token: false`` leaves the
task to the templates' own text). The model passes each task's items with ``task=`` its name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from pydantic import Field, field_validator
from torch import nn

from audiomoe.core.decoding import positions_from_mask
from audiomoe.core.errors import AudioMoEError
from audiomoe.core.interfaces import Head, TaskLoss
from audiomoe.heads.codec_frames import CodecFrameParams, CodecFrames, CodecTargets
from audiomoe.heads.functional import generation
from audiomoe.heads.prompting import check_decoder, inference, item_fields, token_ids


@dataclass
class CodecPrefix:
    """The left-padded conditioning of every item: ``embeds`` [B, P, D], ``real`` [B, P] (1 = token), and the ``decoder``."""

    embeds: torch.Tensor
    real: torch.Tensor
    decoder: Any = None


class CodecHead(CodecFrames, Head):
    """Delayed multi-codebook codec frames written by the shared decoder; KV-cached sampling."""

    accepts_prompts = True
    accepts_task = True
    predicts_cheaply = False
    reads_decoder = True

    class Params(CodecFrameParams):
        prompt: Optional[str] = Field(
            None, max_length=4096, description="text template before the audio ('{text}' etc.; needs a tokenizer)"
        )
        tasks: Optional[dict[str, Optional[str]]] = Field(
            None,
            description="one codec space: the tasks this head serves, each with its prompt template (null: 'prompt'); "
            "None: only the task it is keyed under",
        )
        task_token: bool = Field(
            True, description="with 'tasks': a learned token per task opens the prompt (UniMoE-Audio's task markers)"
        )

        @field_validator("tasks")
        @classmethod
        def _some_tasks(cls, tasks: Optional[dict[str, Optional[str]]]) -> Optional[dict[str, Optional[str]]]:
            if tasks is not None and (not tasks or any(not t for t in tasks)):
                raise ValueError(f"tasks must name at least one task, each non-empty, got {sorted(tasks)}")
            return tasks

    @classmethod
    def served_tasks(cls, params: Any, key: str) -> list[str]:
        """The tasks named in ``params.tasks`` (one codec space), else the head's own key."""
        return list(params.tasks) if params.tasks else [key]

    def __init__(self, params: Params, *, d_model: int) -> None:
        super().__init__(params)
        p = self.params
        self._setup_frames(p, d_model)
        self.task_list = list(p.tasks or [])
        # one learned row per task: what tells the shared output layer which domain to write
        self.task_embed = nn.Embedding(len(self.task_list), d_model) if self.task_list and p.task_token else None

    def _template(self, task: Optional[str]) -> Optional[str]:
        if not self.task_list:
            return self.params.prompt
        if task not in self.task_list:
            raise AudioMoEError(
                f"this codec head serves tasks {self.task_list} and was asked for task {task!r}: pass task= one of them "
                "(AudioModel does for each task's items)"
            )
        own = (self.params.tasks or {})[task]
        return self.params.prompt if own is None else own

    def _prompt_embeds(self, decoder: Any, template: str, fields: dict[str, Any], i: int) -> torch.Tensor:
        tok = decoder.tokenizer
        if tok is None:
            raise AudioMoEError(f"codec head prompt {template!r} needs a backbone with a tokenizer (causal_lm)")
        fields = {"text": fields.get("question", "")} | fields
        try:
            text = template.format(**fields)
        except KeyError as exc:
            raise AudioMoEError(f"codec prompt template needs the field {exc} in item {i}'s prompt") from None
        ids = torch.tensor(token_ids(tok, text), dtype=torch.long, device=self.out.weight.device)
        return decoder.embed_tokens(ids)

    def forward(
        self,
        features: torch.Tensor,
        padding_mask: torch.Tensor,
        prompts: Optional[list[Any]] = None,
        decoder: Any = None,
        task: Optional[str] = None,
    ) -> CodecPrefix:
        """The conditioning: [task token] then each item's prompt tokens (if a template is set) then its valid audio frames, left-padded."""
        check_decoder("codec", decoder)
        template = self._template(task)
        fields = item_fields(prompts, features.shape[0])
        lead = None
        if self.task_embed is not None:
            row = torch.tensor([self.task_list.index(task)], device=features.device)
            lead = self.task_embed(row).to(features.dtype)
        rows = []
        for i in range(features.shape[0]):
            audio = features[i][~padding_mask[i]]
            if template is not None:
                audio = torch.cat([self._prompt_embeds(decoder, template, fields[i], i).to(audio.dtype), audio])
            if lead is not None:
                audio = torch.cat([lead, audio])
            rows.append(audio)
        length = max(r.shape[0] for r in rows)
        embeds = features.new_zeros(len(rows), length, features.shape[-1])
        real = torch.zeros(len(rows), length, dtype=torch.long, device=features.device)
        for i, r in enumerate(rows):
            embeds[i, length - r.shape[0] :] = r
            real[i, length - r.shape[0] :] = 1
        return CodecPrefix(embeds, real, decoder)

    def loss(self, outputs: CodecPrefix, targets: CodecTargets) -> torch.Tensor:
        """Sum over codebooks of the cross-entropy over scored frames (+ the decoder's router losses)."""
        terms = self.loss_terms(outputs, targets)
        return terms.loss + sum(terms.aux_losses.values(), terms.loss.new_zeros(()))

    def loss_terms(self, outputs: CodecPrefix, targets: CodecTargets) -> TaskLoss:
        """Teacher-forced frames after the prefix through the decoder once; aux losses and routing beside the loss."""
        embeds = torch.cat([outputs.embeds, self.embed_frames(targets.inputs).to(outputs.embeds.dtype)], 1)
        mask = torch.cat([outputs.real, (~targets.padding_mask).long()], 1)
        state = outputs.decoder.decode(embeds, mask, positions_from_mask(mask))
        logits = self.frame_logits(state.hidden[:, outputs.embeds.shape[1] :].float())
        aux = {f"decoder/{k}": v for k, v in state.aux_losses.items()}
        return TaskLoss(self.frames_loss(logits, targets), aux, {f"decoder/{k}": v for k, v in state.routing.items()})

    @generation
    def generate(self, outputs: CodecPrefix, *, use_cache: bool = True, **sampling: Any) -> list[torch.Tensor]:
        """Sample codes [K, T_i] per item; ``sampling``: ``temperature``, ``top_k``, ``top_p``, ``max_frames``, ``generator``."""
        dec = outputs.decoder
        b, n = outputs.embeds.shape[:2]
        dtype = outputs.embeds.dtype
        most = (sampling.get("max_frames") or self.params.max_frames) + max(self.delays) + 1
        # one mask for the whole run (prefix, then every frame real): a step passes a view, nothing is concatenated
        full_mask = outputs.real.new_ones(b, n + most)
        full_mask[:, :n] = outputs.real
        seq = {"embeds": outputs.embeds, "state": None, "pos": None}
        embed, logits_of = self.frame_embedder(), self.step_logits()

        def step(frames: torch.Tensor) -> torch.Tensor:
            s = frames.shape[1]  # frames fed after this call
            mask = full_mask[:, : n + s]
            if use_cache and seq["state"] is not None:
                new = embed(frames[:, -1:])
                new = new if new.dtype == dtype else new.to(dtype)
                # the new position is real: one past the last one (no cumsum over the whole mask per step)
                seq["pos"] = pos = seq["pos"] + 1
                seq["state"] = dec.decode(new, mask, pos, seq["state"].cache)
            elif use_cache:  # the prefix and the bos frame: the cache starts here
                x = torch.cat([outputs.embeds, embed(frames).to(dtype)], 1)
                pos = positions_from_mask(mask)
                seq["pos"] = pos[:, -1:]
                seq["state"] = dec.decode(x, mask, pos)
            else:  # the whole sequence again each frame: what the cache must reproduce
                seq["embeds"] = torch.cat([seq["embeds"], embed(frames[:, -1:]).to(dtype)], 1)
                seq["state"] = dec.decode(seq["embeds"], mask, positions_from_mask(mask))
            return logits_of(seq["state"].hidden[:, -1].float())

        with inference(dec):
            return self.sample_frames(step, b, outputs.embeds.device, self.params, **sampling)

    def predict(self, outputs: CodecPrefix) -> list[torch.Tensor]:
        """Sampled codes [K, T_i] per item (temperature / top-k / top-p from params)."""
        return self.generate(outputs)
