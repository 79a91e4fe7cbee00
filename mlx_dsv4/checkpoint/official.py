"""The official DeepSeek-V4 checkpoint layout (spec section 7.1), derived from config.json alone.

Every FP8 e4m3 weight has an E8M0 `.scale` on a [ceil(out/128), ceil(in/128)] grid; every routed
expert weight is packed FP4 (I8 [out, in/2], two e2m1 codes per byte) with an E8M0 `.scale`
[out, in/32], or FP8 like the rest in checkpoints without `"expert_dtype": "fp4"` (the -Base
models). Norms are BF16; mHC parameters, attn_sink, ape and gate.bias are F32; tid2eid is I64.
"""

from __future__ import annotations

import re
import warnings

from ..config import ConfigError, ModelArgs, from_hf_config
from .errors import (
    CheckpointConfigError,
    DtypeMismatchError,
    MissingTensorError,
    ShapeMismatchError,
    UnknownTensorError,
)
from .safetensors_io import ShardSet

Spec = tuple[str, tuple[int, ...]]  # (safetensors dtype, shape)
FP8_BLOCK = 128
FP4_GROUP = 32
EXPERT_RE = re.compile(r"^(?P<prefix>.+\.ffn\.experts)\.(?P<e>\d+)\.(?P<w>w[123])\.weight$")


def model_args(hf_config: dict) -> ModelArgs:
    """ModelArgs from the HF config, with config problems reported as CheckpointConfigError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the DSpark note is reported once, by the caller
            return from_hf_config(hf_config)
    except ConfigError as e:
        raise CheckpointConfigError(str(e)) from None


def is_dspark(hf_config: dict) -> bool:
    """Flash-0731 style: its mtp.* namespace holds DSpark drafter stages, not the V4 MTP block."""
    n = hf_config.get("num_hidden_layers", 0) + hf_config.get("num_nextn_predict_layers", 0)
    return any(k.startswith("dspark_") for k in hf_config) or len(hf_config.get("compress_ratios", [])) > n


def skip_reason(name: str, hf_config: dict) -> str | None:
    """Why a tensor present in an official checkpoint is deliberately not converted (None: keep it)."""
    m = re.match(r"mtp\.(\d+)\.", name)
    if not m:
        return None
    if is_dspark(hf_config):
        return ("DSpark drafter stages (Flash-0731 mtp.*) are a different layout; "
                "speculative decoding with them is not supported")
    if int(m[1]) >= hf_config.get("num_nextn_predict_layers", 0):
        return "MTP stage beyond num_nextn_predict_layers"
    if "emb" in name or name.endswith("head.weight"):
        return "the MTP shares the main model's embed and head"
    return None


def resolve_expert_dtype(hf_config: dict) -> str:
    """'fp4' or 'fp8'. The official code builds FP8 experts unless expert_dtype == 'fp4'."""
    return "fp4" if hf_config.get("expert_dtype") == "fp4" else "fp8"


def _fp8(out: int, inp: int) -> dict[str, Spec]:
    return {"weight": ("F8_E4M3", (out, inp)),
            "scale": ("F8_E8M0", (-(-out // FP8_BLOCK), -(-inp // FP8_BLOCK)))}


def _fp4(out: int, inp: int) -> dict[str, Spec]:
    return {"weight": ("I8", (out, inp // 2)), "scale": ("F8_E8M0", (out, inp // FP4_GROUP))}


def _block(p: str, a: ModelArgs, ratio: int, hashed: bool, expert_dtype: str) -> dict[str, Spec]:
    d, H, D, G = a.dim, a.n_heads, a.head_dim, a.o_groups
    nmix = (2 + a.hc_mult) * a.hc_mult
    t: dict[str, Spec] = {}

    def add(name: str, specs: dict[str, Spec]):
        for suffix, spec in specs.items():
            t[f"{p}.{name}.{suffix}"] = spec

    for site in ("attn", "ffn"):
        t[f"{p}.{site}_norm.weight"] = ("BF16", (d,))
        t[f"{p}.hc_{site}_fn"] = ("F32", (nmix, a.hc_mult * d))
        t[f"{p}.hc_{site}_base"] = ("F32", (nmix,))
        t[f"{p}.hc_{site}_scale"] = ("F32", (3,))
    add("attn.wq_a", _fp8(a.q_lora_rank, d))
    add("attn.wq_b", _fp8(H * D, a.q_lora_rank))
    add("attn.wkv", _fp8(D, d))
    add("attn.wo_a", _fp8(G * a.o_lora_rank, H * D // G))
    add("attn.wo_b", _fp8(d, G * a.o_lora_rank))
    t[f"{p}.attn.q_norm.weight"] = ("BF16", (a.q_lora_rank,))
    t[f"{p}.attn.kv_norm.weight"] = ("BF16", (D,))
    t[f"{p}.attn.attn_sink"] = ("F32", (H,))
    comps = []
    if ratio:
        comps.append(("attn.compressor", D, ratio))
    if ratio == 4:
        comps.append(("attn.indexer.compressor", a.index_head_dim, ratio))
        add("attn.indexer.wq_b", _fp8(a.index_n_heads * a.index_head_dim, a.q_lora_rank))
        t[f"{p}.attn.indexer.weights_proj.weight"] = ("BF16", (a.index_n_heads, d))
    for c, width, m in comps:
        coff = 2 if m == 4 else 1  # ratio 4 overlaps two windows
        t[f"{p}.{c}.wkv.weight"] = ("BF16", (coff * width, d))
        t[f"{p}.{c}.wgate.weight"] = ("BF16", (coff * width, d))
        t[f"{p}.{c}.ape"] = ("F32", (m, coff * width))
        t[f"{p}.{c}.norm.weight"] = ("BF16", (width,))
    t[f"{p}.ffn.gate.weight"] = ("BF16", (a.n_routed_experts, d))
    if hashed:
        t[f"{p}.ffn.gate.tid2eid"] = ("I64", (a.vocab_size, a.n_activated_experts))
    else:
        t[f"{p}.ffn.gate.bias"] = ("F32", (a.n_routed_experts,))
    inter = a.moe_inter_dim
    for w, (o, i) in (("w1", (inter, d)), ("w2", (d, inter)), ("w3", (inter, d))):
        add(f"ffn.shared_experts.{w}", _fp8(o, i))
    packed = _fp4 if expert_dtype == "fp4" else _fp8
    for e in range(a.n_routed_experts):
        for w, (o, i) in (("w1", (inter, d)), ("w2", (d, inter)), ("w3", (inter, d))):
            add(f"ffn.experts.{e}.{w}", packed(o, i))
    return t


def expected_tensors(hf_config: dict, expert_dtype: str | None = None) -> dict[str, Spec]:
    """Every tensor an official checkpoint for `hf_config` holds (scales included), in file order
    terms: name -> (safetensors dtype, shape). expert_dtype overrides the config's ('fp4'/'fp8').
    DSpark drafter stages (Flash-0731 mtp.*) are not listed: they are skipped, see skip_reason."""
    a = model_args(hf_config)
    expert_dtype = expert_dtype or resolve_expert_dtype(hf_config)
    if expert_dtype not in ("fp4", "fp8"):
        raise CheckpointConfigError(f"expert_dtype {expert_dtype!r} is not one of fp4, fp8")
    if expert_dtype == "fp4" and (a.dim % FP4_GROUP or a.moe_inter_dim % FP4_GROUP):
        raise CheckpointConfigError(f"FP4 experts need hidden_size and moe_intermediate_size divisible by {FP4_GROUP}")
    d, hc = a.dim, a.hc_mult
    t: dict[str, Spec] = {"embed.weight": ("BF16", (a.vocab_size, d))}
    for L in range(a.n_layers):
        t.update(_block(f"layers.{L}", a, a.ratio(L), L < a.n_hash_layers, expert_dtype))
    t.update({"norm.weight": ("BF16", (d,)), "head.weight": ("BF16", (a.vocab_size, d)),
              "hc_head_fn": ("F32", (hc, hc * d)), "hc_head_base": ("F32", (hc,)), "hc_head_scale": ("F32", (1,))})
    if is_dspark(hf_config):
        return t
    for i in range(a.n_mtp_layers):
        p = f"mtp.{i}"
        t.update(_block(p, a, a.ratio(a.n_layers + i), False, expert_dtype))
        t.update(_fp8_named(f"{p}.e_proj", d, d) | _fp8_named(f"{p}.h_proj", d, d))
        for n in ("enorm", "hnorm", "norm"):
            t[f"{p}.{n}.weight"] = ("BF16", (d,))
        t.update({f"{p}.hc_head_fn": ("F32", (hc, hc * d)), f"{p}.hc_head_base": ("F32", (hc,)),
                  f"{p}.hc_head_scale": ("F32", (1,))})
    return t


def _fp8_named(name: str, out: int, inp: int) -> dict[str, Spec]:
    return {f"{name}.{k}": v for k, v in _fp8(out, inp).items()}


def detect_expert_dtype(shards: ShardSet, hf_config: dict) -> str:
    """The experts' format as stored (the config key is absent in the initial Flash release)."""
    for name, info in shards.tensors.items():
        if EXPERT_RE.match(name) and not skip_reason(name, hf_config):
            return "fp4" if info.dtype == "I8" else "fp8"
    return resolve_expert_dtype(hf_config)


def check_inventory(shards: ShardSet, hf_config: dict, expert_dtype: str) -> tuple[dict[str, Spec], dict[str, str]]:
    """Compare the checkpoint with the layout the config implies. Returns (expected, skipped
    {name: reason}); raises the specific error for the first mismatched, unknown or missing tensor."""
    expected = expected_tensors(hf_config, expert_dtype)
    skipped = {n: r for n in shards.tensors if n not in expected and (r := skip_reason(n, hf_config))}
    stated = hf_config.get("expert_dtype")
    for name, (dt, shape) in expected.items():
        info = shards.tensors.get(name)
        if info is None:
            continue
        if info.dtype != dt:
            hint = ""
            if EXPERT_RE.match(name.replace(".scale", ".weight")):
                hint = f" (experts read as {expert_dtype}; config.json expert_dtype is {stated!r})"
            raise DtypeMismatchError(f"dtype {info.dtype}, the official layout has {dt}{hint}", info.file, name)
        if info.shape != shape:
            raise ShapeMismatchError(f"shape {list(info.shape)}, config.json implies {list(shape)}", info.file, name)
    unknown = [n for n in shards.tensors if n not in expected and n not in skipped]
    if unknown:
        info = shards.tensors[unknown[0]]
        raise UnknownTensorError(f"not part of DeepSeek-V4 for this config.json ({len(unknown)} unknown tensors "
                                 "in total)", info.file, unknown[0])
    missing = [n for n in expected if n not in shards.tensors]
    if missing:
        raise MissingTensorError(f"required by config.json but absent from every shard ({len(missing)} missing "
                                 "in total)", shards.root, missing[0])
    return expected, skipped
