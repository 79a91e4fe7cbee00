"""Shared by the chat-format tests: the golden vectors, hypothesis strategies for assistant turns,
and a driver that runs the streaming parser over a split text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import strategies as st

from mlx_dsv4.chat import (
    ChatFormatError,
    ContentDelta,
    ReasoningDelta,
    StreamingParser,
    ToolCallArgumentsDelta,
    ToolCallEnd,
    ToolCallStart,
    encode_messages,
    parse_completion,
)
from mlx_dsv4.chat.tokens import DSML, EOS, FORBIDDEN_IN_TEXT, PARAM_END

GOLDEN = Path(__file__).resolve().parent / "data" / "chat-golden.jsonl"


def golden(kind: str) -> list[dict]:
    # json keeps object key order, which the format depends on (tool schemas, arguments).
    return [x for x in map(json.loads, GOLDEN.read_text(encoding="utf-8").splitlines()) if x["kind"] == kind]


def golden_params(kind: str) -> list:
    """One pytest param per golden line (ids = line names)."""
    return [pytest.param(x, id=x["name"]) for x in golden(kind)]


def encode_kwargs(x: dict) -> dict:
    kw = {"thinking_mode": x["thinking_mode"], "reasoning_effort": x["reasoning_effort"]}
    if "drop_thinking" in x:
        kw["drop_thinking"] = x["drop_thinking"]
    return kw


# -- strategies ------------------------------------------------------------------------------
# Text built from near-miss fragments of the markers, so splits and look-alikes are common.
FRAGMENTS = ["<", ">", "</", "/", "think", "thi", "nk>", "｜", "DSML", "<｜", "｜>", "\n", "\n\n", '"', "\\",
             "tool_calls", "invoke", "parameter", 'name="', 'string="true">', "end▁of▁sentence", "<｜end▁of",
             "<b>", "é", "上海", "🙂", "\t", "\u2028", " "]
_raw_text = st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=6), max_size=12).map("".join)
# Content and reasoning may hold no special token (the parser rejects them).
plain_text = _raw_text.filter(lambda s: not any(t in s for t in FORBIDDEN_IN_TEXT))
# A string parameter value may hold anything but the marker that closes it.
value_text = _raw_text.filter(lambda s: PARAM_END not in s)

_scalars = (st.none() | st.booleans() | st.integers(-(10**30), 10**30)
            | st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from([1e-07, 2.5, -0.0, 3e21, 10**20])
            | value_text)
json_value = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(value_text, inner, max_size=3), max_leaves=6)
param_name = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,11}", fullmatch=True) | st.sampled_from(["位置", "città"])
arguments = st.dictionaries(param_name, value_text | json_value, max_size=4).filter(
    lambda a: PARAM_END not in json.dumps(a, ensure_ascii=False))
tool_name = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.\-]{0,15}", fullmatch=True)
calls = st.lists(st.tuples(tool_name, arguments), max_size=3)


def assistant_message(content: str, reasoning: str, call_list: list) -> dict:
    return {"role": "assistant", "content": content, "reasoning_content": reasoning,
            "tool_calls": [{"id": f"call_{i}", "type": "function",
                            "function": {"name": n, "arguments": json.dumps(a, ensure_ascii=False)}}
                           for i, (n, a) in enumerate(call_list)]}


def completion_of(msg: dict, mode: str) -> str:
    """What the model generates for `msg`: the text the encoder writes after the generation prompt."""
    history = [{"role": "user", "content": "q"}]
    prompt = encode_messages(history, mode)
    full = encode_messages(history + [msg], mode)
    assert full.startswith(prompt)
    return full[len(prompt):]


# -- streaming driver ------------------------------------------------------------------------
def stream(text: str, cuts, mode: str, parser: StreamingParser | None = None) -> tuple[list, StreamingParser]:
    """Feed text cut at `cuts` (positions), then finish."""
    p = parser or StreamingParser(mode)
    events, last = [], 0
    for c in sorted(set(cuts)) + [len(text)]:
        events += p.feed(text[last:c])
        last = c
    return events + p.finish(), p


def collect(events: list) -> dict:
    """The message the events describe, checking the tool-call event grammar on the way."""
    out = {"role": "assistant", "content": "", "reasoning_content": "", "tool_calls": []}
    open_call = None
    for e in events:
        if isinstance(e, ReasoningDelta):
            out["reasoning_content"] += e.text
        elif isinstance(e, ContentDelta):
            out["content"] += e.text
        elif isinstance(e, ToolCallStart):
            assert open_call is None and e.index == len(out["tool_calls"]), e
            open_call = {"name": e.name, "arguments": ""}
            out["tool_calls"].append({"type": "function", "function": open_call})
        elif isinstance(e, ToolCallArgumentsDelta):
            assert open_call is not None and e.index == len(out["tool_calls"]) - 1 and e.text, e
            open_call["arguments"] += e.text
        elif isinstance(e, ToolCallEnd):
            assert open_call is not None and e.index == len(out["tool_calls"]) - 1, e
            assert e.arguments_json == open_call["arguments"], "deltas must add up to the final arguments"
            open_call = None
        else:
            raise AssertionError(f"unknown event {e!r}")
    assert open_call is None, "a tool call was started but never ended"
    return out


# -- what a cut-off generation may still become ------------------------------------------------
# Texts that finish any well-formed prefix: a neutral character breaks a partial marker in free
# text, and one of these suffixes completes whatever part of a tool block is open.
_CLOSERS = [f"\0</{DSML}parameter>\n</{DSML}invoke>\n</{DSML}tool_calls>",
            f' name="x" string="true">v</{DSML}parameter>\n</{DSML}invoke>\n</{DSML}tool_calls>',
            f' name="x">\n\n</{DSML}invoke>\n</{DSML}tool_calls>', EOS]
_ENDINGS = ["\0" + EOS, "\0</think>\0" + EOS] + [c[i:] for c in _CLOSERS for i in range(len(c))]


def parses(text: str, mode: str) -> dict | None:
    try:
        return parse_completion(text, mode)
    except ChatFormatError:
        return None


def viable(text: str, mode: str) -> bool:
    """parse_completion accepts the text or some continuation of it (an oracle built on the parser alone)."""
    return any(parses(text + e, mode) is not None for e in ["", *_ENDINGS])


# -- hand-written tool blocks ------------------------------------------------------------------


def block(*invokes: str) -> str:
    return f"\n\n<{DSML}tool_calls>\n" + "\n".join(invokes) + f"\n</{DSML}tool_calls>{EOS}"


def invoke(name: str, *params: str) -> str:
    return f'<{DSML}invoke name="{name}">\n' + "\n".join(params) + f"\n</{DSML}invoke>"


def param(k: str, v: str, s: str = "true") -> str:
    return f'<{DSML}parameter name="{k}" string="{s}">{v}</{DSML}parameter>'


# Malformed completions (chat mode) and the error each must raise.
MALFORMED = [
    (f"x\n\n<{DSML}tool_calls>" + invoke("f") + f"\n</{DSML}tool_calls>{EOS}", "expected '>\\\\n'"),
    (block(invoke("f", param("a", "1")) + "\n"), "expected '>\\\\n'"),
    (block(invoke("f", param("a", "1", "yes"))), "malformed parameter"),
    (block(invoke("f", f'<{DSML}parameter name="a" string="true">1/{DSML}parameter>')), "malformed parameter"),
    (block(invoke("f", param("a", "1") + " ")), "expected '>\\\\n'"),
    (f"x\n\n<{DSML}tool_calls>\n" + invoke("f"), "expected '>\\\\n'"),  # cut off inside the block
    (block(f'<{DSML}invoke title="f">\n</{DSML}invoke>'), "malformed invoke line"),
    (block(f'<{DSML}invoke name="f">\n\n\n</{DSML}invoke>'), "malformed invoke line"),
    (f"a{DSML}b{EOS}", "special token '｜DSML｜' inside the content"),
    (f"a</think>b{EOS}", "special token '</think>' inside the content"),
    (f"<｜begin▁of▁sentence｜>a{EOS}", "inside the content"),
    (f"a{EOS}{EOS}", "text after the end-of-sentence token"),
]
