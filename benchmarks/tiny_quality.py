"""Quality of the trained tiny model, and what lower-bit expert presets cost it.

    python benchmarks/tiny_quality.py [--num-tokens 16384] [--json out.json]

- Held-out text: the tiny's held-out standard-library split (files never trained on) and the
  source of a third-party package that is not part of the standard library (click, installed with
  typer). Reported: next-token NLL with its standard error, perplexity, the MTP block's NLL for
  token i+2, and the text's own unigram entropy (the acceptance bar: NLL at least 1 nat below it).
- Presets: the tiny converted lossless and with 3- and 2-bit routed experts (q3, q2, q2-all),
  each scored on the same held-out tokens. The tiny is not Flash: its experts are 64 x 128, so
  group-wise 2-bit error weighs differently; the same command on a real model is what decides.
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_dsv4.bench import machine  # noqa: E402
from mlx_dsv4.checkpoint.convert import convert  # noqa: E402
from mlx_dsv4.load import load  # noqa: E402
from mlx_dsv4.perplexity import perplexity, read_text_tokens  # noqa: E402
from mlx_dsv4.tiny import trained_tiny_path  # noqa: E402


def heldout_tokens(tok) -> np.ndarray:
    record = json.loads((trained_tiny_path() / "training.json").read_text())
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = [read_text_tokens(tok, root / rel) for rel in record["heldout_files"]]
    return np.concatenate(parts)


def third_party_tokens(tok) -> tuple[np.ndarray, str]:
    import importlib.metadata

    import click

    return read_text_tokens(tok, Path(click.__file__).parent), f"click {importlib.metadata.version('click')}"


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.glob("*.safetensors"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-tokens", type=int, default=None, help="score at most N tokens per text")
    ap.add_argument("--sequence-length", type=int, default=512)
    ap.add_argument("--presets", default="lossless,q3,q2,q2-all")
    ap.add_argument("--json")
    a = ap.parse_args()
    print(f"machine: {machine()}", flush=True)
    model, tok = load("tiny")
    texts = {"stdlib held-out": heldout_tokens(tok)}
    ids, name = third_party_tokens(tok)
    texts[name] = ids
    out, per_token = {"texts": {}, "presets": {}}, {}
    for label, ids in texts.items():
        r = perplexity(model, ids, a.sequence_length, a.num_tokens, mtp=True)
        out["texts"][label] = r.to_dict()
        print(f"{label}: {r.tokens} tokens, NLL {r.nll:.3f} +/- {r.stderr:.3f} (ppl {r.perplexity:.2f}), "
              f"MTP NLL {r.mtp_nll:.3f} +/- {r.mtp_stderr:.3f}, unigram entropy {r.unigram_entropy:.3f}", flush=True)
    ids = texts["stdlib held-out"]
    with tempfile.TemporaryDirectory() as tmp:
        for preset in a.presets.split(","):
            path = convert(trained_tiny_path(), Path(tmp) / preset, preset, progress=False)
            m, _ = load(path)
            r = perplexity(m, ids, a.sequence_length, a.num_tokens)
            out["presets"][preset] = {"bytes": dir_bytes(path), **r.to_dict()}
            per_token[preset] = r.per_token
            print(f"{preset}: {dir_bytes(path) / 1e6:.2f} MB, NLL {r.nll:.4f} +/- {r.stderr:.4f}", flush=True)
    if "lossless" in per_token:
        for preset, r in out["presets"].items():
            # paired difference on the same tokens: the shared text's variance cancels
            d = per_token[preset] - per_token["lossless"]
            r["delta_nll"], r["delta_stderr"] = float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))
            print(f"{preset}: delta NLL vs lossless {r['delta_nll']:+.4f} +/- {r['delta_stderr']:.4f}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
