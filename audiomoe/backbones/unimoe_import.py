"""The whole released UniMoE-Audio checkpoint into the composed ``unimoe-audio`` model: key map, spec, loader.

UniMoE-Audio (arXiv 2510.13344; code: github.com/HITsz-TMG/Uni-MoE, folder ``UniMoE-Audio/utils``,
class ``UniAudioRVQQwen2_5VLMoEForConditionalGeneration`` in ``UniMoE_Audio_model.py``) is a
Qwen2.5-VL text model whose every MLP is ``UniMoEAudioSparseMoeBlock`` (``UniMoE_Audio_core.py``),
with ``codec_embed_tokens`` (one ``nn.Embedding(codec_vocab_size, D)`` per DAC codebook, summed)
and ``codec_head`` (``nn.Linear(D, K * codec_vocab_size, bias=False)``): one codec space for
speech and music, the task given by ``<|SPEECH_START|>`` / ``<|MUSIC_START|>`` in the text prompt.

Key map (released key -> composed model key; ``{i}`` a layer, ``{k}`` a codebook). Checkpoint files
use ``model.`` for the language model (the class's ``_checkpoint_conversion_mapping`` turns
``^model`` into ``language_model`` when loading); both spellings are accepted.

==================================================  ==========================================================
released (``UniAudioRVQQwen2_5VLMoEForConditional``)  audiomoe ``unimoe-audio``
==================================================  ==========================================================
``model.embed_tokens.weight`` [V_text, D]           ``backbone.lm.model.embed_tokens.weight``
``model.layers.{i}.self_attn.{q,k,v}_proj.weight``  ``backbone.lm.model.layers.{i}.self_attn.{q,k,v}_proj.weight``
``model.layers.{i}.self_attn.{q,k,v}_proj.bias``    ``backbone.lm.model.layers.{i}.self_attn.{q,k,v}_proj.bias``
``model.layers.{i}.self_attn.o_proj.weight``        ``backbone.lm.model.layers.{i}.self_attn.o_proj.weight``
``model.layers.{i}.input_layernorm.weight``         ``backbone.lm.model.layers.{i}.input_layernorm.weight``
``model.layers.{i}.post_attention_layernorm...``    ``backbone.lm.model.layers.{i}.post_attention_layernorm...``
``model.layers.{i}.mlp.gate.weight`` [E+N+S, D]     ``...layers.{i}.mlp.moe.router.scorer.layers.0.weight``
                                                    (rows routed + null) and ``...mlp.moe.shared_gate.weight``
                                                    (rows shared): :data:`~audiomoe.backbones.interop.UNIMOE_KEY_MAP`
``model.layers.{i}.mlp.dynamic_real_moe.deepspeed_  ``...layers.{i}.mlp.moe.experts.gate_up_proj[e]`` /
moe.experts.deepspeed_experts.{e}.*_proj.weight``   ``down_proj[e]`` (gate rows, then up rows)
``model.layers.{i}.mlp.fixed_real_moe.{s}.*_proj``  ``...layers.{i}.mlp.moe.shared.gate_up_proj[s]`` / ``down_proj[s]``
``model.norm.weight``                               ``backbone.lm.model.norm.weight``
``lm_head.weight`` (absent when tied)               ``backbone.lm.lm_head.weight`` (tied: ``embed_tokens``)
``codec_embed_tokens.{k}.weight`` [K_v, D]          ``heads.codec.embed.{k}.weight``
``codec_head.weight`` [K * K_v, D]                  ``heads.codec.out.weight`` (``out_bias: false``)
``visual.*``                                        not imported: the Qwen2.5-VL vision tower (video-to-music)
==================================================  ==========================================================

Verified against the released code: the module names and shapes above (``__init__`` of the model,
decoder layer, MoE block, shared / dynamic expert MLPs, DeepSpeed expert wrappers), the codec
layout of its ``config.json`` (12 codebooks, vocabulary 1027 = 1024 codes + eos 1024, pad 1025,
bos 1026, delays 0, 8..18), that the codec logits are ``codec_head(final_norm(h))`` and the codec
input is the sum of the codebook embeddings. Attention is Qwen2.5-VL's with M-RoPE; for text and
codec positions its three position rows are equal, which is plain RoPE (the test's reference
applies M-RoPE literally). Assumed, not verifiable from stored sources (no weights file is
stored): that the safetensors files hold ``model.``-prefixed keys (``language_model.`` is
accepted too), and whether ``lm_head`` is tied (both are handled). Not in the release, so fresh
in the imported model: the audio encoder (Whisper, loaded from its own ``pretrained``), the
adapter, and the task tokens (initialised from the release's ``<|SPEECH_START|>`` /
``<|MUSIC_START|>`` embeddings when its tokenizer has them). The release conditions TTS on a
voice prompt as codec tokens; the kit conditions on the reference clip through its encoder, so the
adapter needs fine-tuning before generation is meaningful.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from audiomoe.backbones.interop import load_unimoe_block
from audiomoe.core.errors import AudioMoEError

#: released key pattern -> composed model key (see the module docstring for the MoE block and the skips).
RELEASED_KEY_MAP = {
    "model.embed_tokens.weight": "backbone.lm.model.embed_tokens.weight",
    "model.layers.{i}.self_attn.{q,k,v}_proj.{weight,bias}": "backbone.lm.model.layers.{i}.self_attn.{q,k,v}_proj.{weight,bias}",
    "model.layers.{i}.self_attn.o_proj.weight": "backbone.lm.model.layers.{i}.self_attn.o_proj.weight",
    "model.layers.{i}.{input,post_attention}_layernorm.weight": "backbone.lm.model.layers.{i}.{input,post_attention}_layernorm.weight",
    "model.layers.{i}.mlp.*": "backbone.lm.model.layers.{i}.mlp.moe.* (interop.UNIMOE_KEY_MAP)",
    "model.norm.weight": "backbone.lm.model.norm.weight",
    "lm_head.weight": "backbone.lm.lm_head.weight",
    "codec_embed_tokens.{k}.weight": "heads.{head}.embed.{k}.weight",
    "codec_head.weight": "heads.{head}.out.weight",
}
#: released key prefixes with no counterpart in the composed model
SKIPPED_PREFIXES = ("visual.",)
#: the release's task markers (added tokens of its tokenizer) -> the kit's task names
TASK_MARKERS = {"tts": "<|SPEECH_START|>", "text_to_music": "<|MUSIC_START|>"}

_DIRECT = re.compile(
    r"^(model\.(embed_tokens\.weight|norm\.weight|layers\.\d+\.(self_attn\.[qkvo]_proj\.(weight|bias)|"
    r"(input|post_attention)_layernorm\.weight))|lm_head\.weight)$"
)
_CODEC_EMBED = re.compile(r"^codec_embed_tokens\.(\d+)\.weight$")
_MLP = re.compile(r"^model\.layers\.(\d+)\.mlp\.")
_MLP_KEYS = re.compile(
    r"^model\.layers\.\d+\.mlp\.(gate\.weight|dynamic_real_moe\..*experts\.\d+\.(gate|up|down)_proj\.weight|"
    r"fixed_real_moe\.\d+\.(gate|up|down)_proj\.weight)$"
)


def normalize_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Released keys in the file spelling: ``language_model.`` (in-memory module name) -> ``model.``."""
    return {
        ("model." + k[len("language_model.") :] if k.startswith("language_model.") else k): v for k, v in state.items()
    }


def spec_overrides(config: Mapping[str, Any], head: str = "codec") -> list[str]:
    """``--set`` overrides that give the ``unimoe-audio`` preset the released ``config.json``'s sizes."""
    text = config.get("text_config") or config
    need = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"]
    need += ["vocab_size", "mlp_dynamic_expert_num", "mlp_dynamic_null_expert_num", "mlp_fixed_expert_num"]
    need += ["dynamic_intermediate_size", "shared_intermediate_size", "mlp_dynamic_top_p"]
    missing = [k for k in need if k not in text]
    codec = ["codec_channels", "codec_vocab_size", "codec_delay_pattern", "codec_eos_value", "codec_pad_value"]
    missing += [k for k in codec + ["codec_bos_value"] if k not in config]
    if missing:
        raise AudioMoEError(f"not a UniMoE-Audio config.json: it lacks {missing} (text sizes under 'text_config')")
    eos, pad, bos = (int(config[k]) for k in ("codec_eos_value", "codec_pad_value", "codec_bos_value"))
    if (pad, bos, int(config["codec_vocab_size"])) != (eos + 1, eos + 2, eos + 3):
        raise AudioMoEError(
            f"codec ids eos={eos}, pad={pad}, bos={bos}, vocabulary {config['codec_vocab_size']}: the codec head's "
            "layout is codes [0, C), then eos C, pad C + 1, bos C + 2 (vocabulary C + 3), as the release's"
        )
    lm = {
        "model_type": "qwen2",
        **{k: int(text[k]) for k in need[:6]},
        "rms_norm_eps": float(text.get("rms_norm_eps", 1e-6)),
        "rope_theta": float(text.get("rope_theta", 1e6)),
        "max_position_embeddings": int(text.get("max_position_embeddings", 32768)),
        "tie_word_embeddings": bool(text.get("tie_word_embeddings", False)),
    }
    delays = [int(d) for d in config["codec_delay_pattern"]]
    return [
        f"d_model={int(text['hidden_size'])}",
        "backbone.pretrained=null",
        "backbone.config={" + ", ".join(f"{k}: {_yaml(v)}" for k, v in lm.items()) + "}",
        f"backbone.moe.num_experts={int(text['mlp_dynamic_expert_num'])}",
        f"backbone.moe.num_null={int(text['mlp_dynamic_null_expert_num'])}",
        f"backbone.moe.num_shared={int(text['mlp_fixed_expert_num'])}",
        f"backbone.moe.shared_d_ff={int(text['shared_intermediate_size'])}",
        f"backbone.moe.expert.d_ff={int(text['dynamic_intermediate_size'])}",
        # the released block weighs its picks by SparseMixer multipliers: the top_p selector's 'unimoe_code' weights
        "backbone.moe.router.selector={name: top_p, params: {p: "
        + _yaml(float(text["mlp_dynamic_top_p"]))
        + ", weights: unimoe_code}}",
        f"tasks.{head}.num_codebooks={int(config['codec_channels'])}",
        f"tasks.{head}.codebook_size={eos}",
        f"tasks.{head}.delays={json.dumps(delays)}",
        f"tasks.{head}.out_bias=false",
    ]


def _yaml(value: Any) -> str:
    """A value as an override's YAML reads it back: floats with a dot and a signed exponent (YAML 1.1)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value:.10e}" if isinstance(value, float) else json.dumps(value)


@torch.no_grad()
def load_released_state(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], head: str = "codec"
) -> dict[str, Any]:
    """Copy a released state dict into ``model`` (a composed ``unimoe-audio``), strictly; returns a report.

    Every released key is used or under :data:`SKIPPED_PREFIXES`, and every tensor of the backbone's
    LM and of the codec head (but its task tokens) receives one; anything else is an error naming
    the keys. ``report``: ``loaded`` (count), ``skipped`` (released keys not imported), ``fresh``
    (model tensors the release has no value for: encoder, adapter, task tokens).
    """
    state = normalize_keys(state)
    own = model.state_dict()
    lm, codec = "backbone.lm.", f"heads.{head}."
    if f"{codec}out.weight" not in own or f"{lm}model.embed_tokens.weight" not in own:
        raise AudioMoEError(
            f"the model has no causal_lm backbone with a codec head '{head}': compose the unimoe-audio preset"
        )
    filled: set[str] = set()

    def put(dst: str, value: torch.Tensor, src: str) -> None:
        if dst not in own:
            raise AudioMoEError(f"released '{src}' maps to '{dst}', which the model lacks: its layout differs")
        if tuple(own[dst].shape) != tuple(value.shape):
            raise AudioMoEError(
                f"released '{src}' has shape {tuple(value.shape)} but '{dst}' is {tuple(own[dst].shape)}: build the "
                "model from the release's config.json (unimoe_import.spec_overrides)"
            )
        own[dst].copy_(value.to(own[dst].dtype))
        filled.add(dst)

    skipped, unknown, layers = [], [], set()
    for key, value in state.items():
        if key.startswith(SKIPPED_PREFIXES):
            skipped.append(key)
        elif _DIRECT.match(key):
            put(lm + key, value, key)
        elif m := _CODEC_EMBED.match(key):
            put(f"{codec}embed.{m.group(1)}.weight", value, key)
        elif key == "codec_head.weight":
            put(f"{codec}out.weight", value, key)
        elif (m := _MLP.match(key)) and _MLP_KEYS.match(key):
            layers.add(int(m.group(1)))
        else:
            unknown.append(key)
    if unknown:
        raise AudioMoEError(f"released keys with no place in the model: {sorted(unknown)[:6]} ({len(unknown)} in all)")
    if f"{lm}lm_head.weight" in own and f"{lm}lm_head.weight" not in filled and "model.embed_tokens.weight" in state:
        put(f"{lm}lm_head.weight", state["model.embed_tokens.weight"], "model.embed_tokens.weight (tied lm_head)")
    decoder_layers = model.backbone.lm.model.layers
    for i in layers:
        if i >= len(decoder_layers):
            raise AudioMoEError(f"released layer {i} but the model has {len(decoder_layers)} layers")
        moe = decoder_layers[i].mlp.moe
        load_unimoe_block(moe, state, prefix=f"model.layers.{i}.mlp.")
        filled |= {f"{lm}model.layers.{i}.mlp.moe.{k}" for k, t in moe.state_dict().items() if t.is_floating_point()}
    # buffers that are not weights (a router's schedule step, rotary tables) are the model's own
    expected = {
        k
        for k, t in own.items()
        if k.startswith((lm, codec)) and t.is_floating_point() and "rotary_emb" not in k and "task_embed" not in k
    }
    missing = sorted(expected - filled)
    if missing:
        raise AudioMoEError(f"the released state dict has no value for {missing[:6]} ({len(missing)} in all)")
    fresh = sorted({k.split(".")[0] for k in own if not k.startswith((lm, codec))})
    fresh += [k for k in own if k.startswith(codec) and "task_embed" in k]
    return {"loaded": len(filled), "skipped": skipped, "fresh": fresh}


def init_task_tokens(model: torch.nn.Module, head: str = "codec") -> list[str]:
    """Set the codec head's task tokens to the release's task-marker embeddings, where its tokenizer has them."""
    h, tok = model.heads[head], getattr(model.backbone, "tokenizer", None)
    if getattr(h, "task_embed", None) is None or tok is None:
        return []
    done = []
    vocab = tok.get_vocab()
    for row, task in enumerate(h.task_list):
        marker = TASK_MARKERS.get(task)
        if marker in vocab:
            with torch.no_grad():
                h.task_embed.weight[row].copy_(model.backbone.lm.get_input_embeddings().weight[vocab[marker]])
            done.append(task)
    return done


def read_released(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config.json, state dict)`` of a local release directory (``model.safetensors`` or its sharded index)."""
    from safetensors.torch import load_file

    root = Path(directory).expanduser()
    if not (root / "config.json").is_file():
        raise AudioMoEError(f"'{root}' has no config.json: give the local directory of the UniMoE-Audio release")
    config = json.loads((root / "config.json").read_text())
    index = root / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in root.glob("*.safetensors"))
    if not files:
        raise AudioMoEError(f"'{root}' holds no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(root / name)))
    return config, state
