"""The composed model: encoder -> adapter -> backbone (the one decoder every task shares) -> one head per task.

Heads read the backbone in one of two ways. Heads of audio understanding (classification, CTC)
read ``backbone(audio)``, the adapted audio's states. Heads that write (``text``, ``codec``: their
class sets ``reads_decoder``) get the adapted audio and the backbone itself, and run their own
interleaved sequence ``[prompt tokens | audio soft tokens | codec frames]`` through
``backbone.decode`` (KV-cached at generation). Either way there is one decoder in the model.

:func:`audiomoe.compose` returns an :class:`AudioModel`. Its input is an :class:`AudioBatch` and its
output a :class:`ModelOutput`; both are documented dataclasses so that training code written
against them does not depend on which parts were plugged in.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, cast

import torch
from torch import nn

from audiomoe.core.batch import AudioBatch, ModelOutput
from audiomoe.core.errors import AudioMoEError, MissingPretrainedError
from audiomoe.core.interfaces import Component, Routing
from audiomoe.core.specs import ModelSpec

__all__ = ["AudioBatch", "AudioModel", "ModelOutput"]  # the records live in core/batch.py; importable from here too


class AudioModel(nn.Module):
    """Encoder + adapter + optional backbone + task heads, built by the composer from a :class:`ModelSpec`.

    ``spec`` (set by the composer) is the resolved spec: ``audiomoe.compose(model.spec)`` rebuilds
    the same architecture, and with the same ``seed`` the same parameters.
    """

    def __init__(
        self, params: ModelSpec, *, encoder: Any, adapter: Any = None, backbone: Any = None, tasks: dict[str, Any]
    ) -> None:
        super().__init__()
        self.params = params
        self.spec: dict[str, Any] = {}
        head_of = _task_heads(tasks)
        self.task_names = list(head_of)
        d = params.d_model
        missing: list[str] = []  # every part is tried, so one error names every missing checkpoint
        self.encoder = _built("encoder", lambda: encoder(d_model=d, task_names=self.task_names), missing)
        # Parts after the encoder start from their own seed (the spec's seed and the part's name), so two
        # configs of a study that differ elsewhere (a router, the encoder pool) share these initial weights
        # at one seed: their paired difference is not also a difference of random initialisation.
        seeded = functools.partial(_seeded, params.seed)
        self.backbone = (
            seeded(
                "backbone", lambda: _built("backbone", lambda: backbone(d_model=d, task_names=self.task_names), missing)
            )
            if backbone is not None
            else None
        )
        if missing:
            raise MissingPretrainedError("\n".join(missing))
        # Encoders have their own natural width (Whisper-large: 1280); the adapter is the only place
        # the model-wide width (and the backbone's frame rate) is imposed.
        width = int(self.encoder.output_dim)
        if adapter is None:  # no adapter named: the plain linear one (identity when the widths match)
            from audiomoe.adapters.linear import LinearAdapter

            self.adapter = seeded("adapter", lambda: LinearAdapter(LinearAdapter.Params(), in_dim=width, d_model=d))
        else:
            self.adapter = seeded("adapter", lambda: adapter(in_dim=width, d_model=d))
        self.heads = HeadDict(
            {
                name: seeded(f"heads.{name}", lambda b=b, name=name: b(d_model=d, task_name=name))
                for name, b in tasks.items()
            },
            head_of,
        )
        for name, head in self.heads.items():
            if head.reads_decoder and (self.backbone is None or not self.backbone.supports_decoding):
                got = (
                    "no backbone"
                    if self.backbone is None
                    else f"backbone {type(self.backbone).__name__}, which cannot decode"
                )
                raise AudioMoEError(
                    f"head '{name}' ({type(head).__name__}) writes through the model's shared decoder but the spec has {got}; "
                    "add a backbone (causal_lm, moe_transformer or unimoe_transformer) to the spec"
                )

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.parameters()).device

    def advance_schedules(self) -> None:
        """One optimizer step passed: move every component's schedules (aux weights, noise) on by one.

        Call it once per optimizer step (after ``optimizer.step()``), never per forward; the
        trainer does. Eval, generation and gradient accumulation leave the schedules where they are.
        """
        for module in self.modules():
            if isinstance(module, Component):
                module.advance_schedule()

    @torch.no_grad()
    def probe(self, seconds: float = 1.0, batch_size: int = 2, seed: int = 0) -> None:
        """Run the encoder stack once on seeded noise (eval mode), so data-dependent statistics exist.

        Top-p routing uses a variable number of experts per token; after a probe, MoE layers report
        their measured average in ``num_active_parameters`` (what ``audiomoe compose`` prints).
        The training mode is restored afterwards.
        """
        sr = int(self.encoder.sample_rate)
        n = max(int(seconds * sr), 1)
        g = torch.Generator().manual_seed(seed)
        wav = 0.1 * torch.randn(batch_size, n, generator=g)
        lengths = torch.tensor([n - (i * n) // (2 * batch_size) for i in range(batch_size)])
        was_training = self.training
        self.eval()
        try:
            self.encode(wav, lengths, sr)
        finally:
            self.train(was_training)

    def encode(
        self,
        waveforms: torch.Tensor,
        lengths: Optional[torch.Tensor],
        sample_rate: int,
        task_ids: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], dict[str, Routing]]:
        """Waveforms -> (backbone states [B, N, d_model], padding_mask [B, N], aux losses, routing records)."""
        hidden, pad, aux, routing = self.adapt(waveforms, lengths, sample_rate, task_ids)
        if self.backbone is not None:
            hidden = self._backbone(hidden, pad, task_ids, aux, routing)
        return hidden, pad, aux, routing

    def _backbone(
        self, hidden: torch.Tensor, pad: torch.Tensor, task_ids: Optional[torch.Tensor], aux: dict, routing: dict
    ) -> torch.Tensor:
        kwargs = {"task_ids": task_ids} if task_ids is not None and self.backbone.accepts_task_ids else {}
        out = self.backbone(hidden, pad, **kwargs)
        aux.update({f"backbone/{k}": v for k, v in out.aux_losses.items()})
        routing.update({f"backbone/{k}": v for k, v in out.routing.items()})
        return out.hidden

    def adapt(
        self,
        waveforms: torch.Tensor,
        lengths: Optional[torch.Tensor],
        sample_rate: int,
        task_ids: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], dict[str, Routing]]:
        """Waveforms -> (adapted audio [B, N, d_model] before the backbone, padding_mask, aux losses, routing records)."""
        from audiomoe.encoders.features import check_min_length, check_sample_rate, prepare_waveforms, resample

        sample_rate = check_sample_rate(sample_rate)  # before any allocation depends on it
        waveforms, lengths = prepare_waveforms(waveforms, lengths, self.device)  # PCM scaling, down-mix, checks
        if sample_rate != self.encoder.sample_rate:
            waveforms, lengths = resample(waveforms, lengths, sample_rate, int(self.encoder.sample_rate))
        check_min_length(self.encoder, lengths)
        kwargs = {"task_ids": task_ids} if self.encoder.accepts_task_ids else {}
        enc = self.encoder(waveforms, lengths, **kwargs)
        _check_encoder_output(self.encoder, enc, waveforms.shape[0])
        hidden, enc.padding_mask = self.adapter(enc.features, enc.padding_mask)
        aux = {f"encoder/{k}": v for k, v in enc.aux_losses.items()}
        routing = {f"encoder/{k}": v for k, v in enc.routing.items()}
        return hidden, enc.padding_mask, aux, routing

    def forward(self, batch: AudioBatch, predict: bool = True) -> ModelOutput:
        """Run every item through the encoder stack and its own task's head; add up the weighted losses.

        With ``predict=False``, heads marked ``predicts_cheaply = False`` (autoregressive generation)
        give no predictions; the others still do.
        """
        if not hasattr(batch.waveforms, "shape"):  # a Python list: say what to pass before indexing it
            from audiomoe.encoders.features import prepare_waveforms

            prepare_waveforms(batch.waveforms)
        tasks = batch.task_list()
        unknown = sorted(set(tasks) - set(self.task_names))
        if unknown:
            raise AudioMoEError(
                f"the batch names task(s) {unknown} but the model has heads only for {self.task_names}; "
                "add a head under 'tasks' in the spec or fix the batch's task names"
            )
        if batch.targets is not None and len(batch.targets) != len(tasks):
            raise AudioMoEError(f"batch has {len(tasks)} items but {len(batch.targets)} targets")
        if batch.prompts is not None and len(batch.prompts) != len(tasks):
            raise AudioMoEError(f"batch has {len(tasks)} items but {len(batch.prompts)} prompts")
        task_ids = torch.tensor([self.task_names.index(t) for t in tasks], device=self.device)
        audio, pad, aux, routing = self.adapt(batch.waveforms, batch.lengths, batch.sample_rate, task_ids)
        readers = {n for n in self.task_names if n in tasks and self.heads[n].reads_decoder}
        hidden, rows = audio, {}
        if self.backbone is not None and not readers:
            hidden = self._backbone(audio, pad, task_ids, aux, routing)
        elif self.backbone is not None and any(t not in readers for t in tasks):
            # the audio-only pass runs on the items whose heads read states; writing heads decode their own sequences
            keep = torch.tensor([i for i, t in enumerate(tasks) if t not in readers], device=self.device)
            before = set(routing)
            states = self._backbone(
                audio.index_select(0, keep), pad.index_select(0, keep), task_ids.index_select(0, keep), aux, routing
            )
            hidden = audio.new_zeros(audio.shape[0], audio.shape[1], states.shape[-1]).index_copy(0, keep, states)
            rows = {k: keep for k in set(routing) - before}
        out = ModelOutput(loss=None, routing=routing, routing_rows=rows)
        total: Optional[torch.Tensor] = None
        for name in self.task_names:
            idx = [i for i, t in enumerate(tasks) if t == name]
            if not idx:
                continue
            index = torch.tensor(idx, device=self.device)
            head = self.heads[name]
            kwargs: dict[str, Any] = {}
            if head.accepts_prompts:
                kwargs["prompts"] = None if batch.prompts is None else [batch.prompts[i] for i in idx]
            if head.accepts_task:
                kwargs["task"] = name
            source = hidden
            if name in readers:
                kwargs["decoder"], source = self.backbone, audio
            outputs = head(source.index_select(0, index), pad.index_select(0, index), **kwargs)
            _check_head_output(name, head, outputs, len(idx))
            out.outputs[name], out.indices[name] = outputs, index
            if predict or head.predicts_cheaply:
                with torch.no_grad():
                    out.predictions[name] = head.predict(outputs)
            if batch.targets is not None:
                targets = head.make_targets([batch.targets[i] for i in idx], self.device)
                terms = head.loss_terms(outputs, targets)
                aux.update({f"heads/{name}/{k}": v for k, v in terms.aux_losses.items()})
                out.routing.update({f"heads/{name}/{k}": v for k, v in terms.routing.items()})
                out.routing_rows.update({f"heads/{name}/{k}": index for k in terms.routing})
                loss = terms.loss
                out.losses[f"task/{name}"] = loss
                weighted = loss * float(head.loss_weight)
                total = weighted if total is None else total + weighted
        if batch.targets is not None:
            for k, v in aux.items():
                out.losses[f"aux/{k}"] = v
                total = v if total is None else total + v
        out.loss = total
        return out


class HeadDict(nn.ModuleDict):
    """The heads by their key under ``tasks``; indexing (and ``in``) also takes a task name, giving the head serving it.

    One head may serve several tasks (UniMoE-Audio's one codec head writes speech and music): its
    parameters live once, under its own key (``heads.codec.*``), and ``heads["tts"]`` is that head.
    """

    def __init__(self, heads: dict[str, nn.Module], head_of: dict[str, str]) -> None:
        super().__init__(heads)
        self.head_of = dict(head_of)  # task name -> head key

    def __getitem__(self, key: str) -> nn.Module:
        """The head under ``key``, or the head serving task ``key``."""
        return cast(nn.Module, self._modules[self.head_of.get(key, key)])

    def __contains__(self, key: object) -> bool:
        return key in self.head_of or key in self._modules


def _task_heads(tasks: dict[str, Any]) -> dict[str, str]:
    """Task name -> key of the head serving it (a head names its tasks through ``served_tasks``; default: its key)."""
    head_of: dict[str, str] = {}
    for key, b in tasks.items():
        # a head class may serve several tasks (``served_tasks(params, key)``); by default its own key
        served = b.cls.served_tasks(b.node.params, key) if hasattr(getattr(b, "cls", None), "served_tasks") else [key]
        for t in served:
            if t in head_of:
                raise AudioMoEError(
                    f"task '{t}' is served by two heads, '{head_of[t]}' and '{key}'; remove it from one of them "
                    f"(e.g. --set tasks.{key}=null, or drop '{t}' from the tasks of head '{head_of[t]}')"
                )
            head_of[t] = key
    for key in tasks:
        if head_of.get(key, key) != key:
            raise AudioMoEError(
                f"'{key}' is both the key of a head and a task served by head '{head_of[key]}'; rename the head"
            )
    return head_of


def _seeded(seed: int, part: str, build: Any) -> Any:
    """``build()`` under a seed drawn from ``seed`` and ``part``'s name (the caller's random state is kept)."""
    import zlib

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((int(seed) * 1_000_003 + zlib.crc32(part.encode())) % 2**63)
        return build()


def _built(what: str, build: Any, missing: list[str]) -> Any:
    """``build()``, or None with the missing checkpoint recorded under ``what``."""
    try:
        return build()
    except MissingPretrainedError as exc:
        missing.append(f"{what}: {exc}")
        return None


def _check_encoder_output(encoder: Any, enc: Any, batch_size: int) -> None:
    """Name the encoder, the expected and the actual shape when its output breaks the contract."""
    name = type(encoder).__name__
    f, m = enc.features, enc.padding_mask
    want = f"[B={batch_size}, N, output_dim={int(encoder.output_dim)}]"
    if f.dim() != 3 or f.shape[0] != batch_size or f.shape[2] != int(encoder.output_dim):
        raise AudioMoEError(f"encoder {name} returned features of shape {tuple(f.shape)}, expected {want}")
    if tuple(m.shape) != tuple(f.shape[:2]) or m.dtype != torch.bool:
        raise AudioMoEError(
            f"encoder {name} returned a padding_mask {m.dtype} {tuple(m.shape)}, expected bool {tuple(f.shape[:2])}"
        )


def _check_head_output(task: str, head: Any, outputs: Any, n_items: int) -> None:
    """A head's tensor output must have one row per item of its task."""
    if isinstance(outputs, torch.Tensor) and (outputs.dim() == 0 or outputs.shape[0] != n_items):
        raise AudioMoEError(
            f"head '{task}' ({type(head).__name__}) returned outputs of shape {tuple(outputs.shape)}, "
            f"expected [{n_items}, ...] (one row per item of the task)"
        )
