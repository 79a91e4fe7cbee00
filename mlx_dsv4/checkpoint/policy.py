"""Which MLX format each class of weight is converted to.

Formats:
- keep    the checkpoint's own precision, losslessly: packed FP4 -> MLX mxfp4 (a byte repack),
          FP8 + 128x128 E8M0 blocks -> MLX mxfp8 (scales expanded to groups of 32), bf16 stays bf16
- mxfp4, mxfp8   MLX microscaling, group 32 (exact from FP4; FP4 -> mxfp8 and FP8 -> mxfp8 are exact too)
- affine2..affine8   MLX affine quantization with --group-size, bf16 scales and biases (lossy)
- bf16, fp32   dequantized floats (FP8 and FP4 values are exact in bf16)

Small tensors (norms, hc_*, attn_sink, ape, gate.bias) always keep their precision; tid2eid
becomes int32.

Routed experts are 94% of Flash's bytes, so their projections can differ: `experts` sets all three,
`experts_gate_up` (w1, w3) and `experts_down` (w2) override it. The low-bit presets requantize the
official FP4 values themselves (exact in bf16) to MLX affine 2/3-bit, and keep everything else in its
trained format; q2 follows ds4's q2: gate/up at 2 bits, the down projection (which every expert
output passes through last) at 3.
"""

from __future__ import annotations

import re

CLASSES: dict[str, str] = {
    "experts": "routed experts (ffn.experts.*), all three projections",
    "experts_gate_up": "routed experts' gate and up projections w1, w3 (default: as experts)",
    "experts_down": "routed experts' down projection w2 (default: as experts)",
    "shared_experts": "the shared expert (ffn.shared_experts.*)",
    "attention": "attention projections wq_a, wq_b, wkv, wo_b",
    "wo_a": "the grouped output projection attn.wo_a",
    "indexer": "indexer wq_b and weights_proj",
    "compressor": "KV compressor wkv/wgate (main and indexer)",
    "router": "MoE router gate.weight",
    "embed": "token embedding",
    "head": "output head",
    "mtp_proj": "MTP e_proj and h_proj",
}
FORMATS = ("keep", "bf16", "fp32", "mxfp4", "mxfp8") + tuple(f"affine{b}" for b in (2, 3, 4, 5, 6, 8))
GROUP_SIZES = (32, 64, 128)
MX_GROUP = 32

_EXPERT_PARTS = ("experts_gate_up", "experts_down")  # default to the `experts` format
_WHOLE = [c for c in CLASSES if c not in _EXPERT_PARTS]  # what presets set unless they split the experts
_AFFINE_DEFAULT = {c: "keep" for c in ("experts", "router")}
# "small" is not user-selectable: only the all-fp32 preset (for fp32 reference runs) widens it.
PRESETS: dict[str, dict[str, str]] = {
    "lossless": {c: "keep" for c in _WHOLE},
    "bf16": {c: "bf16" for c in _WHOLE},
    "fp32": {c: "fp32" for c in (*_WHOLE, "small")},
    # Experts stay exact mxfp4; the rest is the quality-sensitive part, so 8 bits is the sane default.
    "affine8": {c: _AFFINE_DEFAULT.get(c, "affine8") for c in _WHOLE},
    "affine4": {c: _AFFINE_DEFAULT.get(c, "affine4") for c in _WHOLE},
    # Routed experts only, for 64-128 GB Macs; attention, shared expert and the rest stay as trained.
    "q3": {c: "keep" for c in _WHOLE} | {"experts": "affine3"},
    "q2": {c: "keep" for c in _WHOLE} | {"experts": "affine2", "experts_down": "affine3"},
    "q2-all": {c: "keep" for c in _WHOLE} | {"experts": "affine2"},
}

_RULES = [  # (class, pattern on the official/MLX weight name); first match wins
    ("experts_gate_up", r"\.ffn\.experts\.(\d+\.)?w[13]\."),
    ("experts_down", r"\.ffn\.experts\.(\d+\.)?w2\."),
    ("shared_experts", r"\.ffn\.shared_experts\."),
    ("router", r"\.ffn\.gate\.weight$"),
    ("compressor", r"\.compressor\.(wkv|wgate)\.weight$"),
    ("indexer", r"\.attn\.indexer\.(wq_b|weights_proj)\.weight$"),
    ("wo_a", r"\.attn\.wo_a\.weight$"),
    ("attention", r"\.attn\.(wq_a|wq_b|wkv|wo_b)\.weight$"),
    ("mtp_proj", r"^mtp\.\d+\.(e_proj|h_proj)\.weight$"),
    ("embed", r"^embed\.weight$"),
    ("head", r"^head\.weight$"),
]


def tensor_class(name: str) -> str:
    """The override class of a weight, or 'small' for tensors that always keep their precision."""
    for cls, pat in _RULES:
        if re.search(pat, name):
            return cls
    return "small"


def resolve(quant_mode: str = "lossless", overrides: dict[str, str] | None = None) -> dict[str, str]:
    """class -> format, from a preset plus per-class overrides; rejects unknown names clearly."""
    if quant_mode not in PRESETS:
        raise ValueError(f"unknown quant mode {quant_mode!r}; choose from {', '.join(PRESETS)}")
    preset = PRESETS[quant_mode]
    overrides = overrides or {}
    for cls, fmt in overrides.items():
        if cls not in CLASSES:
            raise ValueError(f"unknown tensor class {cls!r}; choose from {', '.join(CLASSES)}")
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r} for {cls}; choose from {', '.join(FORMATS)}")
    formats = {"small": "keep"} | preset | overrides
    for part in _EXPERT_PARTS:  # explicit part > explicit experts > the preset's part > its experts
        if part not in overrides and ("experts" in overrides or part not in preset):
            formats[part] = formats["experts"]
    return formats


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    """['experts=mxfp4', 'attention=affine8'] -> dict (for command lines)."""
    out = {}
    for item in items or []:
        cls, sep, fmt = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like CLASS=FORMAT, e.g. attention=affine8")
        out[cls.strip()] = fmt.strip()
    return out


def target(fmt: str, source: str, in_dim: int, group_size: int) -> tuple[str, str | None]:
    """The concrete output for one weight: (format, note). `source` is fp4, fp8, bf16 or f32.
    'keep' resolves to the lossless format; a quantized format whose group does not divide the
    input dimension falls back to exact floats, and the note says so."""
    if fmt == "keep":
        fmt = {"fp4": "mxfp4", "fp8": "mxfp8"}.get(source, "bf16" if source == "bf16" else "fp32")
    group = MX_GROUP if fmt.startswith("mx") else group_size
    if (fmt.startswith("mx") or fmt.startswith("affine")) and in_dim % group:
        fallback = "bf16" if source != "f32" else "fp32"
        return fallback, f"input dim {in_dim} is not a multiple of group {group}: stored as {fallback}"
    return fmt, None


def quant_params(fmt: str, group_size: int) -> dict | None:
    """MLX quantization parameters of a format (None for float formats)."""
    if fmt in ("mxfp4", "mxfp8"):
        return {"group_size": MX_GROUP, "bits": 4 if fmt == "mxfp4" else 8, "mode": fmt}
    if fmt.startswith("affine"):
        return {"group_size": group_size, "bits": int(fmt[6:]), "mode": "affine"}
    return None


def output_tensors(fmt: str, shape: tuple[int, ...], group_size: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """suffix -> (safetensors dtype, shape) for a weight of logical `shape` [..., out, in]."""
    *lead, inp = shape
    q = quant_params(fmt, group_size)
    if q is None:
        return {"weight": ("F32" if fmt == "fp32" else "BF16", tuple(shape))}
    out = {"weight": ("U32", (*lead, inp * q["bits"] // 32)),
           "scales": ("U8" if q["mode"] != "affine" else "BF16", (*lead, inp // q["group_size"]))}
    if q["mode"] == "affine":
        out["biases"] = ("BF16", (*lead, inp // q["group_size"]))
    return out
