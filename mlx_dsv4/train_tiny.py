"""Train the embedded tiny DeepSeek-V4 on the Python standard library, on a CPU, reproducibly.

    python -m mlx_dsv4.train_tiny --out DIR [--steps N] [--seq-len L] [--batch B]

The defaults reproduce the shipped mlx_dsv4/tiny_model (its training.json records the settings,
the interpreter, the exact file lists and the loss curve).

The model is the real architecture at toy widths (`trained_tiny_config`): sliding, CSA (with
indexer) and HCA layers, hash- and learned-routed MoE with a shared expert, mHC, sinks and the
MTP layer, on the real 129,280-token vocabulary. Choices, and why:

- Data: Lib/**/*.py of the running interpreter, minus test folders and site-packages; a file goes
  to the held-out split when crc32(relative path) % 50 == 0, so the split is stable across runs.
  Each file is BOS + its text; training windows are sampled uniformly from the concatenation.
- Loss: next-token cross-entropy plus 0.3 x the MTP block's cross-entropy on token i+2 (the weight
  DeepSeek-V3 used early in training), both over the full vocabulary.
- Weights are trained through the formats they are stored in: every forward sees the FP8 128x128
  block, FP4 (1x32) and BF16 roundings of the official layout, with straight-through gradients,
  so the stored checkpoint is exactly the network that was trained.
- The KV simulation (simulate_qat) is off in training: its FP8 / FP4 roundings of activations
  have no useful gradient. Inference runs with it on, as the real models do; the README reports
  the held-out NLL that way.
- The indexer stays at its initialisation: index_topk covers every compressed entry of a training
  sequence (seq_len / 4), so the top-k never discards anything that training could have taught it
  to keep. Past seq_len tokens its choice is uninformed; DeepSeek trains it by distillation from
  the attention scores, which is not done here.
- The routers' selection bias stays zero (DeepSeek adjusts it for load balance, not by gradient).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .checkpoint.official import FP4_GROUP, FP8_BLOCK, expected_tensors
from .config import from_hf_config
from .load import build_model, model_name, official_items, to_model_layout
from .tiny import random_weights, tiny_hf_config

HOLDOUT_MOD = 50
MTP_WEIGHT = 0.3
FP8_MAX, FP4_MAX = 448.0, 6.0


def trained_tiny_config(seq_len: int = 512) -> dict:
    """The official-style config of the trained tiny model (FP8 weights, FP4 routed experts)."""
    cfg = tiny_hf_config("flash", num_hash_layers=2, q_lora_rank=64, o_lora_rank=64, moe_intermediate_size=128,
                         index_n_heads=4, index_topk=seq_len // 4)
    cfg["expert_dtype"] = "fp4"
    cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}
    return cfg


# ---- data -------------------------------------------------------------------------------------

def stdlib_files(root: Path | None = None) -> list[str]:
    """Relative paths of the standard library's .py files, sorted, without tests and site-packages."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.py")
                  if not skip & set(p.relative_to(root).parts[:-1]))


def is_heldout(rel: str) -> bool:
    return zlib.crc32(rel.encode()) % HOLDOUT_MOD == 0


def encode_files(tokenizer, root: Path, files: list[str]) -> np.ndarray:
    """BOS + text of each file, concatenated (undecodable bytes replaced)."""
    bos = tokenizer.bos_token_id
    parts = []
    for rel in files:
        text = (root / rel).read_bytes().decode("utf-8", errors="replace")
        parts.append([bos] + tokenizer.encode(text, add_special_tokens=False))
    return np.fromiter((t for p in parts for t in p), dtype=np.int32)


# ---- trained formats with straight-through gradients -------------------------------------------

def _pow2_scale(amax: mx.array, qmax: float) -> mx.array:
    """2^ceil(log2(amax / qmax)): the E8M0 scale the official files use (amax floored at 1e-4)."""
    return mx.power(2.0, mx.ceil(mx.log2(mx.maximum(amax, 1e-4) / qmax)))


def _e4m3_grid(x: mx.array) -> mx.array:
    # e4m3 (|x| <= 448 after scaling): 3 mantissa bits; subnormal step 2^-9 below 2^-6
    e = mx.floor(mx.log2(mx.maximum(mx.abs(x), 2.0**-6)))
    step = mx.power(2.0, e - 3)
    return mx.round(x / step) * step


def _round_e2m1(x: mx.array) -> mx.array:
    # e2m1 values 0, .5, 1, 1.5, 2, 3, 4, 6: step .5 below 2, 1 below 4, 2 above
    a = mx.abs(x)
    step = mx.where(a < 2, 0.5, mx.where(a < 4, 1.0, 2.0))
    return mx.sign(x) * mx.minimum(mx.round(a / step) * step, FP4_MAX)


def fp8_block_fake(w: mx.array) -> mx.array:
    """[out, in] through 128x128-block FP8 e4m3 (the official weight format), float32."""
    out, inp = w.shape
    R, C = -(-out // FP8_BLOCK), -(-inp // FP8_BLOCK)
    v = mx.pad(w, [(0, R * FP8_BLOCK - out), (0, C * FP8_BLOCK - inp)]).reshape(R, FP8_BLOCK, C, FP8_BLOCK)
    s = _pow2_scale(mx.abs(v).max(axis=(1, 3), keepdims=True), FP8_MAX)
    q = _e4m3_grid(mx.clip(v / s, -FP8_MAX, FP8_MAX)) * s
    return q.reshape(R * FP8_BLOCK, C * FP8_BLOCK)[:out, :inp]


def _in_file_shape(rule, name: str):
    """`rule` applied to the model tensor `name` in the shape its one file tensor has (load.official_items: wo_a's
    [G R, in] for the model's [G, R, in], so its FP8 blocks are the file's)."""
    return lambda w: rule(official_items(name, w)[0][1]).reshape(w.shape)


def fp4_fake(w: mx.array) -> mx.array:
    """[..., in] through FP4 e2m1 with one power-of-two scale per 32 inputs (the experts' format)."""
    v = w.reshape(*w.shape[:-1], -1, FP4_GROUP)
    s = _pow2_scale(mx.abs(v).max(axis=-1, keepdims=True), FP4_MAX)
    return (_round_e2m1(v / s) * s).reshape(w.shape)


def bf16_fake(w: mx.array) -> mx.array:
    return w.astype(mx.bfloat16).astype(mx.float32)


def straight_through(w: mx.array, q: mx.array) -> mx.array:
    return w + mx.stop_gradient(q - w)


def storage_rounding(hf_config: dict) -> dict[str, callable]:
    """Model parameter name -> the rounding of its official storage format."""
    spec = expected_tensors(hf_config)
    rules = {}
    for name, (dt, _) in spec.items():
        if name.endswith(".scale"):
            continue
        rule = {"F8_E4M3": fp8_block_fake, "I8": fp4_fake, "BF16": bf16_fake}.get(dt)
        if rule is not None and model_name(name) == name:
            rule = _in_file_shape(rule, name)
        name = model_name(name)  # experts stacked, a compressor's pair fused: one storage format each
        if rules.get(name, rule) is not rule:
            raise ValueError(f"{name}: its official tensors are stored in different formats")
        rules[name] = rule
    return rules


def apply_rounding(params: dict, rules: dict) -> dict:
    flat = [(k, straight_through(v, rules[k](v)) if rules.get(k) else v) for k, v in tree_flatten(params)]
    return tree_unflatten(flat)


# ---- the model and its losses ------------------------------------------------------------------

def init_model(hf_config: dict, seed: int = 0):
    args = from_hf_config(hf_config)
    w = {k: mx.array(v) for k, v in random_weights(args, seed).items()}
    for k in w:  # start from an identity-like residual path: unit norms, neutral mixing
        if k.endswith("norm.weight"):
            w[k] = mx.ones_like(w[k])
        elif k == "embed.weight":
            w[k] = w[k] * 0.5
    return build_model(args, to_model_layout(w, args), mx.float32, simulate_qat=False)


def restricted_logits(model, h: mx.array, vocab: mx.array, other: mx.array, n_other: int) -> mx.array:
    """Logits over the training vocabulary plus one column for all other tokens together.

    Every token outside `vocab` has the same head row `other`, so the full-vocabulary softmax
    equals this one with the extra column's logit other.h + log(n_other): the loss is exactly the
    full-vocabulary cross-entropy of the stored model, at a fifth of the cost."""
    x = h.astype(mx.float32)
    rest = x @ other + math.log(n_other)
    return mx.concatenate([x @ model.head.weight[vocab].T, rest[..., None]], axis=-1)


def losses(model, tokens: mx.array, vocab: mx.array, other: mx.array, n_other: int):
    """tokens [2, B, L + 2] (ids; the same remapped into `vocab` for the targets) ->
    (mean NLL of token i+1, mean NLL of token i+2 from the MTP block), all in MLX: the reference
    that `head_nll` and `train_step` are tested against."""
    hc, d = trunk(model, tokens[0])
    main = nn.losses.cross_entropy(restricted_logits(model, hc, vocab, other, n_other), tokens[1][:, 1:-1],
                                   reduction="mean")
    mtp = nn.losses.cross_entropy(restricted_logits(model, d, vocab, other, n_other), tokens[1][:, 2:],
                                  reduction="mean")
    return main, mtp


def trunk(model, x: mx.array) -> tuple[mx.array, mx.array]:
    """x [B, L + 2] -> the head's inputs: the trunk's collapsed hidden at 0..L-1 (predicting i+1)
    and the MTP block's (predicting i+2)."""
    h = model.hidden_streams(x[:, :-2], model.make_cache(compact=False))
    return model.collapse(h), model.mtp[0].collapse(model.mtp_streams(h, x[:, 1:-1]))


def head_nll(h: np.ndarray, w: np.ndarray, other: np.ndarray, n_other: int, targets: np.ndarray):
    """Mean cross-entropy of `restricted_logits` and its gradients, in numpy.

    h [N, D] head inputs, w [V, D] the head rows of the training vocabulary, targets [N] in [0, V].
    Returns (nll, d/dh, d/dw, d/dother). Why numpy: the softmax over 24k columns is most of a
    training step, and numpy's vectorised exp is ~25x MLX's scalar CPU exp."""
    n = len(h)
    z = h @ w.T  # [N, V], contiguous: the matmuls below stay BLAS calls without copies
    zo = h @ other + np.float32(math.log(n_other))  # the shared column
    top = np.maximum(z.max(axis=1), zo)
    z -= top[:, None]
    zo -= top
    rows = np.arange(n)
    picked = np.where(targets < len(w), z[rows, np.minimum(targets, len(w) - 1)], zo)
    np.exp(z, out=z)
    np.exp(zo, out=zo)
    total = z.sum(axis=1) + zo
    nll = float(np.mean(np.log(total) - picked))
    scale = (1.0 / (total * n)).astype(np.float32)
    z *= scale[:, None]  # dNLL/dlogits = (softmax - onehot) / N
    zo *= scale
    inside = targets < len(w)
    z[rows[inside], targets[inside]] -= np.float32(1.0 / n)
    zo[~inside] -= np.float32(1.0 / n)
    return nll, z @ w + np.outer(zo, other), z.T @ h, zo @ h


def train_step(model, params: dict, rules: dict, tokens: mx.array, vocab_np: np.ndarray, n_other: int):
    """One loss-and-gradient evaluation: (main NLL, MTP NLL, grads of main + MTP_WEIGHT * mtp).

    The trunk runs in MLX; the head's softmax and its gradients run in numpy (`head_nll`), and
    their input gradients flow back through the trunk as cotangents (one more trunk forward)."""
    def heads(p):
        p = apply_rounding(p, rules)
        other = p.pop("other")
        model.update(p)
        return trunk(model, tokens[0]), other

    (hc, d), other = heads(params)
    w = model.head.weight[mx.array(vocab_np)]  # only the training vocabulary's rows leave MLX
    mx.eval(hc, d, other, w)
    w = np.array(w)
    other_np = np.array(other)
    dims = hc.shape
    out = []
    for h, targets in ((hc, tokens[1][:, 1:-1]), (d, tokens[1][:, 2:])):
        out.append(head_nll(np.array(h).reshape(-1, dims[-1]), w, other_np, n_other,
                            np.array(targets).reshape(-1)))
    (main, dh, dw, do), (mtp, dd, dw2, do2) = out
    cot_h = mx.array(dh.reshape(dims))
    cot_d = mx.array((MTP_WEIGHT * dd).reshape(dims))

    def surrogate(p):
        (a, b), _ = heads(p)
        return (a * cot_h).sum() + (b * cot_d).sum()

    grads = mx.grad(surrogate)(params)
    head = np.zeros(model.head.weight.shape, np.float32)
    head[vocab_np] = dw + MTP_WEIGHT * dw2
    grads["head"]["weight"] = grads["head"]["weight"] + mx.array(head)
    grads["other"] = mx.array(do + MTP_WEIGHT * do2)
    return main, mtp, grads


def train(out: Path, steps: int, seq_len: int, batch: int, lr: float, seed: int, log_every: int = 10,
          files_limit: int | None = None):
    """Train, write the official-layout checkpoint and training.json to `out`; returns (the trained
    model, in memory and exactly as stored; the training record)."""
    from .checkpoint.writer_official import write_official_checkpoint
    from .tokenizer import load_tokenizer

    t0 = time.time()
    mx.random.seed(seed)
    rng = np.random.default_rng(seed)
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root)[:files_limit] if files_limit else stdlib_files(root)
    train_files = [f for f in files if not is_heldout(f)]
    held_files = [f for f in files if is_heldout(f)]
    tok = load_tokenizer(None)
    data = encode_files(tok, root, train_files)
    held = encode_files(tok, root, held_files)
    print(f"data: {len(train_files)} files / {len(data):,} tokens train, {len(held_files)} files / "
          f"{len(held):,} tokens held out ({time.time() - t0:.0f} s)", flush=True)

    cfg = trained_tiny_config(seq_len)
    model = init_model(cfg, seed)
    rules = storage_rounding(cfg)
    # Not trained: the indexer and its compressor (see the module docstring), the hash tables and
    # the selection bias (integer or not learned by gradient).
    flat = dict(tree_flatten(model.parameters()))
    fixed = {k: v for k, v in flat.items() if ".indexer." in k or k.endswith(("tid2eid", "gate.bias"))}
    model.update(apply_rounding(tree_unflatten(list(fixed.items())), rules))  # stored as trained
    params = tree_unflatten([(k, v) for k, v in flat.items() if k not in fixed])
    # the training vocabulary; every other token shares one head row (see restricted_logits)
    vocab_np = np.unique(data)
    n_other = cfg["vocab_size"] - len(vocab_np)
    remap = np.searchsorted(vocab_np, data).astype(np.int32)
    params["other"] = mx.zeros((cfg["hidden_size"],))
    rules["other"] = bf16_fake
    warm = max(1, steps // 20)
    schedule = optim.join_schedules(
        [optim.linear_schedule(lr * 0.01, lr, warm), optim.cosine_decay(lr, max(1, steps - warm), lr * 0.1)], [warm])
    opt = optim.AdamW(schedule, betas=[0.9, 0.95], weight_decay=0.01)

    log = []
    for step in range(1, steps + 1):
        starts = rng.integers(0, len(data) - seq_len - 2, batch)
        b = mx.array(np.stack([np.stack([a[s : s + seq_len + 2] for s in starts]) for a in (data, remap)]))
        main, mtp, grads = train_step(model, params, rules, b, vocab_np, n_other)
        grads, gnorm = optim.clip_grad_norm(grads, 1.0)
        params = opt.apply_gradients(grads, params)
        mx.eval(params, opt.state)
        if step % log_every == 0 or step == 1 or step == steps:
            row = {"step": step, "loss": main + MTP_WEIGHT * mtp, "main": main, "mtp": mtp,
                   "grad_norm": gnorm.item(), "seconds": round(time.time() - t0, 1)}
            log.append(row)
            print(json.dumps(row), flush=True)
    final = apply_rounding(params, rules)  # store exactly the rounded weights trained with
    other = final.pop("other")
    model.update(final)
    outside = np.setdiff1d(np.arange(cfg["vocab_size"]), vocab_np)
    model.head.weight[mx.array(outside)] = other
    weights = official_weights(model, cfg)
    out = Path(out)
    write_official_checkpoint(out, cfg, weights, expert_dtype="fp4", tokenizer=False)
    meta = {"python": platform.python_version(), "implementation": sys.implementation.name,
            "stdlib": str(root), "steps": steps, "seq_len": seq_len, "batch": batch, "lr": lr, "seed": seed,
            "mtp_weight": MTP_WEIGHT, "train_tokens_seen": steps * batch * seq_len,
            "train_files": train_files, "heldout_files": held_files,
            "train_tokens": int(len(data)), "heldout_tokens": int(len(held)), "train_vocab": int(len(vocab_np)),
            "mlx": mx.__version__, "numpy": np.__version__, "seconds": round(time.time() - t0, 1), "log": log}
    (out / "training.json").write_text(json.dumps(meta, indent=1) + "\n")
    return model, meta


def official_weights(model, hf_config: dict) -> dict[str, np.ndarray]:
    """Model parameters (float) -> official names and logical shapes (experts unstacked)."""
    out = {}
    for name, v in tree_flatten(model.parameters()):
        a = np.array(v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v)
        for oname, w in official_items(name, a):
            out[oname] = w.astype(np.int64) if name.endswith("tid2eid") else w
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="new checkpoint directory (must not exist)")
    # the defaults made the shipped model (mlx_dsv4/tiny_model) on a 2-core x86 CPU (training.json: seconds)
    p.add_argument("--steps", type=int, default=1400)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--files-limit", type=int, default=None, help="use only the first N files (smoke tests)")
    p.add_argument("--log-every", type=int, default=10)
    a = p.parse_args(argv)
    if a.out.exists():
        p.error(f"--out {a.out} already exists")
    train(a.out, a.steps, a.seq_len, a.batch, a.lr, a.seed, a.log_every, a.files_limit)


if __name__ == "__main__":
    main()
