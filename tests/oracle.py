"""The test oracle: Hugging Face transformers' DeepseekV4ForCausalLM (PyTorch, CPU, float32).

transformers 5.23 was checked against the official semantics. We load our official-layout
random weights into it with our own name map (official -> HF), independent of our model code.
"""

from __future__ import annotations

import re

import numpy as np

_LEAF = [  # (official pattern, HF replacement), applied in order to the part after "layers.L."
    (r"^attn_norm\.", "input_layernorm."),
    (r"^ffn_norm\.", "post_attention_layernorm."),
    (r"^hc_attn_(fn|base|scale)$", r"attn_hc.\1"),
    (r"^hc_ffn_(fn|base|scale)$", r"ffn_hc.\1"),
    (r"^attn\.indexer\.compressor\.", "attn.compressor.indexer.C."),
    (r"^attn\.indexer\.wq_b\.", "attn.compressor.indexer.q_b_proj."),
    (r"^attn\.indexer\.weights_proj\.", "attn.compressor.indexer.scorer.weights_proj."),
    (r"\.C\.wkv\.", ".kv_proj."), (r"\.C\.wgate\.", ".gate_proj."), (r"\.C\.ape$", ".position_bias"),
    (r"\.C\.norm\.", ".kv_norm."),
    (r"^attn\.compressor\.wkv\.", "attn.compressor.kv_proj."),
    (r"^attn\.compressor\.wgate\.", "attn.compressor.gate_proj."),
    (r"^attn\.compressor\.ape$", "attn.compressor.position_bias"),
    (r"^attn\.compressor\.norm\.", "attn.compressor.kv_norm."),
    (r"^attn\.wq_a\.", "attn.q_a_proj."), (r"^attn\.q_norm\.", "attn.q_a_norm."),
    (r"^attn\.wq_b\.", "attn.q_b_proj."), (r"^attn\.wkv\.", "attn.kv_proj."),
    (r"^attn\.wo_a\.", "attn.o_a_proj."), (r"^attn\.wo_b\.", "attn.o_b_proj."),
    (r"^attn\.attn_sink$", "attn.sinks"),
    (r"^attn\.", "self_attn."),
    (r"^ffn\.gate\.bias$", "mlp.gate.e_score_correction_bias"),
    (r"^ffn\.shared_experts\.w1\.", "mlp.shared_experts.gate_proj."),
    (r"^ffn\.shared_experts\.w3\.", "mlp.shared_experts.up_proj."),
    (r"^ffn\.shared_experts\.w2\.", "mlp.shared_experts.down_proj."),
    (r"^ffn\.", "mlp."),
]
_TOP = {"embed.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight",
        "norm.weight": "model.norm.weight", "hc_head_fn": "model.hc_head.hc_fn",
        "hc_head_base": "model.hc_head.hc_base", "hc_head_scale": "model.hc_head.hc_scale"}


def hf_state_dict(weights: dict[str, np.ndarray], n_experts: int) -> dict:
    import torch

    sd, experts = {}, {}
    for name, w in weights.items():
        if name.startswith("mtp."):
            continue  # transformers does not instantiate the MTP block
        if name in _TOP:
            sd[_TOP[name]] = torch.from_numpy(np.asarray(w))
            continue
        m = re.match(r"layers\.(\d+)\.(.*)$", name)
        L, rest = m[1], m[2]
        e = re.match(r"ffn\.experts\.(\d+)\.(w[123])\.weight$", rest)
        if e:
            experts.setdefault(L, {})[(int(e[1]), e[2])] = w
            continue
        for pat, rep in _LEAF:
            rest = re.sub(pat, rep, rest)
        sd[f"model.layers.{L}.{rest}"] = torch.from_numpy(np.asarray(w))
    for L, per in experts.items():
        gate_up = np.stack([np.concatenate([per[(i, "w1")], per[(i, "w3")]], 0) for i in range(n_experts)])
        down = np.stack([per[(i, "w2")] for i in range(n_experts)])
        sd[f"model.layers.{L}.mlp.experts.gate_up_proj"] = torch.from_numpy(gate_up)
        sd[f"model.layers.{L}.mlp.experts.down_proj"] = torch.from_numpy(down)
    return sd


def hf_model(hf_config: dict, weights: dict[str, np.ndarray]):
    import torch
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    cfg = DeepseekV4Config(**hf_config)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(cfg).float().eval()
    model.load_state_dict(hf_state_dict(weights, hf_config["n_routed_experts"]), strict=True)
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.from_numpy(tokens.astype(np.int64)), use_cache=False).logits.float().numpy()
