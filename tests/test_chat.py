"""The chat format against the official encoder's golden vectors, plus round-trip properties."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_dsv4.chat import (ChatFormatError, ContentDelta, ReasoningDelta, StreamingParser, ToolCallArgumentsDelta,
                           ToolCallEnd, ToolCallStart, encode_messages, parse_completion)
from mlx_dsv4.chat.encoding import render_tool_calls
from mlx_dsv4.chat.tokens import EOS, THINK_END


def _golden(shared_dir, kind):
    lines = [json.loads(x) for x in (shared_dir / "reference" / "chat-golden.jsonl").read_text().splitlines()]
    return [x for x in lines if x["kind"] == kind]


def test_every_encode_vector(shared_dir):
    cases = _golden(shared_dir, "encode")
    assert len(cases) >= 29
    for x in cases:
        kw = {"drop_thinking": x["drop_thinking"]} if "drop_thinking" in x else {}
        assert encode_messages(x["messages"], x["thinking_mode"], x["reasoning_effort"], **kw) == x["prompt"], x["name"]


def test_every_parse_vector(shared_dir):
    cases = _golden(shared_dir, "parse")
    assert len(cases) >= 19
    for x in cases:
        if x["parsed"].get("error"):
            with pytest.raises(ChatFormatError):
                parse_completion(x["completion_text"], x["thinking_mode"])
        else:
            assert parse_completion(x["completion_text"], x["thinking_mode"]) == x["parsed"], x["name"]


def test_bad_input_is_rejected_clearly():
    with pytest.raises(ValueError, match="unknown role 'robot'"):
        encode_messages([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="thinking_mode"):
        encode_messages([{"role": "user", "content": "x"}], thinking_mode="deep")
    with pytest.raises(ValueError, match="reasoning_effort"):
        encode_messages([{"role": "user", "content": "x"}], "thinking", "extreme")
    with pytest.raises(ValueError, match="function.name"):
        encode_messages([{"role": "assistant", "tool_calls": [{"function": {}}]}])


def test_prompt_tokenizes_with_the_special_ids():
    from mlx_dsv4.tokenizer import load_tokenizer

    tok = load_tokenizer()
    ids = tok.encode(encode_messages([{"role": "user", "content": "Hi"}], "thinking"), add_special_tokens=False)
    assert ids[0] == 0 and ids.count(0) == 1 and ids[1] == 128803 and ids[-2:] == [128804, 128821]
    ids = tok.encode(encode_messages([{"role": "user", "content": "Hi"}], "chat"), add_special_tokens=False)
    assert ids[-1] == 128822 and max(ids) < 129280


# -- round trips ---------------------------------------------------------------------------
_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="<>｜"), max_size=30)
_json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-10**22, 10**22) | st.floats(allow_nan=False, allow_infinity=False)
    | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3), max_leaves=8)
_args = st.dictionaries(st.from_regex(r"[a-z_]{1,8}", fullmatch=True), _json_value, max_size=4)
_calls = st.lists(st.tuples(st.from_regex(r"[a-z_]{1,10}", fullmatch=True), _args), max_size=3)


def _assistant_turn(content, reasoning, calls, thinking):
    msg = {"role": "assistant", "content": content, "reasoning_content": reasoning,
           "tool_calls": [{"type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
                          for n, a in calls]}
    prompt = encode_messages([{"role": "user", "content": "q"}], "thinking" if thinking else "chat")
    full = encode_messages([{"role": "user", "content": "q"}, msg], "thinking" if thinking else "chat",
                           drop_thinking=False)
    assert full.startswith(prompt)
    return msg, full[len(prompt):]  # what the model generates after the prompt


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=_text, reasoning=_text, calls=_calls, thinking=st.booleans())
def test_encode_then_parse_round_trips(content, reasoning, calls, thinking):
    msg, completion = _assistant_turn(content, reasoning, calls, thinking)
    out = parse_completion(completion, "thinking" if thinking else "chat")
    assert out["content"] == content
    assert out["reasoning_content"] == (reasoning if thinking else "")
    assert [c["function"]["name"] for c in out["tool_calls"]] == [n for n, _ in calls]
    for got, (_, args) in zip(out["tool_calls"], calls):
        assert json.loads(got["function"]["arguments"]) == json.loads(json.dumps(args))


def _stream(text, cuts, thinking):
    p = StreamingParser("thinking" if thinking else "chat")
    events, last = [], 0
    for c in sorted(set(cuts)) + [len(text)]:
        events += p.feed(text[last:c])
        last = c
    return events + p.finish()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=_text, reasoning=_text, calls=_calls, thinking=st.booleans(), data=st.data())
def test_streaming_equals_whole_parse(content, reasoning, calls, thinking, data):
    _, completion = _assistant_turn(content, reasoning, calls, thinking)
    cuts = data.draw(st.lists(st.integers(0, len(completion)), max_size=12))
    events = _stream(completion, cuts, thinking)
    whole = parse_completion(completion, "thinking" if thinking else "chat")
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == whole["content"]
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == whole["reasoning_content"]
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    ends = [e for e in events if isinstance(e, ToolCallEnd)]
    assert [s.name for s in starts] == [c["function"]["name"] for c in whole["tool_calls"]]
    for i, call in enumerate(whole["tool_calls"]):
        deltas = "".join(e.text for e in events if isinstance(e, ToolCallArgumentsDelta) and e.index == i)
        assert deltas == ends[i].arguments_json == call["function"]["arguments"]


def test_split_markers_never_leak(shared_dir):
    """Every golden completion fed one character at a time: no marker text reaches content."""
    for x in _golden(shared_dir, "parse"):
        if x["parsed"].get("error"):
            continue
        text = x["completion_text"]
        events = _stream(text, range(len(text)), x["thinking_mode"] == "thinking")
        content = "".join(e.text for e in events if isinstance(e, ContentDelta))
        assert content == x["parsed"]["content"], x["name"]
        assert THINK_END not in content and EOS not in content


def test_negative_control_parser_without_holdback_leaks():
    """A parser that emits everything it has (no hold-back) would leak a split </think>."""
    class NoHold(StreamingParser):
        def _text_until(self, events, kind, markers):
            import mlx_dsv4.chat.streaming as s
            orig = s._held
            s._held = lambda buf, m: 0
            try:
                super()._text_until(events, kind, markers)
            finally:
                s._held = orig

    p = NoHold("thinking")
    ev = p.feed("abc</thi") + p.feed("nk>done" + EOS) + p.finish()
    assert "".join(e.text for e in ev if isinstance(e, ReasoningDelta)) != "abc"
    p = StreamingParser("thinking")
    ev = p.feed("abc</thi") + p.feed("nk>done" + EOS) + p.finish()
    assert "".join(e.text for e in ev if isinstance(e, ReasoningDelta)) == "abc"


def test_render_tool_calls_exact_json_rules():
    block = render_tool_calls([{"function": {"name": "f", "arguments": '{"a": 2.50, "b": 1e-7, "c": 12345678901234567890}'}}])
    assert 'string="false">2.5<' in block and ">1e-07<" in block and ">12345678901234567890<" in block
