"""parse_completion against the official parser's golden outputs, an encode -> parse round trip,
and its strictness (every truncation and every trailing text is rejected)."""

import json

import pytest
from chat_util import (
    MALFORMED,
    assistant_message,
    block,
    calls,
    completion_of,
    golden_params,
    invoke,
    param,
    plain_text,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mlx_dsv4.chat import ChatFormatError, parse_completion
from mlx_dsv4.chat.tokens import BLOCK_END, DSML, EOS


@pytest.mark.parametrize("x", golden_params("parse"))
def test_golden_parse(x):
    if x["parsed"].get("error"):
        with pytest.raises(ChatFormatError):
            parse_completion(x["completion_text"], x["thinking_mode"])
    else:
        assert parse_completion(x["completion_text"], x["thinking_mode"]) == x["parsed"]


EVERY_KIND = {"s": "a \"quoted\"\nline <b>", "i": 45, "big": 12345678901234567890123, "f": 2.5, "tiny": 1e-07,
              "neg0": -0.0, "obj": {"k": [1, None]}, "arr": ["x", 2], "t": True, "n": None, "uni": "上海 ☀️"}


@settings(max_examples=300, deadline=None)
@given(content=plain_text, reasoning=plain_text, call_list=calls, mode=st.sampled_from(["chat", "thinking"]))
@example(content="Voilà 🙂", reasoning="Plan: call twice.", mode="thinking",
         call_list=[("create_event", EVERY_KIND), ("get_time", {})])
def test_encode_then_parse_round_trips(content, reasoning, call_list, mode):
    msg = assistant_message(content, reasoning, call_list)
    text = completion_of(msg, mode)
    assert text.endswith(EOS)
    out = parse_completion(text, mode)
    assert out["content"] == content
    assert out["reasoning_content"] == (reasoning if mode == "thinking" else "")
    assert [c["function"]["name"] for c in out["tool_calls"]] == [n for n, _ in call_list]
    for got, (_, args) in zip(out["tool_calls"], call_list):
        assert json.loads(got["function"]["arguments"]) == args
        # Exact too: strings re-quoted and other values copied give Python's own serialisation.
        assert got["function"]["arguments"] == json.dumps(args, ensure_ascii=False)


@settings(max_examples=60, deadline=None)
@given(content=plain_text, reasoning=plain_text, call_list=calls, mode=st.sampled_from(["chat", "thinking"]),
       tail=st.text(min_size=1, max_size=5))
def test_strict_about_where_a_completion_ends(content, reasoning, call_list, mode, tail):
    """Every proper prefix is rejected, except one that ends right after the tool block, and so
    is any text after EOS."""
    text = completion_of(assistant_message(content, reasoning, call_list), mode)
    whole = parse_completion(text, mode)
    block_end = text.rindex(BLOCK_END) + len(BLOCK_END) if call_list else -1
    for k in range(len(text)):
        if k == block_end:
            assert parse_completion(text[:k], mode) == whole
        else:
            with pytest.raises(ChatFormatError):
                parse_completion(text[:k], mode)
    with pytest.raises(ChatFormatError, match="after the end-of-sentence token"):
        parse_completion(text + tail, mode)


def _args(text: str, mode: str = "chat") -> list[str]:
    return [c["function"]["arguments"] for c in parse_completion(text, mode)["tool_calls"]]


def test_tool_block_details():
    # A zero-argument invoke written without the encoder's empty line reads the same.
    assert _args(block(f'<{DSML}invoke name="now">\n</{DSML}invoke>')) == ["{}"]
    assert _args(block(invoke("now"))) == ["{}"]
    # A block with no invoke at all is read as no calls.
    assert parse_completion(f"hi\n\n<{DSML}tool_calls>\n</{DSML}tool_calls>{EOS}", "chat")["tool_calls"] == []
    # Values are kept byte for byte: "<" inside a value, markers of other kinds, unicode keys.
    assert _args(block(invoke("f", param("位置", "a<b</c>"), param("raw", " [1,2 ", "false")))) == [
        '{"位置": "a<b</c>", "raw":  [1,2 }']
    assert _args(block(invoke("f", param("v", f"<{DSML}invoke x")))) == ['{"v": "<｜DSML｜invoke x"}']


@pytest.mark.parametrize("text, match", MALFORMED)
def test_malformed_tool_blocks_and_content(text, match):
    with pytest.raises(ChatFormatError, match=match):
        parse_completion(text, "chat")


def test_thinking_mode_errors_name_the_problem():
    with pytest.raises(ChatFormatError, match="never closed with </think>"):
        parse_completion(f"no end{EOS}", "thinking")
    with pytest.raises(ChatFormatError, match="before </think>"):
        parse_completion("r" + block(invoke("f")), "thinking")
    with pytest.raises(ChatFormatError, match="'<think>' inside the reasoning"):
        parse_completion(f"a<think>b</think>c{EOS}", "thinking")
    with pytest.raises(ValueError, match="thinking_mode must be one of"):
        parse_completion(f"a{EOS}", "reasoning")
    assert issubclass(ChatFormatError, ValueError)
