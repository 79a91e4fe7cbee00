"""parse_completion: the model's completion text -> an OpenAI-style assistant message.

Strict, like the official parser, which reads the text as a sequence of "everything up to the
next marker" steps:
- thinking mode: the reasoning runs to `</think>`, which must come before any tool block;
- the content runs to EOS or to the tool block opener `\\n\\n<｜DSML｜tool_calls`;
- the block is read marker by marker, and the text between two markers must be exactly what
  the encoder writes there (`>\\n`), a name line `name="..."`, or a parameter
  ` name="..." string="true|false">VALUE<`; parameter names may not repeat;
- only EOS may follow `</｜DSML｜tool_calls>` (a block may also end the text);
- nothing may follow EOS, and no special token may appear in the content or the reasoning.
A text that stops before EOS (or before the end of its tool block) is malformed here; the
streaming parser is the one that tolerates truncated generations.
"""

from __future__ import annotations

import json
import re

from .tokens import BLOCK_END, EOS, FORBIDDEN_IN_TEXT, INVOKE, INVOKE_END, PARAM, PARAM_END, THINK_END, TOOL_BLOCK_OPEN

THINKING_MODES = ("chat", "thinking")
# What may sit between markers. DOTALL and lazy names: the name ends at the first `">` that
# completes the line (an empty line after it is the encoder's zero-argument invoke).
NAME_LINE = re.compile(r'\s*name="(.*?)">\n\n?', re.DOTALL)
PARAM_BODY = re.compile(r' name="(.*?)" string="(true|false)">(.*?)<', re.DOTALL)
SEP = ">\n"


class ChatFormatError(ValueError):
    """Completion text that does not follow the DeepSeek-V4 output format."""


def check_mode(thinking_mode: str) -> None:
    if thinking_mode not in THINKING_MODES:
        raise ValueError(f"thinking_mode must be one of {THINKING_MODES}, got {thinking_mode!r}")


def arguments_json(args: list[tuple[str, str, bool]]) -> str:
    """OpenAI `arguments` from (name, value, is_string) triples: string values are JSON-quoted,
    the others go in verbatim (the model wrote them as JSON; they are not validated)."""
    items = (f"{_q(k)}: {_q(v) if is_str else v}" for k, v, is_str in args)
    return "{" + ", ".join(items) + "}"


def _q(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


class _Reader:
    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def until(self, *stops: str) -> tuple[str, str | None]:
        """Text up to the earliest stop, and that stop (consumed); (rest, None) if none occurs."""
        hits = [(i, s) for s in stops if (i := self.text.find(s, self.pos)) >= 0]
        if not hits:
            chunk, self.pos = self.text[self.pos :], len(self.text)
            return chunk, None
        i, stop = min(hits)
        chunk, self.pos = self.text[self.pos : i], i + len(stop)
        return chunk, stop

    def expect_sep(self, *stops: str) -> str:
        sep, stop = self.until(*stops)
        if sep != SEP or stop is None:
            raise ChatFormatError(f"tool block: expected '>\\n' then one of {stops}, got {sep[:40]!r}")
        return stop


def _tool_block(r: _Reader) -> list[dict]:
    """The calls of a block whose opener `\\n\\n<｜DSML｜tool_calls` was just read."""
    calls = []
    stop = r.expect_sep(INVOKE, BLOCK_END)
    while stop == INVOKE:
        line, stop = r.until(PARAM, INVOKE_END)
        name = NAME_LINE.fullmatch(line)
        if stop is None or not name:
            raise ChatFormatError(f"tool block: malformed invoke line {line[:60]!r}")
        args: list[tuple[str, str, bool]] = []
        while stop == PARAM:
            body, stop = r.until(PARAM_END)
            p = PARAM_BODY.fullmatch(body)
            if stop is None or not p:
                raise ChatFormatError(f"invoke {name[1]!r}: malformed parameter {body[:60]!r}")
            if any(k == p[1] for k, _, _ in args):
                raise ChatFormatError(f"invoke {name[1]!r}: duplicate parameter {p[1]!r}")
            args.append((p[1], p[3], p[2] == "true"))
            stop = r.expect_sep(PARAM, INVOKE_END)
        calls.append({"type": "function", "function": {"name": name[1], "arguments": arguments_json(args)}})
        stop = r.expect_sep(INVOKE, BLOCK_END)
    return calls


def parse_completion(text: str, thinking_mode: str = "chat") -> dict:
    """{"role": "assistant", "content", "reasoning_content", "tool_calls"} from a completion that
    includes its EOS; raises ChatFormatError (a ValueError) on anything malformed."""
    check_mode(thinking_mode)
    if not isinstance(text, str):
        raise ChatFormatError(f"the completion must be a string, got {type(text).__name__}")
    r = _Reader(text)
    reasoning = ""
    if thinking_mode == "thinking":
        reasoning, stop = r.until(THINK_END, TOOL_BLOCK_OPEN)
        if stop is None:
            raise ChatFormatError("thinking mode: the reasoning is never closed with </think>")
        if stop != THINK_END:
            raise ChatFormatError("thinking mode: a tool-call block starts before </think>")
    content, stop = r.until(EOS, TOOL_BLOCK_OPEN)
    if stop is None:
        raise ChatFormatError("the completion ends without an end-of-sentence token or a tool-call block")
    tool_calls = []
    if stop == TOOL_BLOCK_OPEN:
        tool_calls = _tool_block(r)
        tail, _ = r.until(EOS)
        if tail:
            raise ChatFormatError(f"unexpected text after the tool-call block: {tail[:40]!r}")
    if r.pos != len(text):
        raise ChatFormatError(f"text after the end-of-sentence token: {text[r.pos:r.pos + 40]!r}")
    for what, s in (("content", content), ("reasoning", reasoning)):
        for tok in FORBIDDEN_IN_TEXT:
            if tok in s:
                raise ChatFormatError(f"special token {tok!r} inside the {what}")
    return {"role": "assistant", "content": content, "reasoning_content": reasoning, "tool_calls": tool_calls}
