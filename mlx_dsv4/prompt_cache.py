"""Prompt caches on disk: prefill a long system prompt or document once, reuse it in later runs.

The file is mlx-lm's prompt-cache format (safetensors; LayerCache is registered with mlx-lm), with
the cached token ids and a fingerprint of the model in its metadata, so a later run can check
that the cache belongs to its model and is a prefix of its prompt.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mlx_lm.models import cache as _mlx_lm_cache

from . import cache as _layer_cache  # noqa: F401  (registers LayerCache with mlx-lm)

# mlx-lm flattens metadata into dotted paths and back: keys must hold no dot and not be numbers
TOKENS_KEY, MODEL_KEY = "mlx_dsv4_tokens", "mlx_dsv4_model"


class PromptCacheError(ValueError):
    """A prompt-cache file that cannot be used; the message names the file and the reason."""


def model_fingerprint(model) -> str:
    """What a cache depends on: the architecture and the weights (a few embedding values stand
    for them: another checkpoint or random seed differs there) and their dtype."""
    a = model.args
    keys = ("vocab_size", "dim", "n_layers", "n_heads", "head_dim", "window_size", "compress_ratios")
    w = model.embed.weight
    d = {k: getattr(a, k, None) for k in keys} | {"embed": [str(w.dtype), w[0, :4].tolist()]}
    return json.dumps(d, sort_keys=True, default=str)


def _check_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.suffix != ".safetensors":
        raise PromptCacheError(f"prompt cache file {p} must end in .safetensors")
    return p


def save_prompt_cache(path: str | os.PathLike, cache: list, metadata: dict[str, str] | None = None,
                      tokens: list[int] | None = None, model=None) -> None:
    """Write `cache` atomically (a temporary file renamed into place). `tokens` (the ids the cache
    holds) and `model` are recorded in the metadata for load_prompt_cache's checks."""
    p = _check_path(path)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    bad = [k for k in meta if "." in k or k.isdigit() or not k]
    if bad:
        raise PromptCacheError(f"metadata keys {bad} are not allowed (no dots, not a number)")
    if tokens is not None:
        if len(tokens) != cache[0].offset:
            raise PromptCacheError(f"{len(tokens)} tokens given but the cache holds {cache[0].offset}")
        meta[TOKENS_KEY] = json.dumps([int(t) for t in tokens])
    if model is not None:
        meta[MODEL_KEY] = model_fingerprint(model)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.stem}.{os.getpid()}.tmp.safetensors")
    try:
        _mlx_lm_cache.save_prompt_cache(str(tmp), cache, meta)
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)


def load_prompt_cache(path: str | os.PathLike, model=None, prompt: list[int] | None = None
                      ) -> tuple[list, dict[str, str]]:
    """(cache, metadata). With `model`, the file must have been made for the same architecture;
    with `prompt`, the cached tokens must be a proper prefix of it (one token at least left)."""
    p = _check_path(path)
    if not p.is_file():
        raise PromptCacheError(f"prompt cache file {p} does not exist")
    try:
        cache, meta = _mlx_lm_cache.load_prompt_cache(str(p), return_metadata=True)
    except Exception as e:  # a truncated or foreign file: say which
        raise PromptCacheError(f"cannot read prompt cache {p}: {e}") from e
    if model is not None and MODEL_KEY in meta and meta[MODEL_KEY] != model_fingerprint(model):
        raise PromptCacheError(f"prompt cache {p} was made for another model ({meta[MODEL_KEY]})")
    if prompt is not None:
        if TOKENS_KEY not in meta:
            raise PromptCacheError(f"prompt cache {p} does not record its tokens; cannot check it against the prompt")
        cached = json.loads(meta[TOKENS_KEY])
        if len(cached) >= len(prompt) or prompt[: len(cached)] != cached:
            i = next((i for i, (a, b) in enumerate(zip(cached, prompt)) if a != b), min(len(cached), len(prompt)))
            raise PromptCacheError(
                f"prompt cache {p} holds {len(cached)} tokens that are not a proper prefix of this "
                f"{len(prompt)}-token prompt (they differ from token {i}); delete the file or use another")
    return cache, meta


def cached_tokens(meta: dict[str, str]) -> list[int] | None:
    return json.loads(meta[TOKENS_KEY]) if TOKENS_KEY in meta else None
