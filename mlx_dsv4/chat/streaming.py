"""Incremental parsing of a streamed completion into reasoning, content and tool-call events.

Text is emitted as soon as it cannot be the start of a marker (</think>, EOS, the DSML tool
block): only a possibly-partial marker at the end of the buffer is held back. Tool-call
arguments stream as JSON text, one parameter at a time, so the deltas of a call concatenate to
exactly the `arguments` string that parse_completion returns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .parsing import _INVOKE, _INVOKE_END, _PARAM, _PARAM_END, TOOL_BLOCK_OPEN, ChatFormatError
from .tokens import EOS, THINK_END, TOOL_CALLS_END


@dataclass
class ReasoningDelta:
    text: str


@dataclass
class ContentDelta:
    text: str


@dataclass
class ToolCallStart:
    index: int
    name: str


@dataclass
class ToolCallArgumentsDelta:
    index: int
    text: str


@dataclass
class ToolCallEnd:
    index: int
    arguments_json: str


def _held(buf: str, markers) -> int:
    """Length of the longest suffix of buf that is a proper prefix of a marker."""
    best = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(buf)), best, -1):
            if buf.endswith(m[:k]):
                best = k
                break
    return best


class StreamingParser:
    def __init__(self, thinking_mode: str = "chat"):
        if thinking_mode not in ("chat", "thinking"):
            raise ValueError(f"thinking_mode must be 'chat' or 'thinking', got {thinking_mode!r}")
        self.state = "reasoning" if thinking_mode == "thinking" else "content"
        self.buf = ""
        self.n_calls = 0
        self._args: list[str] | None = None  # parameters of the open invoke

    def feed(self, delta: str) -> list:
        self.buf += delta
        events: list = []
        while True:
            before = (self.state, len(self.buf))
            if self.state == "reasoning":
                self._text_until(events, ReasoningDelta, {THINK_END: "content"})
            elif self.state == "content":
                self._text_until(events, ContentDelta, {EOS: "done", TOOL_BLOCK_OPEN + ">\n": "tools"})
            elif self.state == "tools":
                self._tools(events)
            else:  # done: everything after EOS is ignored
                self.buf = ""
            if (self.state, len(self.buf)) == before:
                return events

    def finish(self) -> list:
        """Flush at the end of the stream (e.g. cut by max_tokens)."""
        events: list = []
        if self.buf and self.state in ("reasoning", "content"):
            events.append((ReasoningDelta if self.state == "reasoning" else ContentDelta)(self.buf))
        self.buf = ""
        return events

    def _text_until(self, events, kind, markers: dict) -> None:
        hits = [(self.buf.find(m), m) for m in markers if m in self.buf]
        if hits:
            i, m = min(hits)
            if i:
                events.append(kind(self.buf[:i]))
            self.buf = self.buf[i + len(m) :]
            self.state = markers[m]
            return
        keep = _held(self.buf, markers)
        if len(self.buf) > keep:
            events.append(kind(self.buf[: len(self.buf) - keep]))
            self.buf = self.buf[len(self.buf) - keep :]

    def _tools(self, events) -> None:
        b = self.buf
        if self._args is None:
            if b.startswith(TOOL_CALLS_END):
                self.buf, self.state = b[len(TOOL_CALLS_END) :], "done"
                return
            if b.startswith("\n") and self.n_calls:
                b = b[1:]
            m = _INVOKE.match(b)
            if m:
                self._args = []
                self.buf = b[m.end() :]
                events.append(ToolCallStart(self.n_calls, m[1]))
            elif len(b) > 200 and "\n" in b:
                raise ChatFormatError(f"malformed tool-call block near {b[:40]!r}")
            return
        if not self._args and b.startswith("\n"):  # a zero-parameter invoke leaves one empty line
            if not b.startswith("\n" + _INVOKE_END):
                return
            b = b[1:]
        if b.startswith(_INVOKE_END):
            idx = self.n_calls
            if not self._args:
                events.append(ToolCallArgumentsDelta(idx, "{}"))
            else:
                events.append(ToolCallArgumentsDelta(idx, "}"))
            events.append(ToolCallEnd(idx, "{" + ", ".join(self._args) + "}"))
            self.buf, self._args = b[len(_INVOKE_END) :], None
            self.n_calls += 1
            return
        p = _PARAM.match(b)
        if not p:
            return
        end = b.find(_PARAM_END, p.end())
        if end < 0 or len(b) < end + len(_PARAM_END) + 1:
            return  # wait for the value, its closing tag and the newline after it
        value = b[p.end() : end]
        item = f"{json.dumps(p[1], ensure_ascii=False)}: " + (json.dumps(value, ensure_ascii=False)
                                                              if p[2] == "true" else value)
        events.append(ToolCallArgumentsDelta(self.n_calls, ("{" if not self._args else ", ") + item))
        self._args.append(item)
        self.buf = b[end + len(_PARAM_END) + 1 :]
