"""A synthetic UniMoE-Audio release (config.json + safetensors in the released key layout) and a reference forward.

Layout from HITsz-TMG/Uni-MoE ``UniMoE-Audio/utils/UniMoE_Audio_model.py`` / ``UniMoE_Audio_core.py``
(``UniAudioRVQQwen2_5VLMoEForConditionalGeneration``): Qwen2.5-VL text layers with q/k/v biases,
M-RoPE, RMSNorm, ``UniMoEAudioSparseMoeBlock`` MLPs, ``codec_embed_tokens`` and ``codec_head``.
The reference reads the released keys directly (no audiomoe code): attention and M-RoPE written
here, the MoE block from :mod:`tests.helpers.unimoe_reference`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from tests.helpers.unimoe_reference import unimoe_block

EXPERTS = "mlp.dynamic_real_moe.deepspeed_moe.experts.deepspeed_experts"


def tiny_config(channels: int = 12, codes: int = 1024, delays: list[int] | None = None) -> dict:
    """A released-format config.json at tiny size (hidden 64, 2 layers, 8 routed + 1 null + 2 shared experts)."""
    text = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 260,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": {"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
        "mlp_dynamic_expert_num": 8,
        "mlp_dynamic_null_expert_num": 1,
        "mlp_fixed_expert_num": 2,
        "dynamic_intermediate_size": 32,
        "shared_intermediate_size": 16,
        "mlp_dynamic_top_p": 0.7,
        "model_type": "qwen2_5_vl_moe_text",
    }
    return {
        "architectures": ["UniAudioRVQQwen2_5VLMoEForConditionalGeneration"],
        "model_type": "uni_audio_rvq_qwen2_5vl_moe",
        "codec_channels": channels,
        "codec_vocab_size": codes + 3,
        "codec_eos_value": codes,
        "codec_pad_value": codes + 1,
        "codec_bos_value": codes + 2,
        "codec_delay_pattern": delays if delays is not None else [0] + list(range(8, 8 + channels - 1)),
        "text_config": text,
    }


def released_state(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the released keys and shapes of ``config`` (plus two vision-tower keys)."""
    g = torch.Generator().manual_seed(seed)
    t = config["text_config"]
    d, h, kv = t["hidden_size"], t["num_attention_heads"], t["num_key_value_heads"]
    hd = d // h

    def w(*shape: int, s: float = 0.1) -> torch.Tensor:
        return s * torch.randn(*shape, generator=g)

    def norm() -> torch.Tensor:
        return 1.0 + w(d)

    cv, k = config["codec_vocab_size"], config["codec_channels"]
    sd = {"model.embed_tokens.weight": w(t["vocab_size"], d), "model.norm.weight": norm()}
    for i in range(t["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd |= {p + "self_attn.q_proj.weight": w(h * hd, d), p + "self_attn.q_proj.bias": w(h * hd)}
        for n in ("k", "v"):
            sd |= {p + f"self_attn.{n}_proj.weight": w(kv * hd, d), p + f"self_attn.{n}_proj.bias": w(kv * hd)}
        sd |= {p + "self_attn.o_proj.weight": w(d, h * hd), p + "input_layernorm.weight": norm()}
        sd[p + "post_attention_layernorm.weight"] = norm()
        e, n, s = t["mlp_dynamic_expert_num"], t["mlp_dynamic_null_expert_num"], t["mlp_fixed_expert_num"]
        sd[p + "mlp.gate.weight"] = w(e + n + s, d, s=0.5)
        for j, f in [(j, t["dynamic_intermediate_size"]) for j in range(e)]:
            q = f"{p}{EXPERTS}.{j}."
            sd |= {q + "gate_proj.weight": w(f, d), q + "up_proj.weight": w(f, d), q + "down_proj.weight": w(d, f)}
        for j in range(s):
            q, f = f"{p}mlp.fixed_real_moe.{j}.", t["shared_intermediate_size"]
            sd |= {q + "gate_proj.weight": w(f, d), q + "up_proj.weight": w(f, d), q + "down_proj.weight": w(d, f)}
    sd |= {f"codec_embed_tokens.{c}.weight": w(cv, d, s=0.3) for c in range(k)}
    sd |= {"lm_head.weight": w(t["vocab_size"], d), "codec_head.weight": w(k * cv, d)}
    sd |= {"visual.patch_embed.proj.weight": w(8, 3, 2, 2, 2), "visual.merger.mlp.0.weight": w(8, 8)}
    return sd


def write_release(root: Path, config: dict, state: dict[str, torch.Tensor]) -> Path:
    """Write ``config.json`` and the state as two safetensors shards with their index (the released file layout)."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config))
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: state[k].contiguous() for k in ks}, str(root / name))
    index = {"weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    return root


def _swiglu(sd: dict[str, torch.Tensor], p: str):
    """The released SwiGLU expert MLP under key prefix ``p``: down(silu(gate x) * up x)."""

    def run(z: torch.Tensor) -> torch.Tensor:
        gate, up = z @ sd[p + "gate_proj.weight"].t(), z @ sd[p + "up_proj.weight"].t()
        return (torch.nn.functional.silu(gate) * up) @ sd[p + "down_proj.weight"].t()

    return run


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _mrope(x: torch.Tensor, pos: torch.Tensor, theta: float, sections: list[int]) -> torch.Tensor:
    """Qwen2.5-VL's multimodal RoPE on x [T, H, hd], the temporal / height / width rows all ``pos`` (text)."""
    hd = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    rows = torch.stack([pos, pos, pos]).float()  # [3, T]: text and codec positions are the same in all three
    freqs = rows[..., None] * inv  # [3, T, hd/2]
    emb = torch.cat([freqs, freqs], -1)
    split = sections * 2
    cos = torch.cat([m[i % 3] for i, m in enumerate(emb.cos().split(split, -1))], -1)[:, None]
    sin = torch.cat([m[i % 3] for i, m in enumerate(emb.sin().split(split, -1))], -1)[:, None]
    rot = torch.cat([-x[..., hd // 2 :], x[..., : hd // 2]], -1)
    return x * cos + rot * sin


def reference_codec_logits(
    config: dict, sd: dict[str, torch.Tensor], prefix: torch.Tensor, frames: torch.Tensor
) -> torch.Tensor:
    """The released model's ``codec_head`` logits [T, K, V] for one sequence ``[prefix embeds | codec frames]``."""
    t = config["text_config"]
    d, h, kv, eps = t["hidden_size"], t["num_attention_heads"], t["num_key_value_heads"], t["rms_norm_eps"]
    hd, k = d // h, config["codec_channels"]
    codec = sum(sd[f"codec_embed_tokens.{c}.weight"][frames[:, c]] for c in range(k))
    x = torch.cat([prefix, codec])
    n = x.shape[0]
    pos = torch.arange(n)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for i in range(t["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = _rms(x, sd[p + "input_layernorm.weight"], eps)
        proj = {m: a @ sd[p + f"self_attn.{m}_proj.weight"].t() + sd[p + f"self_attn.{m}_proj.bias"] for m in "qkv"}
        sec = t["rope_scaling"]["mrope_section"]
        q = _mrope(proj["q"].view(n, h, hd), pos, t["rope_theta"], sec)
        kk = _mrope(proj["k"].view(n, kv, hd), pos, t["rope_theta"], sec).repeat_interleave(h // kv, 1)
        v = proj["v"].view(n, kv, hd).repeat_interleave(h // kv, 1)
        scores = torch.einsum("qhd,khd->hqk", q, kk) / math.sqrt(hd)
        att = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + torch.einsum("hqk,khd->qhd", att, v).reshape(n, d) @ sd[p + "self_attn.o_proj.weight"].t()
        m = _rms(x, sd[p + "post_attention_layernorm.weight"], eps)
        experts = [_swiglu(sd, f"{p}{EXPERTS}.{j}.") for j in range(t["mlp_dynamic_expert_num"])]
        shared = [_swiglu(sd, f"{p}mlp.fixed_real_moe.{j}.") for j in range(t["mlp_fixed_expert_num"])]
        out = unimoe_block(
            m, sd[p + "mlp.gate.weight"], experts, shared, t["mlp_dynamic_null_expert_num"],
            top_p=t["mlp_dynamic_top_p"], training=False,
        )  # fmt: skip
        x = x + out["y"]
    x = _rms(x, sd["model.norm.weight"], eps)
    return (x @ sd["codec_head.weight"].t()).view(n, k, config["codec_vocab_size"])
