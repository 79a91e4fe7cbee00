"""Decode wall time per token with MTP drafting (num_draft_tokens K) and without (K = 0), on the bench model.

    PYTHONPATH=<tree> python benchmarks/speculative_wall.py [--context 512] [--tokens 24] [--ks 0,2,3] [--rounds 3]

Model: the bench model (mlx_dsv4.tiny.bench_hf_config: V4-Flash's layer schedule and geometry at small
widths, random weights) with the trained-format simulation on, float32 on the CPU, greedy. Its MTP layer
is random too, so drafts are almost never accepted: a round then emits one token for a K-draft chain and a
(K + 1)-token verify. What this measures is the cost of a round, host synchronisations included, not the
speed-up drafting brings a trained model.

The code measured is whatever mlx_dsv4 PYTHONPATH names, so the same script times two trees (run them in
alternation: a machine shared with other work slows both alike). Each round decodes from a copy of the
same prefilled cache; generation tok/s excludes the first token, as stream_generate reports it.
"""

from __future__ import annotations

import argparse
import json
import statistics

import mlx.core as mx
import numpy as np

import mlx_dsv4
from mlx_dsv4.bench import load_bench_model, machine
from mlx_dsv4.generate import prefill, stream_generate
from mlx_dsv4.tokenizer import load_tokenizer


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--ks", default="0,2,3")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    model = load_bench_model("bench", mx.float32)
    tok = load_tokenizer(None)
    ids = np.random.default_rng(0).integers(10, 1000, a.context).tolist()
    cache = model.make_cache()
    prefill(model, ids[:-1], cache, 512)
    res = {}
    for _ in range(a.rounds):
        for k in (int(k) for k in a.ks.split(",")):
            rs = list(stream_generate(model, tok, ids, max_tokens=a.tokens, prompt_cache=[c.copy() for c in cache],
                                      num_draft_tokens=k))
            r = res.setdefault(k, {"tps": [], "tokens": []})
            r["tps"].append(rs[-1].generation_tps)
            r["tokens"].append([x.token for x in rs])
            r["per_verify"] = rs[-1].mean_accepted_length
    out = {"tree": mlx_dsv4.__file__, "machine": machine(), "context": a.context, "tokens": a.tokens,
           "tok_s": {k: round(statistics.median(r["tps"]), 3) for k, r in res.items()},
           "tok_s_all": {k: [round(t, 3) for t in r["tps"]] for k, r in res.items()},
           "tokens_per_verify": {k: r["per_verify"] for k, r in res.items()},
           "first_tokens": {k: r["tokens"][0][:8] for k, r in res.items()}}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
