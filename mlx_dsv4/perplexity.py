"""Perplexity of a model on text: how users compare conversion presets, and how the trained tiny
model is judged.

The text is cut into non-overlapping windows of `sequence_length` tokens, each scored from an
empty cache, so every window sees the same context lengths whatever the file. The standard error
is that of the per-token mean (tokens taken as independent, as mlx-lm's perplexity does; the
true error is somewhat larger, since neighbouring tokens are correlated).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import mlx.core as mx
import numpy as np


@dataclass
class Perplexity:
    tokens: int  # predictions scored
    nll: float  # mean negative log-likelihood, nats per token
    stderr: float
    perplexity: float
    unigram_entropy: float  # of the text's own token frequencies (a yardstick any model must beat)
    mtp_nll: float | None = None  # the MTP block's NLL for token i+2 (None without MTP)
    mtp_stderr: float | None = None
    per_token: np.ndarray | None = field(default=None, repr=False)  # the NLLs themselves, for paired comparisons

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "per_token"}


def read_text_tokens(tokenizer, path: str | Path, pattern: str = "**/*.py") -> np.ndarray:
    """A text file, or every file under a directory that matches `pattern` (sorted); each file
    is BOS + its text, as the tiny model was trained."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.glob(pattern) if p.is_file())
        if not files:
            raise ValueError(f"no files matching {pattern!r} under {path}")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"no such file or directory: {path}")
    ids = []
    for f in files:
        text = f.read_bytes().decode("utf-8", errors="replace")
        ids.append(tokenizer.bos_token_id)
        ids.extend(tokenizer.encode(text, add_special_tokens=False))
    return np.asarray(ids, dtype=np.int32)


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy (nats) of the empirical token distribution of `tokens`."""
    p = np.bincount(tokens).astype(np.float64)
    p = p[p > 0] / len(tokens)
    return float(-(p * np.log(p)).sum())


def _nll(logits: mx.array, targets: mx.array) -> mx.array:
    return mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def perplexity(model, tokens, sequence_length: int = 512, num_tokens: int | None = None, batch_size: int = 1,
               mtp: bool = False, progress: Callable[[int, int], None] | None = None) -> Perplexity:
    """Score `tokens` (ids) with `model`; `num_tokens` keeps only the first N. With mtp=True the
    MTP block also predicts token i+2 from the trunk's streams at i and token i+1."""
    tokens = np.asarray(tokens, dtype=np.int32).reshape(-1)
    if sequence_length < 3:
        raise ValueError(f"sequence_length must be >= 3, got {sequence_length}")
    if num_tokens is not None:
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        tokens = tokens[:num_tokens]
    if tokens.size and (tokens.min() < 0 or tokens.max() >= model.args.vocab_size):
        raise ValueError(f"token ids outside the model's vocabulary [0, {model.args.vocab_size})")
    n = len(tokens) // sequence_length
    if n == 0:
        raise ValueError(f"{len(tokens)} tokens: fewer than one sequence of {sequence_length}")
    if mtp and not model.mtp:
        raise ValueError("this checkpoint has no MTP layer")
    windows = tokens[: n * sequence_length].reshape(n, sequence_length)
    main, draft = [], []
    for s in range(0, n, batch_size):
        x = mx.array(windows[s : s + batch_size])
        cache = model.make_cache()
        h = model.hidden_streams(x, cache)
        losses = [_nll(model.logits(model.collapse(h[:, :-1])), x[:, 1:])]
        if mtp:
            losses.append(_nll(model.mtp_logits(h[:, :-2], x[:, 1:-1]), x[:, 2:]))
        mx.eval(losses)
        main.append(np.array(losses[0]).reshape(-1))
        if mtp:
            draft.append(np.array(losses[1]).reshape(-1))
        if progress is not None:
            progress(min(s + batch_size, n), n)
    main = np.concatenate(main).astype(np.float64)

    def stats(x):
        return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0

    nll, se = stats(main)
    out = Perplexity(tokens=len(main), nll=nll, stderr=se, perplexity=math.exp(nll),
                     unigram_entropy=unigram_entropy(windows.reshape(-1)), per_token=main)
    if mtp:
        out.mtp_nll, out.mtp_stderr = stats(np.concatenate(draft).astype(np.float64))
    return out
