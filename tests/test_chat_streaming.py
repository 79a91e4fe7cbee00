"""StreamingParser: whatever the split, its events add up to parse_completion's result (golden
completions, generated turns, mutated texts), it rejects what parse_completion rejects, and text
goes out as early as the format allows."""

import pytest
from chat_util import (
    FRAGMENTS,
    MALFORMED,
    assistant_message,
    calls,
    collect,
    completion_of,
    golden,
    golden_params,
    parses,
    plain_text,
    stream,
    viable,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_dsv4.chat import (
    ChatFormatError,
    ContentDelta,
    ReasoningDelta,
    StreamingParser,
    ToolCallArgumentsDelta,
    ToolCallEnd,
    ToolCallStart,
    parse_completion,
    streaming,
)
from mlx_dsv4.chat.tokens import EOS, THINK_END


def _check_split(text: str, cuts, mode: str, want=False, ok=None) -> None:
    """The streaming contract for one split: the same message when parse_completion accepts the
    text; an unfinished stream (no error, not complete) when only a continuation of it would be
    accepted; otherwise a ChatFormatError from feed()."""
    want = parses(text, mode) if want is False else want
    ok = want is not None or viable(text, mode) if ok is None else ok
    try:
        events, p = stream(text, cuts, mode)
    except ChatFormatError:
        assert not ok, f"streaming rejected a well-formed (prefix of a) completion split at {sorted(set(cuts))}"
        return
    assert ok, "streaming did not reject a malformed completion"
    if want is None:
        assert not p.complete, "streaming accepted a completion parse_completion rejects"
    else:
        assert p.complete and collect(events) == want


@pytest.mark.parametrize("x", golden_params("parse"))
def test_golden_every_split_point(x):
    text, mode = x["completion_text"], x["thinking_mode"]
    want = parses(text, mode)
    ok = want is not None or viable(text, mode)
    if want is None:  # of the error lines only the cut-off one can still become well-formed
        assert ok == (x["name"] == "parse_error_missing_eos")
    for k in range(len(text) + 1):
        _check_split(text, [k], mode, want, ok)
    _check_split(text, range(len(text)), mode, want, ok)  # one character at a time


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_golden_random_splits(data):
    x = data.draw(st.sampled_from(golden("parse")))
    cuts = data.draw(st.lists(st.integers(0, len(x["completion_text"])), max_size=20))
    _check_split(x["completion_text"], cuts, x["thinking_mode"])


@settings(max_examples=300, deadline=None)
@given(content=plain_text, reasoning=plain_text, call_list=calls, mode=st.sampled_from(["chat", "thinking"]),
       data=st.data())
def test_generated_turns_any_split(content, reasoning, call_list, mode, data):
    text = completion_of(assistant_message(content, reasoning, call_list), mode)
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=25))
    _check_split(text, cuts, mode)


@settings(max_examples=400, deadline=None)
@given(content=plain_text, reasoning=plain_text, call_list=calls, mode=st.sampled_from(["chat", "thinking"]),
       data=st.data())
def test_mutated_turns_agree_with_parse_completion(content, reasoning, call_list, mode, data):
    """Differential check on near-valid text: insert, delete or swap pieces anywhere."""
    text = completion_of(assistant_message(content, reasoning, call_list), mode)
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(text)))
        j = data.draw(st.integers(i, min(len(text), i + 12)))
        new = data.draw(st.sampled_from(["", "\n", ">", "<", EOS, THINK_END] + FRAGMENTS) | st.text(max_size=3))
        text = text[:i] + new + text[j:]
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    _check_split(text, cuts, mode)


@pytest.mark.parametrize("text, match", MALFORMED)
def test_malformed_completions(text, match):
    _check_split(text, [], "chat")
    _check_split(text, range(len(text)), "chat")


# -- holding back only what may be a marker ---------------------------------------------------
SPLIT_MARKERS = [
    ("thinking", "abc</thi", f"nk>answer{EOS}"),
    ("chat", "Let me check.\n\n<｜DS", f'ML｜tool_calls>\n<｜DSML｜invoke name="f">\n\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>{EOS}'),
    ("chat", "done<｜end▁of▁sen", "tence｜>"),
]


@pytest.mark.parametrize("mode, first, second", SPLIT_MARKERS)
def test_split_marker_never_leaks(mode, first, second):
    events, p = stream(first + second, [len(first)], mode)
    assert p.complete and collect(events) == parse_completion(first + second, mode)
    text = "".join(e.text for e in events if isinstance(e, (ContentDelta, ReasoningDelta)))
    assert "<｜" not in text and "</thi" not in text


@pytest.mark.parametrize("mode, first, second", SPLIT_MARKERS)
def test_negative_control_without_hold_back(monkeypatch, mode, first, second):
    """A parser that releases its whole buffer leaks marker text or loses the structure: the test
    above would catch it."""
    monkeypatch.setattr(streaming, "_partial_start", lambda buf, stops, start=0: len(buf))
    try:
        events, _ = stream(first + second, [len(first)], mode)
    except ChatFormatError:
        return  # also a failure of the split test
    assert collect(events) != parse_completion(first + second, mode)


def test_text_goes_out_as_early_as_possible():
    p = StreamingParser("thinking")
    assert p.feed("Hmm <") == [ReasoningDelta("Hmm ")]  # "<" may open </think>
    assert p.feed("b> ok</think>Hi") == [ReasoningDelta("<b> ok"), ContentDelta("Hi")]
    assert p.feed("\n") == []  # may open the tool block
    head = '\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="w">\n<｜DSML｜parameter name="q" string="true">a"b'
    assert p.feed(head) == [ToolCallStart(0, "w"), ToolCallArgumentsDelta(0, '{"q": "'),
                            ToolCallArgumentsDelta(0, 'a\\"b')]  # a string value streams, JSON-escaped
    assert p.feed("<") == []  # may close the value
    assert p.feed("/｜DSML｜parameter>\n<｜DSML｜parameter name=\"n\" string=\"false\">1") == [
        ToolCallArgumentsDelta(0, '"'), ToolCallArgumentsDelta(0, ', "n": '), ToolCallArgumentsDelta(0, "1")]
    assert p.feed("2</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>") == [
        ToolCallArgumentsDelta(0, "2"), ToolCallArgumentsDelta(0, "}"), ToolCallEnd(0, '{"q": "a\\"b", "n": 12}')]
    assert p.complete and p.feed(EOS) == [] and p.complete


def test_finish_on_a_truncated_stream():
    p = StreamingParser("thinking")
    assert p.feed("still thinking </thi") == [ReasoningDelta("still thinking ")]
    assert p.finish() == [ReasoningDelta("</thi")] and not p.complete
    p = StreamingParser("chat")
    events = p.feed('\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="a" string="true">x')
    events += p.finish()
    assert not any(isinstance(e, ToolCallEnd) for e in events) and not p.complete


def test_a_rejected_delta_is_not_consumed():
    """Callers fall back to showing `buf` as plain text: it must hold everything not yet shown."""
    p = StreamingParser("chat")
    assert p.feed("fine <") == [ContentDelta("fine ")]
    with pytest.raises(ChatFormatError, match="'<think>' inside the content"):
        p.feed("think> so")
    assert p.buf == "<think> so" and p.state == "content"
    p = StreamingParser("chat")
    p.feed('\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="a" string="true">x')
    with pytest.raises(ChatFormatError, match="must end with '<'"):
        p.feed("y/｜DSML｜parameter>")
    assert p.buf == "y/｜DSML｜parameter>"
    with pytest.raises(ValueError, match="thinking_mode"):
        StreamingParser("fast")
