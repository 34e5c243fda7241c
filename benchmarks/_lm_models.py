"""Model builders for ``benchmarks/lm.py``: one decoder-only MoE LM in four implementations with the same weights.

- ``audiomoe``: transformers' ``Qwen2ForCausalLM`` whose MLPs are audiomoe ``MoELayer`` s (through
  :func:`audiomoe.backbones.upcycle.upcycle_causal_lm`): attention, norms, embeddings and head are
  transformers' own code, only the MoE FFN is audiomoe's. Router ``top_k`` k=2 with ``normalize``
  (Mixtral's gate: ``softmax`` over all experts, top-k, renormalised over the picks), no balance loss.
- ``mixtral/<impl>``: the installed ``MixtralForCausalLM`` (no q/k/v bias: the Qwen2 biases are set to 0
  in every model so that the outputs agree), one model per ``experts_implementation``;
- ``qwen2moe/<impl>``: the installed ``Qwen2MoeForCausalLM`` with ``norm_topk_prob=True`` and its shared
  expert disabled (``shared_expert_intermediate_size=0``: an empty expert whose output is exactly 0);
- ``dense``: ``Qwen2ForCausalLM`` with one MLP of the active width ``k x expert width`` (the limit: same
  active FLOPs, no routing), the same non-MLP weights (no output check: it is another model).

State dicts map one to one: ``mlp.moe.router.scorer.layers.0.weight`` is transformers' ``mlp.gate.weight``,
``mlp.moe.experts.{gate_up_proj,down_proj}`` its ``mlp.experts.*`` (transformers v5 stacked layout).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch

from audiomoe.core.errors import AudioMoEError

#: experts implementations transformers v5 offers on CPU (``deepgemm`` and ``sonicmoe`` are CUDA kernels)
CPU_IMPLS = ("eager", "batched_mm", "grouped_mm")
CUDA_IMPLS = CPU_IMPLS  # the kernels of the hub need downloads: not here


def impls_for(s: "LMShape", tokens: int, grad: bool, budget_gib: float = 4.0) -> tuple[str, ...]:
    """:data:`CPU_IMPLS` less ``batched_mm`` where its per-pair copies of the expert weights pass ``budget_gib``.

    ``batched_mm`` gathers ``3 F D`` weights for each of the ``k x tokens`` pairs (for small batches: it is
    meant for decoding); with gradients every layer keeps its copies for backward (4 layers at 1k tokens: 21 GB).
    """
    copies = s.k * tokens * 3 * s.width * s.d * 4 * (s.layers if grad else 1)
    return tuple(i for i in CPU_IMPLS if i != "batched_mm" or copies <= budget_gib * 2**30)


@dataclass(frozen=True)
class LMShape:
    """Sizes of one benchmarked LM: width, depth, heads, experts x expert width, top-k, vocabulary."""

    d: int
    layers: int
    heads: int
    kv_heads: int
    experts: int
    width: int
    k: int = 2
    vocab: int = 4096
    max_pos: int = 2048

    def label(self) -> str:
        """A short description, e.g. ``d512 L4 8x512 top-2``."""
        return f"d{self.d} L{self.layers} {self.experts}x{self.width} top-{self.k}"


def _common(s: LMShape) -> dict:
    return dict(
        vocab_size=s.vocab,
        hidden_size=s.d,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        max_position_embeddings=s.max_pos,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        initializer_range=0.02,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},  # Mixtral's default is 1e6
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,  # greedy decoding then never stops early: every model makes max_new_tokens
    )


def moe_spec(s: LMShape) -> dict:
    """The audiomoe ``moe`` spec matching Mixtral's / Qwen2Moe's (normalised) top-k gate, no aux loss, no shared."""
    return {
        "num_experts": s.experts,
        "router": {"name": "top_k", "params": {"k": s.k, "balance_weight": 0.0}},
        "expert": {"name": "swiglu", "params": {"d_ff": s.width}},
        "num_shared": 0,
    }


def _hf_moe(kind: str, s: LMShape, impl: str) -> torch.nn.Module:
    import transformers

    if kind == "mixtral":
        cfg = transformers.MixtralConfig(
            **_common(s), intermediate_size=s.width, num_local_experts=s.experts, num_experts_per_tok=s.k
        )
        cls = transformers.MixtralForCausalLM
    else:
        cfg = transformers.Qwen2MoeConfig(
            **_common(s),
            moe_intermediate_size=s.width,
            num_experts=s.experts,
            num_experts_per_tok=s.k,
            norm_topk_prob=True,
            shared_expert_intermediate_size=0,
            qkv_bias=True,
            decoder_sparse_step=1,
        )
        cls = transformers.Qwen2MoeForCausalLM
    cfg._experts_implementation = impl
    with warnings.catch_warnings():  # the disabled shared expert's empty weights: "zero-element tensors"
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        return cls(cfg)


def hf_name(name: str) -> str:
    """transformers' name of an audiomoe model's tensor (router gate and experts renamed; everything else as is)."""
    return name.replace("mlp.moe.router.scorer.layers.0.weight", "mlp.gate.weight").replace("mlp.moe.", "mlp.")


@torch.no_grad()
def _load_into(target: torch.nn.Module, source: dict[str, torch.Tensor]) -> None:
    """Copy ``source`` (audiomoe names) into ``target`` (transformers names); every tensor of ``target`` is set."""
    own = target.state_dict()
    done = set()
    for name, value in source.items():
        if name.endswith("router.step"):
            continue  # the aux-loss schedule's position: a buffer with no counterpart (and no effect here)
        key = hf_name(name)
        if key.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) and key not in own:
            continue  # Mixtral has no q/k/v bias: the source's are zero
        if key not in own:
            raise AudioMoEError(f"{type(target).__name__} has no tensor '{key}' (from audiomoe's '{name}')")
        own[key].copy_(value)
        done.add(key)
    for key, value in own.items():
        if key in done:
            continue
        if "shared_expert" in key:  # Qwen2Moe's disabled shared expert: empty, or its gate (output is 0 anyway)
            value.zero_()
            continue
        raise AudioMoEError(f"{type(target).__name__}'s tensor '{key}' has no source in the audiomoe model")


def build_lms(
    s: LMShape, seed: int = 0, impls=CPU_IMPLS, anchors=("mixtral", "qwen2moe")
) -> dict[str, torch.nn.Module]:
    """``{name: model}`` in eval mode, float32: ``audiomoe``, ``dense``, then ``<anchor>/<impl>`` with the same weights."""
    import transformers

    from audiomoe.backbones.upcycle import upcycle_causal_lm

    torch.manual_seed(seed)
    qcfg = transformers.Qwen2Config(**_common(s), intermediate_size=s.k * s.width)
    dense = transformers.Qwen2ForCausalLM(qcfg)
    with torch.no_grad():
        for name, p in dense.named_parameters():
            if name.endswith("_proj.bias"):
                p.zero_()  # Mixtral has none; zero keeps every model computing the same function
    moe = upcycle_causal_lm(copy.deepcopy(dense), moe_spec(s))
    with torch.no_grad():  # distinct experts (upcycling copied the dense MLP into each), as a trained MoE has
        for layer in moe.model.layers:
            ex = layer.mlp.moe.experts
            torch.nn.init.uniform_(ex.gate_up_proj, -(s.d**-0.5), s.d**-0.5)
            torch.nn.init.uniform_(ex.down_proj, -(s.width**-0.5), s.width**-0.5)
    source = moe.state_dict()
    models = {"audiomoe": moe, "dense": dense}
    for kind in anchors:
        for impl in impls:
            hf = _hf_moe(kind, s, impl)
            _load_into(hf, source)
            models[f"{kind}/{impl}"] = hf
    for m in models.values():
        m.eval()
        m.generation_config.eos_token_id = None
        m.generation_config.pad_token_id = 0
    return models


def moe_blocks(models: dict[str, torch.nn.Module], layer: int = 0) -> dict[str, torch.nn.Module]:
    """The MoE FFN of decoder layer ``layer`` of every MoE model: audiomoe's ``MoELayer`` and transformers' blocks."""
    out = {}
    for name, m in models.items():
        if name == "dense":
            continue
        mlp = m.model.layers[layer].mlp
        out[name] = mlp.moe if name == "audiomoe" else mlp
    return out
