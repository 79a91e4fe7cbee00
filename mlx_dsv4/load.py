"""Build a Model from weights: `load(path_or_name, dtype=None, simulate_qat=True)`.

Accepts "tiny" (the small trained model shipped in the package, stored in the official FP8 / FP4
layout), "tiny-random" (random weights of the same architecture family, for tests), or a checkpoint
directory / Hub repo id.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .config import ModelArgs, from_hf_config, load_config
from .model import Model
from .tokenizer import load_tokenizer


class WeightsError(ValueError):
    """Weights that do not match the model; the message names the tensors."""


# Small tensors the reference keeps in float32 whatever the model dtype.
_FP32 = re.compile(r"(hc_\w+|attn_sink|\.ape|gate\.bias|norm\.weight)$")
_EXPERT = re.compile(r"^(.*\.ffn\.experts)\.(\d+)\.(w[123])\.(weight|scales|biases)$")
# A compressor's wkv and wgate read the same input: the model holds them as one projection (rows wkv, then wgate).
_PAIR = re.compile(r"^(.*\.compressor)\.(wkv|wgate)(\.(?:weight|scales|biases))?$")
_FUSED = re.compile(r"^(.*\.compressor)\.wkv_gate(\.(?:weight|scales|biases))?$")
# wo_a's rows by output group: [G R, in] in the files, [G, R, in] in the model (attention.GroupedLinear).
_WO_A = re.compile(r"\.attn\.wo_a\.(weight|scales|biases)$")


def model_name(name: str) -> str:
    """The model's name of an official tensor or module: routed experts stacked (no expert index), a
    compressor's wkv / wgate in its fused wkv_gate."""
    e = _EXPERT.match(name)
    if e:
        return f"{e[1]}.{e[3]}.{e[4]}"
    c = _PAIR.match(name)
    return f"{c[1]}.wkv_gate{c[3] or ''}" if c else name


def official_items(name: str, w):
    """(official name, tensor) pairs of one model tensor (mx or numpy): the inverse of to_model_layout, with
    routed experts unstacked, a fused compressor projection split (its rows: wkv, then wgate) and wo_a's groups
    joined."""
    if ".ffn.experts." in name:
        head, tail = name.split(".ffn.experts.")
        return [(f"{head}.ffn.experts.{e}.{tail}", w[e]) for e in range(w.shape[0])]
    c = _FUSED.match(name)
    if c:
        n = w.shape[0] // 2
        return [(f"{c[1]}.wkv{c[2]}", w[:n]), (f"{c[1]}.wgate{c[2]}", w[n:])]
    if _WO_A.search(name):
        return [(name, w.reshape(-1, w.shape[-1]))]
    return [(name, w)]


def to_model_layout(weights: dict[str, mx.array], args: ModelArgs,
                    experts: range | None = None) -> dict[str, mx.array]:
    """Official names -> model names: stack per-expert tensors, fuse each compressor's wkv and wgate, split
    wo_a's rows by output group (official_items undoes all three), tid2eid to int32, drop DSpark stages.
    experts: stack only these routed experts (a tensor-parallel rank's; the others stay unread)."""
    out, per_expert, pairs = {}, {}, {}
    n_mtp = args.n_mtp_layers
    for name, w in weights.items():
        m = re.match(r"mtp\.(\d+)\.", name)
        if m and int(m[1]) >= n_mtp:
            continue  # Flash-0731 DSpark drafter stages: recognised, not used yet
        e = _EXPERT.match(name)
        if e:
            per_expert.setdefault((e[1], e[3], e[4]), {})[int(e[2])] = w
            continue
        c = _PAIR.match(name)
        if c and c[3]:
            pairs.setdefault(model_name(name), {})[c[2]] = (name, w)
            continue
        if _WO_A.search(name):
            if w.shape[0] % args.o_groups:
                raise WeightsError(f"{name}: {w.shape[0]} rows do not split into {args.o_groups} output groups")
            w = w.reshape(args.o_groups, -1, w.shape[-1])
        out[name] = w.astype(mx.int32) if name.endswith("tid2eid") else w
    for (prefix, proj, kind), per in per_expert.items():
        if sorted(per) != list(range(args.n_routed_experts)):
            missing = sorted(set(range(args.n_routed_experts)) - set(per))
            raise WeightsError(f"{prefix}.*.{proj}.{kind}: missing experts {missing[:8]}")
        out[f"{prefix}.{proj}.{kind}"] = mx.stack([per[i] for i in (experts or range(args.n_routed_experts))])
    for fused, pair in pairs.items():
        if len(pair) != 2:
            ((name, _),) = pair.values()
            raise WeightsError(f"{name}: its compressor's {'wgate' if 'wkv' in pair else 'wkv'} is missing")
        (nk, k), (ng, g) = pair["wkv"], pair["wgate"]
        if k.shape != g.shape or k.dtype != g.dtype:
            raise WeightsError(f"{nk} {tuple(k.shape)} {k.dtype} and {ng} {tuple(g.shape)} {g.dtype} differ: "
                               "a compressor's two projections have one shape and format")
        out[fused] = mx.concatenate([k, g], axis=0)
    return out


def model_quantization(quantization: dict) -> dict:
    """A converted config's per-module quantization entries under the model's module names (build_model)."""
    out = {}
    for name, q in quantization.items():
        if not isinstance(q, dict):
            continue
        fused = model_name(name)
        if fused in out and out[fused] != q:
            raise WeightsError(f"{name} is quantized {q}, its compressor partner {out[fused]}: a compressor's wkv "
                               "and wgate must share one format")
        out[fused] = q
    return out


def build_model(args: ModelArgs, weights: dict[str, mx.array], dtype=None, simulate_qat: bool = True,
                quantization: dict | None = None, streamed_experts: bool = False, stage=None) -> Model:
    """Instantiate the model and load `weights` (model layout) strictly: every tensor must match.

    `quantization` (a converted config's per-module {group_size, bits, mode} entries) selects
    which modules become quantized before loading; packed weights and scales keep their dtype.
    streamed_experts: the routed experts are not parameters (weights must not hold them).
    stage (distributed.Stage): build only this pipeline rank's part; `weights` may hold more (the
    rest stays unread, as lazy arrays are only read when evaluated). A distributed.TensorShard:
    build this rank's slice of every layer from the full (lazy) tensors.
    """
    from .distributed import TensorShard

    dtype = dtype or mx.bfloat16
    shard = stage if isinstance(stage, TensorShard) else None
    stage = None if shard is not None else stage
    model = Model(args, simulate_qat=simulate_qat, streamed_experts=streamed_experts, stage=stage, shard=shard)
    if stage is not None:
        weights = {k: v for k, v in weights.items() if stage.owns(k)}
    if shard is not None:
        weights = shard.select(weights)
    if quantization:
        per_module = model_quantization(quantization)
        nn.quantize(model, class_predicate=lambda path, _m: per_module.get(path, False))
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
        elif not mx.issubdtype(w.dtype, mx.floating):
            cast[name] = w  # packed quantized weights and E8M0 scales
        elif _FP32.search(name):
            cast[name] = w.astype(mx.float32)
        else:
            cast[name] = w.astype(dtype)
    model.update(tree_unflatten(list(cast.items())))
    model.eval()
    if stage is not None:  # rank 0 holds the embedding, so it knows the streams' dtype
        from .distributed import agree_stream_dtype

        e = model.embed(mx.zeros((1, 1), dtype=mx.int32)).dtype if stage.first else None  # lazy: not run
        stage.stream_dtype = agree_stream_dtype(stage.group, e)
    return model


def plan_stage(group, args: ModelArgs, weights: dict[str, mx.array] | None, sharding: str = "pipeline",
               quantization: dict | None = None):
    """This rank's distributed.Stage (pipeline) or TensorShard (tensor) for a model split across
    `group` (None: not split). Tensor mode needs no weights, only the config's shapes and formats."""
    if group is None or group.size() == 1:
        return None
    from .distributed import Stage, check_sharding, plan_stages, plan_tensor, tensor_bytes, timeout_from_env
    from .watchdog import Watchdog

    if check_sharding(sharding) == "tensor":
        return plan_tensor(group, args, quantization, timeout_from_env())
    r = group.rank()
    # shapes and dtypes only: lazy arrays are not read
    plan = plan_stages(*tensor_bytes({k: w.nbytes for k, w in weights.items()}, args.n_layers), group.size())
    return Stage(group, plan[r], None, Watchdog(r, timeout_from_env()))


def _own_experts(group, sharding: str, args: ModelArgs) -> range | None:
    """The routed experts a tensor-parallel rank holds (the loaders then read only those); None otherwise."""
    if group is None or group.size() == 1 or sharding != "tensor":
        return None
    from .distributed import tensor_experts

    return tensor_experts(group, args)


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


def _is_official_unquantized(path: Path) -> bool:
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = json.loads(index.read_text()).get("weight_map", {})
    else:
        from .checkpoint.safetensors_io import read_header

        names = {n for f in path.glob("*.safetensors") for n in read_header(f)[0]}
    cfg = json.loads((path / "config.json").read_text())
    return "mlx_dsv4" not in cfg and not any(n.endswith(".scale") for n in names)


def load(path_or_name: str | Path, dtype=None, simulate_qat: bool = True, seed: int = 0,
         revision: str | None = None, expert_memory_gb: float | None = None, group=None,
         sharding: str = "pipeline"):
    """(model, tokenizer) from "tiny" (trained), "tiny-random", a converted MLX directory, an official directory (FP8/FP4
    converted lazily on the fly, or unquantized) or a Hugging Face repo id. Weights load lazily.

    expert_memory_gb: stream the routed experts from the checkpoint files, holding at most this many
    GB of them (an LRU; model.expert_store reports hits and bytes read). Same logits as resident.

    group (an mx.distributed group of size > 1, e.g. distributed.world_group()): this rank builds
    and reads only its share of the model (sharding "pipeline": a contiguous stage of layers, see
    distributed.py; "tensor": a slice of every layer's heads and experts); model(tokens, cache) still
    returns the full logits on every rank."""
    if group is not None and group.size() > 1 and expert_memory_gb is not None:
        raise ValueError("expert streaming and a model split across ranks cannot be combined yet")
    if expert_memory_gb is not None:
        from .expert_store import check_budget

        check_budget(expert_memory_gb)
        if str(path_or_name) == "tiny-random":
            raise ValueError("expert streaming reads experts from checkpoint files; 'tiny-random' has none "
                             "(write one with mlx_dsv4.checkpoint.write_official_checkpoint)")
    if str(path_or_name) == "tiny":
        from .tiny import trained_tiny_path

        path_or_name, dtype = trained_tiny_path(), dtype or mx.float32
    if str(path_or_name) == "tiny-random":
        from .tiny import random_weights, tiny_hf_config

        args = from_hf_config(tiny_hf_config("flash"))
        w = {k: mx.array(v) for k, v in random_weights(args, seed).items()}
        w = to_model_layout(w, args, _own_experts(group, sharding, args))
        model = build_model(args, w, dtype or mx.float32, simulate_qat, stage=plan_stage(group, args, w, sharding))
        return model, load_tokenizer(None)
    path = Path(path_or_name)
    if path.is_dir() and (path / "config.json").exists() and _is_official_unquantized(path):
        if expert_memory_gb is not None:
            raise ValueError(f"{path} holds unquantized weights; expert streaming needs a converted or an "
                             "official FP8/FP4 checkpoint")
        args, _ = load_config(path)
        weights = to_model_layout(_read_official_dir(path), args, _own_experts(group, sharding, args))
        stage = plan_stage(group, args, weights, sharding)
        return build_model(args, weights, dtype, simulate_qat, stage=stage), load_tokenizer(path)
    from .checkpoint import load_weights
    from .checkpoint.hub import resolve_source
    from .checkpoint.source import read_config

    root = resolve_source(path_or_name, revision)
    cfg, weights = load_weights(root, experts=_own_experts(group, sharding, from_hf_config(read_config(root))))
    args = from_hf_config(cfg)
    store = None
    if expert_memory_gb is not None:
        from .expert_store import open_expert_store

        store = open_expert_store(root, cfg, expert_memory_gb, dtype or mx.bfloat16, args.n_activated_experts)
    if store is not None:  # the experts stay in the files: their lazy arrays are dropped unread
        weights = {k: v for k, v in weights.items() if ".ffn.experts." not in k}
    weights = to_model_layout(weights, args)
    model = build_model(args, weights, dtype, simulate_qat, cfg.get("quantization"),
                        streamed_experts=store is not None,
                        stage=plan_stage(group, args, weights, sharding, cfg.get("quantization")))
    model.expert_store = store
    return model, load_tokenizer(root)
