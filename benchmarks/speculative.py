"""MTP speculative decoding: acceptance, verify cost, and the speed-up to expect on a Mac.

    python benchmarks/speculative.py [--tokens 96] [--ks 1,2,3,4] [--json out.json]

1. Acceptance per draft position and tokens per verify pass for K = 1..4, greedy, on the trained
   tiny model (`tiny`), from held-out Python source (not in its training set) as raw prompts.
2. On the bench model (Flash's layer schedule and attention geometry), the CPU time of a (K+1)-token
   verify and of one MTP draft step, relative to a 1-token decode step, from the same cache state.
3. The expected decode speed-up on a bandwidth-bound Mac for V4-Flash at the measured acceptance:
   tokens per verify / (bytes of a verify + K draft steps, relative to one decode step). Bytes come
   from the official Flash tensor inventory: a decode step reads every non-expert weight, the head
   and 6 of 256 routed experts per layer; a (K+1)-token verify reads the experts that any of its
   tokens routes to (uniform routing assumed: 256 (1 - (1 - 6/256)^(K+1)) per layer, an upper bound);
   a draft step reads the MTP block (6 experts) and the head.
CPU figures are not Mac figures: this CPU is compute-bound, so a verify costs more here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_dsv4.bench import load_bench_model, machine  # noqa: E402
from mlx_dsv4.generate import prefill, stream_generate  # noqa: E402
from mlx_dsv4.load import load  # noqa: E402


def prompts(tok, n: int = 4, length: int = 96) -> list[list[int]]:
    """Starts of held-out Python files: the trained tiny's held-out standard-library split."""
    import sysconfig

    from mlx_dsv4.tiny import trained_tiny_path

    record = json.loads((trained_tiny_path() / "training.json").read_text())
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for rel in record["heldout_files"]:
        ids = tok.encode((root / rel).read_text(errors="replace"), add_special_tokens=False)
        if len(ids) >= length:
            out.append([tok.bos_token_id] + ids[:length])
        if len(out) == n:
            break
    return out


def acceptance(ks, tokens: int) -> dict:
    model, tok = load("tiny")
    res, ps = {}, prompts(tok)
    plain = [[r.token for r in stream_generate(model, tok, p, max_tokens=tokens)] for p in ps]
    for k in ks:
        prop, acc, verifies, emitted, same = np.zeros(k), np.zeros(k), 0, 0, True
        for p, ref in zip(ps, plain):
            rs = list(stream_generate(model, tok, p, max_tokens=tokens, num_draft_tokens=k))
            same &= [r.token for r in rs] == ref
            st = rs[-1]
            # undo the running ratios into counts: acceptance x proposals per position
            n_verify = round(len(rs) / st.mean_accepted_length)
            verifies += n_verify
            emitted += len(rs)
            prop += n_verify
            acc += np.array(st.draft_acceptance) * n_verify
        res[k] = {"acceptance": (acc / prop).round(3).tolist(), "tokens_per_verify": round(emitted / verifies, 3),
                  "same_tokens_as_plain": bool(same)}
        print(f"K={k}: acceptance per position {res[k]['acceptance']}, tokens per verify "
              f"{res[k]['tokens_per_verify']}, greedy output identical: {same}", flush=True)
    return res


def verify_cost(ks, context: int = 512, reps: int = 5) -> dict:
    model = load_bench_model("bench", mx.float32)
    toks = np.random.default_rng(0).integers(0, model.args.vocab_size, context + 8).tolist()
    cache = model.make_cache()
    prefill(model, toks[:context], cache, 512)

    def timed(n: int) -> float:
        best = float("inf")
        for _ in range(reps):
            ck = [c.checkpoint() for c in cache]
            t = time.perf_counter()
            H = model.hidden_streams(mx.array([toks[context : context + n]]), cache)
            mx.eval(model.logits(model.collapse(H)), [c.state for c in cache])
            best = min(best, time.perf_counter() - t)
            for c, s in zip(cache, ck):
                c.rollback(s, 0)
        return best

    step = timed(1)
    mtp_cache = model.make_mtp_cache()
    h = model.hidden_streams(mx.array([toks[:8]]), model.make_cache())
    mx.eval(h)
    best = float("inf")
    for i in range(reps):
        t = time.perf_counter()
        mx.eval(model.mtp_logits(h[:, -1:], mx.array([[toks[8 + i]]]), mtp_cache))
        best = min(best, time.perf_counter() - t)
    out = {"step_ms": round(1e3 * step, 2), "draft_step_rel": round(best / step, 3),
           "verify_rel": {k: round(timed(k + 1) / step, 3) for k in ks}}
    print(f"bench model, context {context}: 1-token step {out['step_ms']} ms; MTP draft step "
          f"{out['draft_step_rel']}x; (K+1)-token verify {out['verify_rel']}x a step", flush=True)
    return out


def flash_bytes() -> dict:
    """Bytes read per decode step, per verify of n tokens, per draft step, for V4-Flash (official formats)."""
    from mlx_dsv4.checkpoint.official import expected_tensors
    from mlx_dsv4.checkpoint.safetensors_io import nbytes

    cfg = json.loads((Path(__file__).resolve().parents[1] / "tests/data/configs/DeepSeek-V4-Flash.config.json")
                     .read_text())
    t = expected_tensors(cfg)
    E, k = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
    per_expert = sum(nbytes(*s) for n, s in t.items() if n.startswith("layers.0.ffn.experts.0."))
    dense = sum(nbytes(*s) for n, s in t.items() if ".ffn.experts." not in n and not n.startswith("mtp.")
                and n != "embed.weight")
    mtp = sum(nbytes(*s) for n, s in t.items() if n.startswith("mtp.") and ".ffn.experts." not in n)
    head = nbytes(*t["head.weight"])
    layers = cfg["num_hidden_layers"]
    return {"dense": dense, "per_expert": per_expert, "layers": layers, "experts": E, "topk": k,
            "mtp_dense": mtp, "head": head}


def mac_speedup(acc: dict, b: dict) -> dict:
    def experts_read(n):  # distinct experts per layer for n tokens, uniform routing
        return b["experts"] * (1 - (1 - b["topk"] / b["experts"]) ** n)

    step = b["dense"] + b["layers"] * b["topk"] * b["per_expert"]
    out = {}
    for k, a in acc.items():
        verify = b["dense"] + b["layers"] * experts_read(k + 1) * b["per_expert"]
        draft = b["mtp_dense"] + b["topk"] * b["per_expert"] + b["head"]
        cost = (verify + k * draft) / step
        out[k] = {"verify_rel": round(verify / step, 3), "draft_rel": round(draft / step, 4),
                  "speedup": round(a["tokens_per_verify"] / cost, 3)}
        print(f"K={k}: Flash verify reads {out[k]['verify_rel']}x a step's bytes, a draft step "
              f"{out[k]['draft_rel']}x; expected speed-up {out[k]['speedup']}x", flush=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--ks", default="1,2,3,4")
    p.add_argument("--json")
    a = p.parse_args()
    ks = [int(k) for k in a.ks.split(",")]
    print(f"machine: {machine()}", flush=True)
    acc = acceptance(ks, a.tokens)
    cost = verify_cost(ks)
    mac = mac_speedup(acc, flash_bytes())
    if a.json:
        Path(a.json).write_text(json.dumps({"acceptance": acc, "cpu_cost": cost, "mac_estimate": mac}, indent=1))


if __name__ == "__main__":
    main()
