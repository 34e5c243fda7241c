"""The shared base of the neural codecs on transformers (``dac``, ``encodec``, ``mimi``): not a component itself.

A neural codec (SoundStream, Zeghidour et al. 2021) maps audio ``x`` [T] through a strided conv
encoder to latents ``z`` [F, D] at ``frame_rate = sample_rate / hop`` frames per second and
quantises them with residual VQ: stage ``q`` picks ``c_q = argmin_c ||r_q - c||`` of the
residual ``r_q = z - sum_{j<q} c_j``; the codes [K, F] are the chosen indices. This base holds
what the three plugins share:

- Weights: ``pretrained`` is a local directory in Hugging Face layout (``save_pretrained``) or a
  model id found in the local HF cache, never downloaded; else a random model from the plugin's
  tiny config with ``config`` overrides, seeded by ``seed`` (tests; the same seed gives the same
  weights). Giving both is an error. The model is kept in eval mode without gradients: a codec
  is a fixed tokenizer (DAC's quantizer dropout in train mode would change the codes).
- ``encode(waveforms [B, T], lengths, input_rate=None)``: audio at ``input_rate`` (default: the
  codec's ``sample_rate``) is resampled through :func:`audiomoe.core.resample.resample_batch`
  (the kit's one bounded resampler); samples past each length are zeroed and passed as the
  padding mask where the model takes one. Codes [B, K, F] long with ``F = ceil(T / hop)`` and
  frame lengths ``ceil(lengths / hop)``.
- ``decode(codes [B, K', F])`` (``K' <= K``, the first codebooks): waveforms [B, T'] at
  ``sample_rate``, the model's own decode (``T'`` about ``F * hop``).
- ``cache_key()``: a hash of the plugin, its params and the weights' bytes, naming the cache of
  codes made with it (:func:`audiomoe.data.codes.codec_codes`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, ClassVar, Optional

import torch
from pydantic import Field

from audiomoe.core.errors import AudioMoEError
from audiomoe.core.interfaces import Codec
from audiomoe.core.resample import resample_batch
from audiomoe.core.specs import Params


class HFCodec(Codec):
    """A transformers audio codec behind the kit's ``Codec`` contract (subclasses name the model and its knobs)."""

    #: ``config.json``'s ``model_type`` a pretrained directory must have
    model_type: ClassVar[str] = ""
    #: transformers class names (config, model), imported lazily
    hf_classes: ClassVar[tuple[str, str]] = ("", "")
    #: the random model's config before ``config`` overrides (tiny: builds and encodes in milliseconds)
    tiny_config: ClassVar[dict[str, Any]] = {}

    class Params(Params):
        pretrained: Optional[str] = Field(
            None, description="local directory (HF layout) or a model id in the local HF cache; never downloaded"
        )
        config: Optional[dict[str, Any]] = Field(
            None, description="overrides of the random tiny config (no pretrained); None = the tiny config as is"
        )
        seed: int = Field(0, ge=0, description="seed of the random weights (no pretrained)")

    def __init__(self, params: Optional[Params] = None) -> None:
        super().__init__(params)
        import transformers

        p = self.params
        what = f"codec '{self.model_type}'"
        config_cls, model_cls = (getattr(transformers, n) for n in self.hf_classes)
        if p.pretrained is not None and p.config is not None:
            raise AudioMoEError(
                f"{what}: give either pretrained (a local checkpoint) or config (a random model), not both; "
                "to change a pretrained model's config, save it again with save_pretrained"
            )
        if p.pretrained is not None:
            from audiomoe.encoders.hf_common import resolve_pretrained

            path = resolve_pretrained(p.pretrained, what)
            found = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
            if found != self.model_type:
                raise AudioMoEError(
                    f"{what}: '{path}' holds a '{found}' model, not '{self.model_type}'; "
                    f"use the codec of that name or a {self.model_type} checkpoint"
                )
            self.params = p.model_copy(update={"pretrained": str(path.resolve())})  # saved params load from anywhere
            model = model_cls.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
        else:
            try:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(p.seed)
                    model = model_cls(config_cls(**{**self.tiny_config, **(p.config or {})}))
            except (TypeError, ValueError) as exc:  # the config's own checks, and the model's (DAC: powers of 2)
                raise AudioMoEError(f"{what}: bad config {p.config}: {exc}") from exc
        model.eval()
        for w in model.parameters():
            w.requires_grad_(False)
        self.model = model
        self.hop = 1
        self._setup(model.config)
        self.frame_rate = self.sample_rate / self.hop
        if p.pretrained is None:
            self._seed_codebooks(torch.Generator().manual_seed(p.seed))

    def _codebooks(self) -> list[tuple[Any, Callable[[torch.Tensor], None]]]:
        """``(codebook module, setter of its [V, D] vectors)`` per RVQ stage, for codebooks transformers zero-initialises."""
        return []

    @torch.no_grad()
    def _seed_codebooks(self, generator: torch.Generator) -> None:
        """Random models: set zero-initialised codebooks, stage by stage, to jittered latent frames of seeded noise.

        EnCodec and Mimi learn their codebooks by EMA k-means, so transformers initialises them to
        zeros and every frame would get code 0. As k-means starts, each stage takes random frames
        of its own input (the residual after the stages before it, captured on 1 s of seeded noise).
        """
        x = 0.1 * torch.randn(1, 1, self.sample_rate, generator=generator)
        mask = torch.ones_like(x, dtype=torch.bool)
        for codebook, set_vectors in self._codebooks():
            seen: list[torch.Tensor] = []
            encode = codebook.encode
            # an instance attribute shadows the method for this one pass: the stage's input is not returned otherwise
            codebook.encode = lambda h, f=encode, seen=seen: (seen.append(h.reshape(-1, h.shape[-1])), f(h))[1]
            try:
                self._encode(x, mask)
            finally:
                del codebook.encode
            if not seen:  # a stage past num_codebooks: never used
                break
            frames = torch.cat(seen)
            pick = torch.randint(frames.shape[0], (self.codebook_size,), generator=generator)
            jitter = 0.1 * frames.std() * torch.randn(self.codebook_size, frames.shape[1], generator=generator)
            set_vectors(frames[pick] + jitter)

    def _setup(self, config: Any) -> None:  # pragma: no cover - every plugin implements it
        """Set ``sample_rate``, ``hop``, ``num_codebooks``, ``codebook_size`` from the config; refuse what is unsupported."""
        raise NotImplementedError

    def _encode(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """Codes [B, K, F] of ``x`` [B, 1, T] (padding zeroed) with ``mask`` [B, 1, T] (True = audio)."""
        raise NotImplementedError

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """Waveforms [B, T'] of ``codes`` [B, K', F]."""
        raise NotImplementedError

    def train(self, mode: bool = True) -> "HFCodec":
        """Keep the model in eval mode whatever the parent's mode: codes must not depend on it."""
        super().train(mode)
        self.model.eval()
        return self

    def num_frames(self, lengths: torch.Tensor) -> torch.Tensor:
        """Frames covering ``lengths`` samples: ``ceil(lengths / hop)``."""
        return torch.div(lengths + self.hop - 1, self.hop, rounding_mode="floor")

    @torch.no_grad()
    def encode(
        self, waveforms: torch.Tensor, lengths: Optional[torch.Tensor] = None, input_rate: Optional[int] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes [B, K, F] long, frame lengths [B])`` of ``waveforms`` [B, T] at ``input_rate`` (default ``sample_rate``)."""
        if waveforms.dim() == 1:
            waveforms = waveforms[None]
        if waveforms.dim() != 2 or not waveforms.is_floating_point():
            raise AudioMoEError(
                f"codec '{self.model_type}': waveforms must be float [B, T] (mono), got {waveforms.dtype} "
                f"{tuple(waveforms.shape)}; down-mix channels and convert PCM to float first"
            )
        device = next(self.model.parameters()).device
        x = waveforms.to(device, torch.float32)
        n = torch.full((x.shape[0],), x.shape[1]) if lengths is None else torch.as_tensor(lengths)
        n = n.to(device=device, dtype=torch.long).clamp(0, x.shape[1])
        if input_rate is not None and int(input_rate) != self.sample_rate:
            x, n = resample_batch(x, n, int(input_rate), self.sample_rate)
        mask = torch.arange(x.shape[1], device=device)[None, :] < n[:, None]
        codes = self._encode((x * mask)[:, None, :], mask[:, None, :]).long()
        return codes, self.num_frames(n).clamp(max=codes.shape[-1])

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Waveforms [B, T'] at ``sample_rate`` from ``codes`` [B, K', F] (the first ``K' <= num_codebooks`` codebooks)."""
        if codes.dim() != 3 or not 1 <= codes.shape[1] <= self.num_codebooks or codes.is_floating_point():
            raise AudioMoEError(
                f"codec '{self.model_type}': codes must be integer [B, K<={self.num_codebooks}, F], got "
                f"{codes.dtype} {tuple(codes.shape)}"
            )
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise AudioMoEError(
                f"codec '{self.model_type}': codes must lie in [0, {self.codebook_size}), got "
                f"[{int(codes.min())}, {int(codes.max())}]; strip a head's special ids (pad, bos) before decoding"
            )
        device = next(self.model.parameters()).device
        return self._decode(codes.to(device, torch.long))

    def cache_key(self) -> str:
        """A hash of the plugin, its params (but the weights' path) and its weights: names caches of its codes."""
        h = hashlib.sha256()
        h.update(json.dumps([self.model_type, self.params.model_dump(exclude={"pretrained"})], sort_keys=True).encode())
        config = {
            k: v for k, v in self.model.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")
        }
        h.update(json.dumps(config, sort_keys=True, default=str).encode())
        for k, v in sorted(self.model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]
