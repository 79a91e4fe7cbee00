"""Prompt caches on disk: prefill a long system prompt or document once, reuse it in later runs.

The file is mlx-lm's prompt-cache format (safetensors; LayerCache is registered with mlx-lm), with
the cached token ids and a fingerprint of the model in its metadata, so a later run can check
that the cache belongs to its model and is a prefix of its prompt.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models import cache as _mlx_lm_cache

from .cache import LayerCache  # importing it registers LayerCache with mlx-lm

# mlx-lm flattens metadata into dotted paths and back: keys must hold no dot and not be numbers
TOKENS_KEY, MODEL_KEY, FORMAT_KEY = "mlx_dsv4_tokens", "mlx_dsv4_model", "mlx_dsv4_cache_format"
# What the state arrays mean. 2: a compressor's waiting rows hold g before ape (compressor.py); files without
# the key are 1 (g + ape), which a format-2 cache would pool with ape added twice.
CACHE_FORMAT = "2"
REBUILD = "; delete the file and let the next run rebuild it"


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
    meta[FORMAT_KEY] = CACHE_FORMAT
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
    """(cache, metadata). With `model`, the file must record that model's fingerprint, token ids
    inside its vocabulary, and state arrays of the shapes and dtypes its cache has at that many
    tokens; with `prompt`, the cached tokens must be a proper prefix of it (one token at least left).
    Every refusal is a PromptCacheError naming the file, what is wrong and what to do."""
    p = _check_path(path)
    if not p.is_file():
        raise PromptCacheError(f"prompt cache file {p} does not exist")
    try:
        cache, meta = _mlx_lm_cache.load_prompt_cache(str(p), return_metadata=True)
    except KeyError as e:  # mlx-lm looks up each array the file's layout lists
        raise PromptCacheError(f"prompt cache {p} is damaged: its array {e} is missing{REBUILD}") from e
    except Exception as e:  # a truncated or foreign file: say which
        raise PromptCacheError(f"cannot read prompt cache {p} ({type(e).__name__}: {e}){REBUILD}") from e
    if meta.get(FORMAT_KEY, "1") != CACHE_FORMAT:
        raise PromptCacheError(f"prompt cache {p} is in cache format {meta.get(FORMAT_KEY, '1')}, which this version "
                               f"of mlx-dsv4 does not read (it reads format {CACHE_FORMAT}){REBUILD}")
    tokens = _recorded_tokens(p, meta)
    if model is not None:
        if MODEL_KEY not in meta:
            raise PromptCacheError(f"prompt cache {p} records no model fingerprint, so it cannot be checked against "
                                   f"this model (save it with save_prompt_cache(..., model=model)){REBUILD}")
        if meta[MODEL_KEY] != model_fingerprint(model):
            raise PromptCacheError(f"prompt cache {p} was made for another model ({meta[MODEL_KEY]}){REBUILD}")
        if tokens is not None:
            vocab = model.args.vocab_size
            bad = [t for t in tokens if not 0 <= t < vocab]
            if bad:
                raise PromptCacheError(f"prompt cache {p} holds token ids {bad[:5]} outside the model's vocabulary "
                                       f"[0, {vocab}){REBUILD}")
        check_cache_layout(cache, model, len(tokens) if tokens is not None else None, p)
    if prompt is not None:
        if tokens is None:
            raise PromptCacheError(f"prompt cache {p} does not record its tokens; cannot check it against the prompt")
        cached = tokens
        if len(cached) >= len(prompt) or prompt[: len(cached)] != cached:
            i = next((i for i, (a, b) in enumerate(zip(cached, prompt)) if a != b), min(len(cached), len(prompt)))
            raise PromptCacheError(
                f"prompt cache {p} holds {len(cached)} tokens that are not a proper prefix of this "
                f"{len(prompt)}-token prompt (they differ from token {i}); delete the file or use another")
    return cache, meta


def _recorded_tokens(p: Path, meta: dict[str, str]) -> list[int] | None:
    if TOKENS_KEY not in meta:
        return None
    try:
        tokens = json.loads(meta[TOKENS_KEY])
    except json.JSONDecodeError as e:
        raise PromptCacheError(f"prompt cache {p} is damaged: its token list is not valid JSON ({e}){REBUILD}") from e
    if not (isinstance(tokens, list) and all(type(t) is int for t in tokens)):
        raise PromptCacheError(f"prompt cache {p} is damaged: its token list is not a list of integer ids{REBUILD}")
    return tokens


def _layout(layer) -> dict[str, tuple[tuple[int, ...], object]]:
    """{array path: (shape, dtype)} of one LayerCache's state (empty arrays count as absent)."""
    return {k: (tuple(v.shape), v.dtype) for k, v in tree_flatten(layer.state)
            if isinstance(v, mx.array) and v.size}


def _expected_layout(model) -> list[dict]:
    """Each layer's arrays with every part present: the model run lazily on ratio + 1 tokens (only
    the graph is built, nothing is computed), so one window has completed and one row is pending."""
    cache = model.make_cache()
    n = max([c.ratio for c in cache] + [0]) + 1
    model(mx.zeros((1, n), mx.int32), cache)
    return [(_meta(c), _layout(c)) for c in cache]


def _meta(c) -> dict:
    m = c.state["meta"]
    return {"ratio": m["ratio"], "window_size": m["window_size"], "nope": m["nope"],
            "stores": (c.compressed_store.kind, c.index_store.kind)}


def _token_axis(path: str, offset: int, ratio: int, window: int) -> int | None:
    """Rows along axis 1 that a cache holding `offset` tokens has in `path` (None: not token-indexed)."""
    if path == "window":
        return min(offset, window)
    if path.startswith(("compressed.", "index_keys.")):
        return offset // ratio
    if ".rows_" in path:
        return offset % ratio
    return None  # prev_kv / prev_gate: one whole window, present once a window has completed


def check_cache_layout(cache: list, model, n_tokens: int | None, p: Path | str = "prompt cache") -> None:
    """Refuse a cache whose layers, arrays, shapes or dtypes are not what `model` builds after
    n_tokens tokens: such a state would run (or crash) with wrong numbers."""
    expected = _expected_layout(model)
    if len(cache) != len(expected) or not all(isinstance(c, LayerCache) for c in cache):
        raise PromptCacheError(f"prompt cache {p} has {len(cache)} layer caches, the model has {len(expected)}"
                               f"{REBUILD}")
    offset = cache[0].offset if n_tokens is None else n_tokens
    for i, (c, (meta, ref)) in enumerate(zip(cache, expected)):
        if c.offset != offset:
            raise PromptCacheError(f"prompt cache {p}: layer {i} holds {c.offset} tokens, expected {offset}{REBUILD}")
        got = _meta(c)
        for key, want in meta.items():
            if got[key] != want:
                raise PromptCacheError(f"prompt cache {p}: layer {i} has {key} {got[key]}, the model's cache has "
                                       f"{want}{REBUILD}")
        have = _layout(c)
        batch = next(iter(have.values()))[0][0] if have else 1
        for path, (shape, dtype) in ref.items():
            rows = _token_axis(path, offset, c.ratio, c.window_size)
            present = rows > 0 if rows is not None else offset >= c.ratio
            want_shape = (batch, rows, *shape[2:]) if rows is not None else (batch, *shape[1:])
            if not present:
                if path in have:
                    raise PromptCacheError(f"prompt cache {p}: layer {i} has an array '{path}' that a cache of "
                                           f"{offset} tokens does not have{REBUILD}")
                continue
            if path not in have:
                raise PromptCacheError(f"prompt cache {p}: layer {i} lacks its array '{path}'{REBUILD}")
            if have[path] != (want_shape, dtype):
                raise PromptCacheError(
                    f"prompt cache {p}: layer {i} array '{path}' is {_fmt(*have[path])}, the model expects "
                    f"{_fmt(want_shape, dtype)} after {offset} tokens{REBUILD}")
        extra = sorted(set(have) - set(ref))
        if extra:
            raise PromptCacheError(f"prompt cache {p}: layer {i} has arrays {extra} this model's cache never holds"
                                   f"{REBUILD}")


def _fmt(shape, dtype) -> str:
    return f"{str(dtype).removeprefix('mlx.core.')}{list(shape)}"


def cached_tokens(meta: dict[str, str]) -> list[int] | None:
    return json.loads(meta[TOKENS_KEY]) if TOKENS_KEY in meta else None
