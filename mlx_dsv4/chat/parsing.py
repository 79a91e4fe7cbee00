"""parse_completion: the model's completion text -> an OpenAI-style assistant message.

Strict, like the official parser: in thinking mode the reasoning must end with </think> before
anything else; content runs to EOS or to the DSML tool-call block; the block is parsed exactly
(`>\\n` separators, a string="true|false" attribute, no duplicate parameters) and only EOS may
follow it; no special token may leak into content or reasoning.
"""

from __future__ import annotations

import json
import re

from .tokens import DSML, EOS, FORBIDDEN_IN_TEXT, THINK_END, TOOL_CALLS_END

TOOL_BLOCK_OPEN = f"\n\n<{DSML}tool_calls"
_INVOKE = re.compile(rf'<{DSML}invoke name="([^"\n]*)">\n')
_PARAM = re.compile(rf'<{DSML}parameter name="([^"\n]*)" string="(true|false)">')
_PARAM_END = f"</{DSML}parameter>"
_INVOKE_END = f"</{DSML}invoke>"


class ChatFormatError(ValueError):
    """Completion text that does not follow the DeepSeek-V4 output format."""


def _check_clean(text: str, what: str) -> None:
    for tok in FORBIDDEN_IN_TEXT:
        if tok in text:
            raise ChatFormatError(f"special token {tok!r} inside {what}")


def parse_tool_calls(block: str) -> list[dict]:
    """Parse the invokes of a block that starts right after `<｜DSML｜tool_calls>\\n`."""
    calls, pos = [], 0
    while True:
        m = _INVOKE.match(block, pos)
        if not m:
            raise ChatFormatError(f"expected an invoke at offset {pos}: {block[pos:pos + 40]!r}")
        name, pos = m[1], m.end()
        args: dict[str, str] = {}
        if block.startswith("\n" + _INVOKE_END, pos):  # zero parameters: one empty line
            pos += 1
        else:
            while True:
                p = _PARAM.match(block, pos)
                if not p:
                    raise ChatFormatError(f"invoke {name!r}: malformed parameter at {block[pos:pos + 50]!r}")
                end = block.find(_PARAM_END, p.end())
                if end < 0:
                    raise ChatFormatError(f"invoke {name!r}: parameter {p[1]!r} is not closed")
                if p[1] in args:
                    raise ChatFormatError(f"invoke {name!r}: duplicate parameter {p[1]!r}")
                value = block[p.end() : end]
                args[p[1]] = json.dumps(value, ensure_ascii=False) if p[2] == "true" else value
                pos = end + len(_PARAM_END)
                if not block.startswith("\n", pos):
                    raise ChatFormatError(f"invoke {name!r}: expected a newline after parameter {p[1]!r}")
                pos += 1
                if block.startswith(_INVOKE_END, pos):
                    break
        if not block.startswith(_INVOKE_END, pos):
            raise ChatFormatError(f"invoke {name!r} is not closed")
        pos += len(_INVOKE_END)
        arguments = "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)}: {v}" for k, v in args.items()) + "}"
        calls.append({"type": "function", "function": {"name": name, "arguments": arguments}})
        if block.startswith(TOOL_CALLS_END, pos):
            return calls, pos + len(TOOL_CALLS_END)
        if not block.startswith("\n", pos):
            raise ChatFormatError(f"expected a newline or the end of the tool block after invoke {name!r}")
        pos += 1


def parse_completion(text: str, thinking_mode: str = "chat") -> dict:
    if thinking_mode not in ("chat", "thinking"):
        raise ValueError(f"thinking_mode must be 'chat' or 'thinking', got {thinking_mode!r}")
    if not isinstance(text, str):
        raise ChatFormatError("completion must be a string")
    reasoning, rest = "", text
    if thinking_mode == "thinking":
        end = text.find(THINK_END)
        block = text.find(TOOL_BLOCK_OPEN)
        if end < 0:
            raise ChatFormatError("thinking mode: the reasoning is not closed with </think>")
        if 0 <= block < end:
            raise ChatFormatError("thinking mode: a tool-call block starts before </think>")
        reasoning, rest = text[:end], text[end + len(THINK_END) :]
    eos, block = rest.find(EOS), rest.find(TOOL_BLOCK_OPEN)
    tool_calls: list[dict] = []
    if block >= 0 and (eos < 0 or block < eos):
        content = rest[:block]
        after = rest[block + len(TOOL_BLOCK_OPEN) :]
        if not after.startswith(">\n"):
            raise ChatFormatError("malformed tool-call block opening")
        tool_calls, used = parse_tool_calls(after[2:])
        tail = after[2 + used :]
        if tail not in ("", EOS):
            raise ChatFormatError(f"unexpected text after the tool-call block: {tail[:40]!r}")
    elif eos >= 0:
        content = rest[:eos]
        if rest[eos + len(EOS) :]:
            raise ChatFormatError(f"text after the end-of-sentence token: {rest[eos + len(EOS):][:40]!r}")
    else:
        raise ChatFormatError("the completion ends without an end-of-sentence token or a tool-call block")
    _check_clean(content, "content")
    _check_clean(reasoning, "reasoning")
    return {"role": "assistant", "content": content, "reasoning_content": reasoning, "tool_calls": tool_calls}
