"""The base classes every component subclasses, and the records they exchange.

Each base class is a ``torch.nn.Module`` with the smallest contract its kind needs. A concrete
component defines a nested pydantic ``Params`` (its knobs) and a constructor
``__init__(self, params, *, <injected sizes>, <child builders>)``: the composer passes only the
keyword arguments the constructor names, so a component asks for exactly what it needs
(``d_model``, ``num_experts``, ...). Child components (a mixture's router, an MoE layer's
experts) arrive as :class:`audiomoe.core.composer.Builder` callables: call one with sizes to get
a fresh module. Parts never import each other; that is what makes a swap a one-word change.

Masks: ``padding_mask`` is ``True`` at padded positions (PyTorch's key-padding convention).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Optional

import torch
from torch import nn

from audiomoe.core.decoding import DecoderState, positions_from_mask  # noqa: F401 (re-exported)
from audiomoe.core.routing import Routing
from audiomoe.core.specs import Params as BaseParams  # the name a class attribute `Params` cannot shadow


class Component(nn.Module):
    """Common base: every component has a ``Params`` model and keeps its validated params."""

    kind: ClassVar[str] = "component"
    Params: ClassVar[type[BaseParams]] = BaseParams
    #: Glob patterns (``fnmatch``, on parameter names relative to the component) of tensors that get
    #: no task gradient by construction, each justified where it is declared (a key-projection bias
    #: under softmax, LoRA's A while B is zero). The conformance check exempts and lists them.
    gradient_exempt: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: Optional[BaseParams] = None) -> None:
        super().__init__()
        if params is None:
            params = self.Params()
        if not isinstance(params, self.Params):
            raise TypeError(
                f"{type(self).__name__} expects {type(self).__name__}.Params, got {type(params).__name__}; "
                f"build components with audiomoe.compose() or pass {type(self).__name__}.Params(...)"
            )
        self.params = params

    def advance_schedule(self) -> None:
        """Move this component's schedules (aux-loss weights, noise) on by one optimizer step.

        The trainer calls it through :meth:`audiomoe.model.AudioModel.advance_schedules` once per
        optimizer step; a forward never moves a schedule (eval, generation and gradient
        accumulation would). Keep the position in a persistent buffer so checkpoints resume it.
        Default: no schedule.
        """

    def idle_children(self) -> list[str]:
        """Names of child modules (``named_modules`` paths relative to this one) the last forward routed nothing to.

        A routed expert or weak encoder no item selected gets no gradient, legitimately; the
        conformance check exempts these from its every-tensor gradient rule. Default: none.
        """
        return []


# -- encoders --------------------------------------------------------------------------------


@dataclass
class EncoderOutput:
    """What an encoder returns: ``features`` [B, N, D] and ``padding_mask`` [B, N] (True = padded).

    ``aux_losses`` holds auxiliary losses (e.g. a mixture's router balance term, already weighted);
    ``routing`` holds routing records by layer name for the routing trace.
    """

    features: torch.Tensor
    padding_mask: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    routing: dict[str, "Routing"] = field(default_factory=dict)


class Encoder(Component):
    """Audio encoder: waveforms [B, T] at ``sample_rate`` -> features [B, N, ``output_dim``].

    Subclasses set ``sample_rate`` (Hz the waveforms must have), ``output_dim`` (feature width)
    and ``frame_rate`` (output frames per second) in their constructor.
    """

    kind: ClassVar[str] = "encoder"
    #: True: ``forward`` also takes ``task_ids`` [B] (a mixture whose router conditions on the task)
    accepts_task_ids: ClassVar[bool] = False
    sample_rate: int
    output_dim: int
    frame_rate: float

    def num_frames(self, lengths: torch.Tensor) -> torch.Tensor:
        """Number of valid output frames for input lengths in samples (override for exact conv maths)."""
        return torch.ceil(lengths.to(torch.float64) * self.frame_rate / self.sample_rate).long()

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> EncoderOutput:  # pragma: no cover
        """Encode ``waveforms`` [B, T] (float, mono) whose valid lengths are ``lengths`` [B]."""
        raise NotImplementedError


# -- adapters --------------------------------------------------------------------------------


class Adapter(Component):
    """Audio frames [B, N, ``in_dim``] -> the model width [B, N', ``d_model``], between encoder and backbone.

    ``in_dim`` (the encoder's ``output_dim``) and ``d_model`` are injected. Sets ``stride``: input
    frames per output frame (1 keeps the rate). Returns the features and the new padding mask.
    """

    kind: ClassVar[str] = "adapter"
    stride: int

    def forward(
        self, features: torch.Tensor, padding_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        """Adapt ``features`` (``padding_mask`` True = padded)."""
        raise NotImplementedError


# -- fusion ----------------------------------------------------------------------------------


class Fusion(Component):
    """How a mixture's weak-encoder features join its base features; owns the routers that pick them.

    Injected: ``d_base`` (base width), ``weak_dim`` (the projected weak width C), ``num_weak`` (M)
    and ``task_names``. Sets ``output_dim``. ``route(base [B, N, D_b], valid [B, N], task_ids)``
    returns named per-sample :class:`Routing` records (the mixture runs each weak encoder only on
    the samples any record selects); ``forward(base, weak, routing)`` combines, where ``weak`` maps
    encoder ``k`` to ``(sample indices, projected aligned features [b_k, N, C])``.
    """

    kind: ClassVar[str] = "fusion"
    output_dim: int

    def route(
        self, base: torch.Tensor, valid: torch.Tensor, task_ids: Optional[torch.Tensor] = None
    ) -> dict[str, "Routing"]:  # pragma: no cover
        """Routing records by name (``""`` for a fusion with one router)."""
        raise NotImplementedError

    def forward(
        self, base: torch.Tensor, weak: Mapping[int, tuple[torch.Tensor, torch.Tensor]], routing: dict[str, "Routing"]
    ) -> torch.Tensor:  # pragma: no cover
        """The fused features [B, N, ``output_dim``]."""
        raise NotImplementedError


# -- routers ---------------------------------------------------------------------------------


class Router(Component):
    """Routing policy: item representations [N, D] -> a :class:`Routing` over ``num_experts`` columns.

    The composer injects ``num_experts`` (columns to score) and ``d_model`` (input width) when the
    constructor asks for them. ``task_ids`` [N] lets a router condition on the task.
    """

    kind: ClassVar[str] = "router"

    def forward(
        self,
        inputs: torch.Tensor,
        item_mask: Optional[torch.Tensor] = None,
        task_ids: Optional[torch.Tensor] = None,
    ) -> Routing:  # pragma: no cover
        """Route ``inputs`` [N, D]; ``item_mask`` [N] is True for valid items (padded ones are ignored)."""
        raise NotImplementedError


# -- experts ---------------------------------------------------------------------------------


class Expert(Component):
    """A token FFN: [N, d_model] -> [N, d_model]. ``d_model`` is injected by the composer."""

    kind: ClassVar[str] = "expert"

    @classmethod
    def grouped(
        cls, params: BaseParams, *, num_experts: int, d_model: int, d_ff: Optional[int] = None
    ) -> Optional[nn.Module]:
        """``num_experts`` experts of this kind as one stacked-weight module, or None (a per-expert loop runs them).

        A grouped module implements ``forward_sorted(xs, counts)`` (expert-sorted rows) and
        ``expert_forward(e, x)``; see :mod:`audiomoe.moe.grouped` (``swiglu`` has one).
        """
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """Apply the expert to tokens ``x`` [N, d_model]."""
        raise NotImplementedError


class MoE(Component):
    """A mixture-of-experts FFN: tokens [B, N, d_model] (or [N, d_model]) -> same shape, plus its :class:`Routing`.

    ``d_model`` and ``task_names`` are injected; router and expert are slots of its params.
    """

    kind: ClassVar[str] = "moe"

    def forward(
        self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None, task_ids: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, Routing]:  # pragma: no cover
        """Route and combine ``x``; ``padding_mask`` True = padded (zero output, not routed)."""
        raise NotImplementedError


# -- backbones -------------------------------------------------------------------------------


@dataclass
class BackboneOutput:
    """Hidden states [B, N, D] plus auxiliary losses and routing records by layer name."""

    hidden: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    routing: dict[str, Routing] = field(default_factory=dict)


class Backbone(Component):
    """The decoder every task shares: [B, N, d_model] -> [B, N, d_model], and (``supports_decoding``) a KV-cached decoder.

    ``d_model`` and ``task_names`` are injected when the constructor names them. A backbone whose
    class sets ``accepts_task_ids = True`` also gets ``task_ids`` [B] (index into ``task_names``),
    so its routers can condition on the task. ``forward`` reads the audio alone (classification
    and CTC heads); :meth:`decode` runs one interleaved sequence ``[prompt tokens | audio soft
    tokens | codec embeddings]`` causally with a KV cache (text and codec heads, see
    :mod:`audiomoe.core.decoding`). A backbone with a text vocabulary also sets ``tokenizer`` and
    implements :meth:`embed_tokens` / :meth:`text_logits`.
    """

    kind: ClassVar[str] = "backbone"
    accepts_task_ids: ClassVar[bool] = False
    #: True when :meth:`decode` is implemented (heads with ``reads_decoder`` need it)
    supports_decoding: ClassVar[bool] = False
    #: the text tokenizer of a backbone with a vocabulary (a causal LM); None: no text in or out
    tokenizer: Any = None

    def num_active_parameters(self) -> Optional[float]:
        """Parameters used per token on average (None: all of them)."""
        return None

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor) -> BackboneOutput:  # pragma: no cover
        """Transform ``x`` [B, N, D]; ``padding_mask`` [B, N] is True at padded frames (see ``accepts_task_ids``)."""
        raise NotImplementedError

    def decode(
        self, embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache: Any = None
    ) -> Any:
        """Causal pass over new positions ``embeds`` [B, L, D] -> :class:`~audiomoe.core.decoding.DecoderState`.

        ``attention_mask`` [B, past + L] (1 = real token) covers the cached positions and the new
        ones; ``position_ids`` [B, L] count real tokens; ``cache`` is the previous state's cache.
        """
        raise NotImplementedError(
            f"{type(self).__name__} cannot decode an interleaved sequence (supports_decoding = False)"
        )

    def select_cache(self, cache: Any, rows: torch.Tensor) -> Any:
        """The ``cache`` of batch rows ``rows`` (repeats allowed; beam search keeps the surviving beams)."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot select rows of its decoding cache (beam search needs it)"
        )

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Text token ids [..] -> input embeddings [.., D] (backbones with a vocabulary)."""
        raise NotImplementedError(f"{type(self).__name__} has no text vocabulary; text heads need a causal_lm backbone")

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [.., D] -> next-token logits [.., V] (the LM head of a backbone with a vocabulary)."""
        raise NotImplementedError(f"{type(self).__name__} has no text vocabulary; text heads need a causal_lm backbone")


# -- tasks -----------------------------------------------------------------------------------


@dataclass
class TaskLoss:
    """A head's loss split by :meth:`Head.loss_terms`: the task term and a routed decoder's side results.

    ``loss`` is the task term (scaled by the head's ``loss_weight``); ``aux_losses`` (already
    weighted router losses) are added unscaled under ``aux/heads/<task>/...`` and ``routing``
    records join ``ModelOutput.routing`` under ``heads/<task>/...``, so every routed layer of the
    model is visible.
    """

    loss: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    routing: dict[str, "Routing"] = field(default_factory=dict)


class Head(Component):
    """A task head: features -> outputs, with its loss, predictions and metrics.

    ``d_model`` (feature width) is injected. ``forward`` returns whatever the head's ``loss`` and
    ``predict`` accept (usually logits). ``targets`` is the per-item target list the batch carries.
    """

    kind: ClassVar[str] = "head"
    #: True: ``forward`` also gets ``prompts`` (the batch's per-item text fields)
    accepts_prompts: ClassVar[bool] = False
    #: False: ``predict`` is costly (autoregressive); ``AudioModel.forward(predict=False)`` skips it
    predicts_cheaply: ClassVar[bool] = True
    #: True: a target describes any window of its clip (a label), so training may crop long clips;
    #: False (transcripts, answers, codes): a clip is never cut away from its target
    clip_level: ClassVar[bool] = False
    #: True: the head reads the shared backbone's decoder; ``forward`` gets the adapted audio (not the
    #: backbone's states) and ``decoder=`` the backbone, and builds its own interleaved sequence
    reads_decoder: ClassVar[bool] = False
    #: True: ``forward`` also gets ``task=`` its items' task (a head with a ``served_tasks(params, key)`` classmethod serves several)
    accepts_task: ClassVar[bool] = False
    #: weight of the task term in the model's total loss (heads set it from their params)
    loss_weight: float = 1.0

    def forward(self, features: torch.Tensor, padding_mask: torch.Tensor) -> Any:  # pragma: no cover
        """Compute head outputs from ``features`` [B, N, D] (``padding_mask`` True = padded)."""
        raise NotImplementedError

    def loss(self, outputs: Any, targets: Any) -> torch.Tensor:  # pragma: no cover
        """Scalar training loss of ``outputs`` against ``targets`` (a routed head: its aux losses included)."""
        raise NotImplementedError

    def loss_terms(self, outputs: Any, targets: Any) -> TaskLoss:
        """The loss split into the task term, the aux losses and routing records of a routed part.

        :class:`audiomoe.model.AudioModel` calls this, so a head's router losses are reported under
        ``aux/`` (not scaled by ``loss_weight``) and its routing joins the trace. Default: ``loss``
        with no side terms; a head with a routed decoder overrides it.
        """
        return TaskLoss(self.loss(outputs, targets))

    def predict(self, outputs: Any) -> Any:  # pragma: no cover
        """Predictions (one per item) from ``outputs``."""
        raise NotImplementedError

    def metrics(self, predictions: Any, targets: Any) -> Mapping[str, float]:  # pragma: no cover
        """Named metrics of ``predictions`` against ``targets``."""
        raise NotImplementedError

    def make_targets(self, raw: list[Any], device: torch.device) -> Any:
        """Turn the batch's per-item raw targets into what :meth:`loss` takes (default: a tensor)."""
        return torch.as_tensor(raw, device=device)

    def example_targets(self, n: int) -> list[Any]:
        """``n`` valid raw targets (what a batch carries), used by the conformance check."""
        raise NotImplementedError(f"{type(self).__name__} must implement example_targets(n) for audiomoe.testing")


class Codec(Component):
    """Audio <-> discrete tokens (generation targets): ``encode`` [B, T] -> codes [B, Q, F], ``decode`` back.

    Sets ``sample_rate``, ``num_codebooks``, ``codebook_size`` and ``frame_rate`` (frames per second).
    A codec that learns its codebooks from data (``mel_rvq``) implements ``fit``; DAC / EnCodec
    plugins load local weights instead.
    """

    kind = "codec"

    def encode(
        self, waveforms: torch.Tensor, lengths: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        """``(codes [B, Q, F] long, frame lengths [B])`` of ``waveforms`` [B, T] at ``sample_rate``."""
        raise NotImplementedError

    def decode(self, codes: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """Waveforms [B, T] from ``codes`` [B, Q, F]."""
        raise NotImplementedError


BASES: dict[str, type[Component]] = {
    "encoder": Encoder,
    "adapter": Adapter,
    "fusion": Fusion,
    "router": Router,
    "expert": Expert,
    "moe": MoE,
    "head": Head,
    "backbone": Backbone,
    "codec": Codec,
}


def __getattr__(name: str) -> Any:
    # ``Task`` was the base class's name before heads got their own kind; kept one release.
    if name == "Task":
        warnings.warn(
            "audiomoe.Task is deprecated: subclass audiomoe.Head (same class)", DeprecationWarning, stacklevel=2
        )
        return Head
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
