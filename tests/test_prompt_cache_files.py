"""Hostile prompt-cache files: each edit of a valid file (fingerprint removed, an array of the wrong
shape or dtype, an array or metadata entry damaged, token ids outside the vocabulary) is refused
with a PromptCacheError that says what is wrong and what to do, before any model call. The
control: the unedited files, made at offsets on both sides of every window boundary and with
chunked prefill, load and pass the same checks."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from test_cli import cli

from mlx_dsv4.generate import prefill
from mlx_dsv4.load import load
from mlx_dsv4.prompt_cache import (
    FORMAT_KEY,
    MODEL_KEY,
    TOKENS_KEY,
    PromptCacheError,
    check_cache_layout,
    load_prompt_cache,
    save_prompt_cache,
)

N = 9  # tokens in the edited files: two ratio-4 windows done, one row pending, window partly full


@pytest.fixture(scope="module")
def tiny():
    return load("tiny-random")


def _make(model, tmp_path, n=N, step=512, name="c.safetensors"):
    ids = list(range(100, 100 + n))
    cache = model.make_cache()
    prefill(model, ids, cache, step)
    path = tmp_path / name
    save_prompt_cache(path, cache, tokens=ids, model=model)
    return path, ids


def _edit(path, arrays=None, meta=None):
    """Rewrite the file with arrays / metadata changed by the given functions (in place)."""
    a, m = mx.load(str(path), return_metadata=True)
    if arrays:
        arrays(a)
    if meta:
        meta(m)
    mx.save_safetensors(str(path), a, m)


@pytest.mark.parametrize("n, step", [(1, 512), (3, 512), (4, 512), (5, 2), (128, 512), (129, 7), (300, 64)])
def test_valid_files_pass_the_checks(tiny, tmp_path, n, step):
    model, _ = tiny
    path, ids = _make(model, tmp_path, n, step)
    cache, _ = load_prompt_cache(path, model=model, prompt=ids + [7])
    assert cache[0].offset == n


def test_fingerprint_removed_is_refused(tiny, tmp_path):
    model, _ = tiny
    path, ids = _make(model, tmp_path)
    _edit(path, meta=lambda m: m.pop(f"0.{MODEL_KEY}"))
    load_prompt_cache(path, prompt=ids + [7])  # without a model nothing can be checked against it
    with pytest.raises(PromptCacheError, match="records no model fingerprint.*delete the file"):
        load_prompt_cache(path, model=model, prompt=ids + [7])


@pytest.mark.parametrize("edit", [lambda m: m.pop(f"0.{FORMAT_KEY}"), lambda m: m.__setitem__(f"0.{FORMAT_KEY}", "1")])
def test_a_file_of_another_cache_format_is_refused(tiny, tmp_path, edit):
    """A file from before format 2 (no key: its compressor rows hold g + ape) would be pooled with ape added twice:
    it is refused, with or without a model to check against."""
    model, _ = tiny
    path, ids = _make(model, tmp_path)
    _edit(path, meta=edit)
    for m in (None, model):
        with pytest.raises(PromptCacheError, match="in cache format 1, which this version.*delete the file"):
            load_prompt_cache(path, model=m, prompt=ids + [7])


@pytest.mark.parametrize("array, change, message", [
    ("2.window", lambda a: a[..., :32], r"'window' is float32\[1, 9, 32\], the model expects float32\[1, 9, 64\]"),
    ("2.window", lambda a: a.astype(mx.float16), r"'window' is float16\[1, 9, 64\], the model expects float32"),
    ("2.window", lambda a: a[:, :5], r"'window' is float32\[1, 5, 64\].*after 9 tokens"),
    ("3.comp_state.rows_kv", lambda a: a.astype(mx.bfloat16), r"'comp_state.rows_kv' is bfloat16"),
    ("2.comp_state.prev_kv", lambda a: a[:, :2], r"'comp_state.prev_kv' is float32\[1, 2, 64\]"),
    ("4.compressed.codes", lambda a: a.astype(mx.int8), r"'compressed.codes' is int8"),
    ("2.index_keys.packed", lambda a: a[:, :1], r"'index_keys.packed' is uint8\[1, 1, 16\]"),
])
def test_state_arrays_of_the_wrong_shape_or_dtype_are_refused(tiny, tmp_path, array, change, message):
    model, _ = tiny
    path, ids = _make(model, tmp_path)
    _edit(path, arrays=lambda a: a.__setitem__(array, change(a[array])))
    with pytest.raises(PromptCacheError, match=message + ".*delete the file"):
        load_prompt_cache(path, model=model, prompt=ids + [7])


def test_damaged_files_get_readable_errors(tiny, tmp_path):
    model, _ = tiny
    path, ids = _make(model, tmp_path)
    good = path.read_bytes()
    # an array mlx-lm's layout lists (a None state, stored as an empty array) is gone: was KeyError '0.comp_state...'
    _edit(path, arrays=lambda a: a.pop("0.comp_state.prev_gate"))
    with pytest.raises(PromptCacheError, match=r"is damaged: its array '0.comp_state.prev_gate' is missing"):
        load_prompt_cache(path, model=model)
    path.write_bytes(good)  # a real array is gone
    _edit(path, arrays=lambda a: a.pop("2.compressed.exps"))
    with pytest.raises(PromptCacheError, match="layer 2 lacks its array 'compressed.exps'"):
        load_prompt_cache(path, model=model)
    path.write_bytes(good)  # was "Expecting value: line 1 column 6"
    _edit(path, meta=lambda m: m.__setitem__(f"0.{TOKENS_KEY}", "[100, , 3]"))
    with pytest.raises(PromptCacheError, match="token list is not valid JSON"):
        load_prompt_cache(path, model=model, prompt=ids + [7])
    path.write_bytes(good)  # the tokens say 8 but the state holds 9
    _edit(path, meta=lambda m: m.__setitem__(f"0.{TOKENS_KEY}", json.dumps(ids[:8])))
    with pytest.raises(PromptCacheError, match="layer 0 holds 9 tokens, expected 8"):
        load_prompt_cache(path, model=model)
    path.write_bytes(good)
    load_prompt_cache(path, model=model, prompt=ids + [7])  # the control: the restored file loads


def test_token_ids_outside_the_vocabulary_are_refused(tiny, tmp_path):
    model, tok = tiny
    path, ids = _make(model, tmp_path)
    bad = [model.args.vocab_size + 5] + ids[1:]
    _edit(path, meta=lambda m: m.__setitem__(f"0.{TOKENS_KEY}", json.dumps(bad)))
    with pytest.raises(PromptCacheError, match=rf"token ids \[{model.args.vocab_size + 5}\] outside"):
        load_prompt_cache(path, model=model, prompt=bad + [7])


def test_cli_refuses_a_hostile_cache_file_before_running_the_model(tiny, tmp_path):
    """Out-of-vocabulary ids in a cache file used to crash the CLI (SIGSEGV, exit 139)."""
    model, tok = tiny
    system = "You are terse."
    f = tmp_path / "s.safetensors"
    base = ["generate", "-m", "tiny-random", "-n", "2", "--system", system, "--prompt-cache-file", str(f)]
    assert cli(*base, "Hi").returncode == 0  # writes the file
    _edit(f, meta=lambda m: m.__setitem__(f"0.{TOKENS_KEY}", json.dumps([-3] + json.loads(m[f"0.{TOKENS_KEY}"])[1:])))
    p = cli(*base, "Hi", check=False)
    assert p.returncode == 1 and "outside the model's vocabulary" in p.stderr and "Traceback" not in p.stderr
    _edit(f, meta=lambda m: m.pop(f"0.{MODEL_KEY}"))
    p = cli(*base, "Hi", check=False)
    assert p.returncode == 1 and "no model fingerprint" in p.stderr


def test_check_cache_layout_in_memory(tiny):
    """The layout check on a cache built in process, and a cache of another layer count."""
    model, _ = tiny
    cache = model.make_cache()
    prefill(model, list(range(10, 20)), cache)
    check_cache_layout(cache, model, 10)
    with pytest.raises(PromptCacheError, match="layer caches, the model has"):
        check_cache_layout(cache[:-1], model, 10)
