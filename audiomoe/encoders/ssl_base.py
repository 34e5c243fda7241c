"""Shared body of the self-supervised waveform encoders on transformers (HuBERT, WavLM, wav2vec 2.0).

Not a component itself: :mod:`audiomoe.encoders.hubert`, ``wavlm`` and ``wav2vec2`` subclass it
and set which transformers classes and tiny defaults they use. All three share one pipeline:
16 kHz mono -> optional per-utterance normalisation over the valid samples (as the checkpoint's
``Wav2Vec2FeatureExtractor`` does: ``(x - mean) / sqrt(var + 1e-7)``) -> conv feature encoder
(frames from the model's own conv length formula; 320 samples per frame, 50 Hz, for the released
checkpoints) -> Transformer -> chosen hidden state(s).

Following transformers' documentation, an attention mask is passed only to models whose feature
encoder uses layer norm (``feat_extract_norm == "layer"``: HuBERT-large, WavLM, wav2vec2-large-lv60);
group-norm models (HuBERT-base, wav2vec2-base) get zero padding and no mask, as they were trained.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal, Optional, Union

import torch
from pydantic import Field
from torch import nn

from audiomoe.core.errors import AudioMoEError
from audiomoe.core.interfaces import Encoder, EncoderOutput
from audiomoe.core.specs import Params
from audiomoe.encoders.features import frames_mask, normalize_waveforms, prepare_waveforms
from audiomoe.encoders.hf_common import (
    LayerSelect,
    MissingPretrainedError,
    check_model_type,
    freeze_,
    resolve_pretrained,
)

TINY_SSL = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    conv_dim=(32, 32, 32),
    conv_stride=(5, 4, 16),
    conv_kernel=(10, 8, 16),
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
    layerdrop=0.0,
)
# 320 samples per frame, like the real models, at a fraction of the cost; no random layer skipping in the
# random-init twins, so a training step is reproducible and reaches every layer.


class SSLParams(Params):
    """Knobs shared by HuBERT / WavLM / wav2vec2."""

    pretrained: Optional[str] = Field(
        None, description="local directory (HF layout) or model id in the local HF cache; None = random init"
    )
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="config overrides (random init starts from a tiny config: hidden 32, 2 layers)",
    )
    freeze: bool = Field(False, description="no gradients to the pretrained weights (kept in eval mode)")
    layer: Union[Literal["last", "weighted"], int] = Field(
        "last",
        description="'last', a hidden-state index (0 = after the conv encoder) or 'weighted' (SUPERB learned sum)",
    )
    normalize: Optional[bool] = Field(
        None,
        description="per-utterance waveform normalisation; None = as the checkpoint's feature extractor (or feat_extract_norm == 'layer')",
    )
    spec_augment: bool = Field(False, description="keep the model's SpecAugment time/feature masking during training")


class SSLEncoder(Encoder):
    """A transformers waveform model (``*Model``) as an audiomoe encoder."""

    family: ClassVar[str] = "ssl"
    Params = SSLParams
    # masked_spec_embed only enters with SpecAugment time masking; a key bias shifts every logit of a
    # query equally, which softmax cancels, so its gradient is zero by construction
    gradient_exempt: ClassVar[tuple[str, ...]] = ("model.masked_spec_embed", "*.k_proj.bias")

    @classmethod
    def hf_classes(cls) -> tuple[type, type]:  # pragma: no cover - subclasses override
        """(config class, model class) from transformers."""
        raise NotImplementedError

    def __init__(self, params: SSLParams) -> None:
        super().__init__(params)
        config_cls, model_cls = self.hf_classes()
        p = self.params
        extractor: dict[str, Any] = {}
        if p.pretrained is not None:
            path = resolve_pretrained(p.pretrained, f"encoder '{self.family}'")
            check_model_type(path, config_cls.model_type, f"encoder '{self.family}'")
            overrides = {**p.config, "apply_spec_augment": p.spec_augment}
            model, info = model_cls.from_pretrained(
                str(path), local_files_only=True, output_loading_info=True, **overrides
            )
            missing = [k for k in info["missing_keys"] if "masked_spec_embed" not in k] + list(info["mismatched_keys"])
            if missing:
                raise MissingPretrainedError(
                    f"encoder '{self.family}': checkpoint '{p.pretrained}' lacks {len(missing)} weights of {model_cls.__name__} "
                    f"(e.g. {missing[:3]}); is it a {self.family} checkpoint?"
                )
            pre = path / "preprocessor_config.json"
            if pre.is_file():
                extractor = json.loads(pre.read_text())
        else:
            try:
                cfg = config_cls(**{**TINY_SSL, **p.config, "apply_spec_augment": p.spec_augment})
            except (TypeError, ValueError) as exc:
                raise AudioMoEError(f"encoder '{self.family}': bad config override {p.config}: {exc}") from exc
            model = model_cls(cfg)
        self.model = model
        cfg = model.config
        layer_norm_fe = cfg.feat_extract_norm == "layer"
        self.normalize = p.normalize if p.normalize is not None else bool(extractor.get("do_normalize", layer_norm_fe))
        self.use_attention_mask = bool(extractor.get("return_attention_mask", layer_norm_fe))
        self.sample_rate = int(extractor.get("sampling_rate", 16000))
        hop, field = 1, 0
        for k, s in zip(cfg.conv_kernel, cfg.conv_stride):
            field += (k - 1) * hop
            hop *= s
        self.receptive_field = field + 1
        self.frame_rate = self.sample_rate / hop
        self.output_dim = cfg.hidden_size
        self.select = LayerSelect(p.layer, cfg.num_hidden_layers + 1)
        if p.freeze:
            freeze_(self.model)
            self.model.eval()

    def train(self, mode: bool = True) -> "SSLEncoder":
        """Switch train/eval mode; a frozen model stays in eval mode (no dropout, no masking)."""
        super().train(mode)
        if self.params.freeze:
            self.model.eval()
        return self

    def num_frames(self, lengths: torch.Tensor) -> torch.Tensor:
        """Valid frames from the conv stack's length formula (0 for clips shorter than one frame)."""
        n = lengths.clone()
        for k, s in zip(self.model.config.conv_kernel, self.model.config.conv_stride):
            n = torch.where(n >= k, torch.div(n - k, s, rounding_mode="floor") + 1, torch.zeros_like(n))
        return n

    def forward(self, waveforms: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> EncoderOutput:
        """Encode ``waveforms`` [B, T] at ``sample_rate`` with valid ``lengths`` [B]."""
        dev = next(self.model.parameters()).device
        x, lengths = prepare_waveforms(waveforms, lengths, dev)
        if self.normalize:
            x = normalize_waveforms(x, lengths)
        if x.shape[1] < self.receptive_field:  # keep the conv stack defined for clips shorter than a frame
            x = nn.functional.pad(x, (0, self.receptive_field - x.shape[1]))
        attn = frames_mask(lengths, x.shape[1]).logical_not().long() if self.use_attention_mask else None
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.params.freeze):
            out = self.model(x.to(self.model.dtype), attention_mask=attn, output_hidden_states=self.select.needs_all)
        states = out.hidden_states if self.select.needs_all else (out.last_hidden_state,)
        feats = self.select(states)
        frames = self.num_frames(lengths).clamp_max(feats.shape[1])
        pad = frames_mask(frames, feats.shape[1])
        return EncoderOutput(feats.masked_fill(pad[..., None], 0.0), pad)
