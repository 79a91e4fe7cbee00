"""Build a Model from weights: `load(path_or_name, dtype=None, simulate_qat=True)`.

Accepts "tiny" (a random model of the real architecture with the real tokenizer) or a
checkpoint directory in the official layout with unquantized tensors.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .config import ModelArgs, from_hf_config, load_config
from .model import Model
from .tokenizer import load_tokenizer


class WeightsError(ValueError):
    """Weights that do not match the model; the message names the tensors."""


# Small tensors the reference keeps in float32 whatever the model dtype.
_FP32 = re.compile(r"(hc_\w+|attn_sink|\.ape|gate\.bias|norm\.weight)$")
_EXPERT = re.compile(r"^(.*\.ffn\.experts)\.(\d+)\.(w[123])\.(weight|scales|biases)$")


def to_model_layout(weights: dict[str, mx.array], args: ModelArgs) -> dict[str, mx.array]:
    """Official names -> model names: stack per-expert tensors, tid2eid to int32, drop DSpark stages."""
    out, experts = {}, {}
    n_mtp = args.n_mtp_layers
    for name, w in weights.items():
        m = re.match(r"mtp\.(\d+)\.", name)
        if m and int(m[1]) >= n_mtp:
            continue  # Flash-0731 DSpark drafter stages: recognised, not used yet
        e = _EXPERT.match(name)
        if e:
            experts.setdefault((e[1], e[3], e[4]), {})[int(e[2])] = w
            continue
        out[name] = w.astype(mx.int32) if name.endswith("tid2eid") else w
    for (prefix, proj, kind), per in experts.items():
        if sorted(per) != list(range(args.n_routed_experts)):
            missing = sorted(set(range(args.n_routed_experts)) - set(per))
            raise WeightsError(f"{prefix}.*.{proj}.{kind}: missing experts {missing[:8]}")
        out[f"{prefix}.{proj}.{kind}"] = mx.stack([per[i] for i in range(args.n_routed_experts)])
    return out


def build_model(args: ModelArgs, weights: dict[str, mx.array], dtype=None, simulate_qat: bool = True) -> Model:
    """Instantiate the model and load `weights` (model layout) strictly: every tensor must match."""
    dtype = dtype or mx.bfloat16
    model = Model(args, simulate_qat=simulate_qat)
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unknown = sorted(set(weights) - set(expected))
    if missing or unknown:
        raise WeightsError(f"weights do not match the model: missing {missing[:10]}, unknown {unknown[:10]}")
    cast = {}
    for name, w in weights.items():
        if tuple(w.shape) != tuple(expected[name].shape):
            raise WeightsError(f"{name}: shape {tuple(w.shape)}, expected {tuple(expected[name].shape)}")
        if name.endswith("tid2eid"):
            cast[name] = w.astype(mx.int32)
        elif _FP32.search(name):
            cast[name] = w.astype(mx.float32)
        else:
            cast[name] = w.astype(dtype)
    model.update(tree_unflatten(list(cast.items())))
    model.eval()
    return model


def _read_official_dir(path: Path) -> dict[str, mx.array]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"no .safetensors files in {path}")
    weights = {}
    for f in files:
        if not (path / f).exists():
            raise WeightsError(f"missing shard {path / f}")
        weights.update(mx.load(str(path / f)))
    if any(k.endswith(".scale") for k in weights):
        raise WeightsError(f"{path} holds quantized (FP8/FP4) tensors; convert it first (mlx_dsv4 convert)")
    return weights


def load(path_or_name: str | Path, dtype=None, simulate_qat: bool = True, seed: int = 0):
    """Returns (model, tokenizer)."""
    if str(path_or_name) == "tiny":
        from .tiny import random_weights, tiny_hf_config

        args = from_hf_config(tiny_hf_config("flash"))
        w = {k: mx.array(v) for k, v in random_weights(args, seed).items()}
        model = build_model(args, to_model_layout(w, args), dtype or mx.float32, simulate_qat)
        return model, load_tokenizer(None)
    path = Path(path_or_name)
    if not path.is_dir():
        raise FileNotFoundError(f"no model directory at {path} (and it is not the name 'tiny')")
    args, _ = load_config(path)
    weights = to_model_layout(_read_official_dir(path), args)
    return build_model(args, weights, dtype, simulate_qat), load_tokenizer(path)
