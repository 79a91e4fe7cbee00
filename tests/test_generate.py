"""Generation with the tiny random model (real architecture, real tokenizer): the text is noise, so
every test checks a property against an independent truth (the model's own logits, a cold run,
tokenizer.decode, the definition of a stop string)."""

import dataclasses

import mlx.core as mx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_dsv4.generate import generate, prefill, stream_generate
from mlx_dsv4.load import load
from mlx_dsv4.prompt_cache import PromptCacheError, load_prompt_cache, save_prompt_cache
from mlx_dsv4.text_stream import _UNI2BYTE, Detokenizer, StopStrings

PROMPT = "<｜begin▁of▁sentence｜><｜User｜>Tell me a story about a dragon.<｜Assistant｜></think>"
# fp32 model: the same tokens through the cache in different chunkings agree to ~1e-6 relative;
# 1e-4 on log-probabilities (magnitude ~10) leaves room without hiding a wrong position (errors O(1)).
TOL = 1e-4


@pytest.fixture(scope="module")
def tiny():
    return load("tiny-random")


def run(model, tok, prompt=PROMPT, **kw):
    rs = list(stream_generate(model, tok, prompt, **kw))
    return rs, [r.token for r in rs if r.token is not None], "".join(r.text for r in rs)


def scripted(tokens):
    """A sampler that ignores the model and emits `tokens` in order: fixes the generated text."""
    it = iter(tokens)
    return lambda logprobs: mx.array([next(it)])


def test_greedy_is_the_argmax_of_the_models_own_logits(tiny):
    model, tok = tiny
    rs, toks, _ = run(model, tok, max_tokens=12)
    ids = tok.encode(PROMPT, add_special_tokens=False)
    # truth 1: a plain step-by-step loop through a fresh cache
    cache = model.make_cache()
    logits, manual = model(mx.array(ids)[None], cache), []
    for _ in range(12):
        manual.append(mx.argmax(logits[0, -1]).item())
        logits = model(mx.array([[manual[-1]]]), cache)
    assert toks == manual
    # truth 2: one uncached forward over prompt + generation: its log-softmax at each position
    full = model(mx.array(ids + toks[:-1])[None])[0, len(ids) - 1 :]
    logp = full - mx.logsumexp(full, axis=-1, keepdims=True)
    for i, r in enumerate(rs):
        assert r.token == mx.argmax(logp[i]).item()
        assert abs(r.logprob - logp[i, r.token].item()) < TOL
    assert [r.generation_tokens for r in rs] == list(range(1, 13))
    assert rs[-1].finish_reason == "length" and all(r.finish_reason is None for r in rs[:-1])
    assert rs[-1].prompt_tokens == len(ids) and rs[-1].cached_tokens == 0
    assert rs[-1].prompt_tps > 0 and rs[-1].generation_tps > 0 and rs[-1].peak_memory > 0


def test_top_logprobs_are_sorted_and_consistent(tiny):
    model, tok = tiny
    rs, _, _ = run(model, tok, max_tokens=3, num_top_logprobs=5)
    for r in rs:
        ids, vals = zip(*r.top_logprobs)
        assert len(ids) == 5 and list(vals) == sorted(vals, reverse=True)
        assert ids[0] == r.token and abs(vals[0] - r.logprob) < 1e-6  # greedy: the best one


def test_chunked_prefill_and_progress(tiny):
    model, tok = tiny
    calls = []
    _, a, _ = run(model, tok, max_tokens=6, prefill_step_size=5, progress_callback=lambda d, t: calls.append((d, t)))
    _, b, _ = run(model, tok, max_tokens=6)
    assert a == b
    n = len(tok.encode(PROMPT, add_special_tokens=False))
    assert calls == [*((d, n) for d in range(5, n - 1, 5)), (n - 1, n), (n, n)]


def test_prompt_cache_file_gives_the_cold_run(tiny, tmp_path):
    model, tok = tiny
    ids = tok.encode(PROMPT, add_special_tokens=False)
    _, cold, cold_text = run(model, tok, max_tokens=10)
    k = len(ids) - 4
    cache = model.make_cache()
    prefill(model, ids[:k], cache, step=7)
    path = tmp_path / "p.safetensors"
    save_prompt_cache(path, cache, {"note": "x"}, tokens=ids[:k], model=model)
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]  # no temporary left behind
    loaded, meta = load_prompt_cache(path, model=model, prompt=ids)
    assert meta["note"] == "x"
    rs, warm, warm_text = run(model, tok, max_tokens=10, prompt_cache=loaded)
    assert warm == cold and warm_text == cold_text and rs[-1].cached_tokens == k
    # negative control: a cache holding other tokens (same length) changes the output, so the
    # equality above really comes from the cache contents
    other = model.make_cache()
    prefill(model, [t + 1 for t in ids[:k]], other)
    assert run(model, tok, max_tokens=10, prompt_cache=other)[1] != cold


def test_prompt_cache_mismatches_are_refused(tiny, tmp_path):
    model, tok = tiny
    ids = tok.encode(PROMPT, add_special_tokens=False)
    cache = model.make_cache()
    prefill(model, ids[:5], cache)
    path = tmp_path / "c.safetensors"
    save_prompt_cache(path, cache, tokens=ids[:5], model=model)
    with pytest.raises(PromptCacheError, match="not a proper prefix"):
        load_prompt_cache(path, prompt=[ids[0] + 1] + ids[1:])
    with pytest.raises(PromptCacheError, match="not a proper prefix"):
        load_prompt_cache(path, prompt=ids[:5])  # nothing left to feed
    other, _ = load("tiny-random", seed=1)
    with pytest.raises(PromptCacheError, match="another model"):
        load_prompt_cache(path, model=other)
    with pytest.raises(PromptCacheError, match="must end in .safetensors"):
        save_prompt_cache(tmp_path / "c.bin", cache)
    with pytest.raises(PromptCacheError, match="does not exist"):
        load_prompt_cache(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a cache")
    with pytest.raises(PromptCacheError, match="cannot read"):
        load_prompt_cache(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="leave at least the last prompt token"):
        run(model, tok, ids[:5], prompt_cache=cache)


def test_stop_strings_cut_before_the_stop(tiny):
    model, tok = tiny
    _, toks, text = run(model, tok, max_tokens=12)
    stop = text[len(text) // 2 : len(text) // 2 + 4]  # from the greedy output itself
    assert len(stop) == 4
    rs, _, cut = run(model, tok, max_tokens=12, stop=[stop])
    assert cut == text[: text.find(stop)] and rs[-1].finish_reason == "stop"
    # a stop string that never occurs changes nothing
    rs, toks2, same = run(model, tok, max_tokens=12, stop=["\x00never\x00"])
    assert same == text and toks2 == toks and rs[-1].finish_reason == "length"


def test_stop_string_over_a_token_boundary_and_at_the_end(tiny):
    model, tok = tiny
    script = tok.encode("abc Hello world! xyz", add_special_tokens=False)
    rs, _, text = run(model, tok, max_tokens=len(script), sampler=scripted(script), stop=["lo wor"])
    assert text == "abc Hel" and rs[-1].finish_reason == "stop"
    # held text that turns out not to be a stop string is released at the end
    rs, _, text = run(model, tok, max_tokens=len(script), sampler=scripted(script), stop=["xyz!"])
    assert text == "abc Hello world! xyz" and rs[-1].finish_reason == "length"
    rs, _, text = run(model, tok, max_tokens=len(script), sampler=scripted(script), stop="xyz")  # a str
    assert text == "abc Hello world! " and rs[-1].finish_reason == "stop"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text("ab", max_size=4), max_size=8), st.lists(st.text("ab", min_size=1, max_size=3), max_size=3))
def test_stop_strings_property(chunks, stops):
    s, out, hit = StopStrings(stops), [], False
    for c in chunks:
        piece, hit = s.feed(c)
        out.append(piece)
        assert any(stop.startswith(s.held) for stop in stops) or not s.held
        if hit:
            break
    if not hit:
        out.append(s.flush())
    # Oracle (non-incremental): generation stops after the first chunk whose arrival completes a
    # stop string; the reply is the text before the earliest stop string present at that point.
    full, seen = "".join(chunks), ""
    expect, expect_hit = full, False
    for c in chunks:
        seen += c
        firsts = [seen.find(x) for x in stops if x in seen]
        if firsts:
            expect, expect_hit = seen[: min(firsts)], True
            break
    assert "".join(out) == expect
    assert hit == expect_hit


def test_eos_ends_with_stop_and_max_tokens_is_respected(tiny):
    model, tok = tiny
    script = tok.encode("one two three", add_special_tokens=False) + [1, 5, 6]
    rs, toks, text = run(model, tok, max_tokens=10, sampler=scripted(script))
    assert toks[-1] == 1 and len(toks) == 4 and text == "one two three" and rs[-1].finish_reason == "stop"
    for n in (0, 1, 5):
        rs, toks, _ = run(model, tok, max_tokens=n)
        assert len(toks) == n and rs[-1].finish_reason == "length" and rs[-1].generation_tokens == n
    rs, toks, _ = run(model, tok, max_tokens=0)
    assert len(rs) == 1 and rs[0].token is None


def test_should_stop_cancels(tiny):
    model, tok = tiny
    polls = []
    rs, toks, _ = run(model, tok, max_tokens=10, should_stop=lambda: polls.append(1) or len(polls) > 3)
    assert len(toks) == 3 and rs[-1].finish_reason == "cancelled" and rs[-1].token is None


def test_utf8_stream_concatenation_equals_decode(tiny):
    model, tok = tiny
    text = " 你好, мир! 🎉🐉 naïve\n  tabs\tand ✓ 👩‍👩‍👧"
    ids = tok.encode(text, add_special_tokens=False)
    rs, _, out = run(model, tok, max_tokens=len(ids), sampler=scripted(ids))
    assert out == tok.decode(ids) == text
    assert not any("\ufffd" in r.text for r in rs)  # never half a character
    # single-byte tokens: an emoji's four bytes arrive one token at a time
    byte_id = {b: tok.convert_tokens_to_ids(c) for c, b in _UNI2BYTE.items()}
    ids = [byte_id[b] for b in "a🐉b".encode()]
    pieces = [r.text for r in run(model, tok, max_tokens=len(ids), sampler=scripted(ids))[0]]
    assert pieces == ["a", "", "", "", "🐉", "b"]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 129279), st.sampled_from(range(256))), min_size=1, max_size=12))
def test_detokenizer_matches_decode_on_any_ids(tiny, ids):
    # random ids include bare byte tokens (invalid UTF-8 runs): both sides must replace them alike
    _, tok = tiny
    byte_id = [tok.convert_tokens_to_ids(c) for c, _ in sorted(_UNI2BYTE.items(), key=lambda kv: kv[1])]
    ids = [byte_id[i] if i < 256 else i for i in ids]
    d = Detokenizer(tok)
    assert "".join([d.add(i) for i in ids] + [d.finish()]) == tok.decode(ids)


def test_sampling_options(tiny):
    model, tok = tiny
    _, greedy, _ = run(model, tok, max_tokens=6)
    # top_k=1 / min_p=1 keep only the best token: any temperature gives the greedy sequence
    assert run(model, tok, max_tokens=6, temperature=1.0, top_k=1, seed=3)[1] == greedy
    assert run(model, tok, max_tokens=6, temperature=1.0, min_p=1.0, seed=3)[1] == greedy
    a = run(model, tok, max_tokens=6, temperature=5.0, seed=7)[1]
    assert a == run(model, tok, max_tokens=6, temperature=5.0, seed=7)[1]  # seeded: reproducible
    assert a != greedy  # at temperature 5 over a near-flat random model, greedy is ~impossible


def test_repetition_penalty_reaches_the_logprobs(tiny):
    model, tok = tiny
    ids = tok.encode(PROMPT, add_special_tokens=False)
    seen_token = ids[3]  # score a token of the prompt: the one the penalty acts on
    (r, *_), _, _ = run(model, tok, max_tokens=1, repetition_penalty=3.0, sampler=scripted([seen_token]))
    logits = model(mx.array(ids)[None])[0, -1]
    plain = logits - mx.logsumexp(logits)
    seen = mx.array(sorted(set(ids[-20:])))  # mlx-lm's default context: the last 20 tokens
    v = logits[seen]
    logits[seen] = mx.where(v > 0, v / 3.0, v * 3.0)  # sign-aware multiplicative penalty
    logp = logits - mx.logsumexp(logits)
    assert abs(r.logprob - logp[seen_token].item()) < TOL
    assert abs(r.logprob - plain[seen_token].item()) > 100 * TOL  # negative control: it did change


def test_generate_returns_the_text_and_prints_stats(tiny, capsys):
    model, tok = tiny
    _, _, text = run(model, tok, max_tokens=5)
    assert generate(model, tok, PROMPT, max_tokens=5) == text
    assert generate(model, tok, PROMPT, verbose=True, max_tokens=5) == text
    out = capsys.readouterr().out
    assert text in out and "Prompt: " in out and "Generation: 5 tokens" in out and "Peak memory" in out


def test_bad_input_is_refused_clearly(tiny):
    model, tok = tiny
    for prompt, msg in (("", "empty prompt"), ([], "empty prompt"), ([5, 200000], "outside the vocabulary"),
                        (mx.zeros((2, 3), mx.int32), "must hold integer ids"),
                        (mx.zeros((3,)), "must hold integer ids"), (["a"], "only integer token ids")):
        with pytest.raises(ValueError, match=msg):
            run(model, tok, prompt)
    for kw, msg in (({"max_tokens": -1}, "max_tokens"), ({"temperature": -1}, "temperature"),
                    ({"top_p": 0}, "top_p"), ({"top_k": -2}, "top_k"), ({"min_p": 2}, "min_p"),
                    ({"repetition_penalty": 0}, "repetition_penalty"), ({"prefill_step_size": 0}, "prefill_step_size")):
        with pytest.raises(ValueError, match=msg):
            run(model, tok, "hello there friend", **kw)
    with pytest.raises(ValueError, match="max_tokens"):  # at the call, before any iteration
        stream_generate(model, tok, "hello", max_tokens=-1)
    args = model.args
    try:
        model.args = dataclasses.replace(args, max_position_embeddings=8)
        with pytest.raises(ValueError, match="longer than the model's context of 8"):
            run(model, tok, PROMPT)
        rs, toks, _ = run(model, tok, list(range(10, 16)), max_tokens=10)  # 6 + 2 fill the context
        assert len(toks) == 2 and rs[-1].finish_reason == "length"
    finally:
        model.args = args
