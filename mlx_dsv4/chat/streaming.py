"""Incremental parsing of a streamed completion into reasoning, content and tool-call events.

Text goes out as soon as it cannot be the start of a marker (`</think>`, EOS, the tool block,
a special token that would make the text malformed): only a possibly-partial marker at the end
of the buffer is held back. Tool-call arguments stream as JSON text the way OpenAI streams them:
the deltas of one call concatenate to exactly the `arguments` string parse_completion returns
(string values are JSON-escaped piece by piece, which is exact because JSON escapes each
character on its own).

Contract, for any split of a text into deltas: if parse_completion(text) succeeds, the events
carry the same reasoning, content and calls and `complete` is True; if it fails only because
the text stops early (some continuation would parse), no error is raised and `complete` stays
False; otherwise a feed() raises ChatFormatError. finish() never raises: a generation cut short
(max_tokens) flushes its held-back text, and a call it interrupted gets no ToolCallEnd.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .parsing import NAME_LINE, SEP, ChatFormatError, check_mode
from .tokens import (
    BLOCK_END,
    BOS,
    DSML,
    EOS,
    INVOKE,
    INVOKE_END,
    PARAM,
    PARAM_END,
    THINK_END,
    THINK_START,
    TOOL_BLOCK_OPEN,
)


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


Event = ReasoningDelta | ContentDelta | ToolCallStart | ToolCallArgumentsDelta | ToolCallEnd

# Markers per text state: where it goes next, or None for a marker that makes the text malformed.
_REASONING = {THINK_END: "content", TOOL_BLOCK_OPEN: None, BOS: None, EOS: None, THINK_START: None, DSML: None}
_CONTENT = {EOS: "done", TOOL_BLOCK_OPEN: "tools", BOS: None, THINK_START: None, THINK_END: None, DSML: None}
_NAME_HEAD = 'name="'
_PARAM_HEAD = " " + _NAME_HEAD
_STRING = {'" string="true">': True, '" string="false">': False}
_VALUE_END = "<" + PARAM_END


def _partial_start(buf: str, stops, start: int = 0) -> int:
    """Where the longest suffix of buf[start:] that is a proper prefix of a stop begins (len(buf) if none)."""
    for i in range(max(start, len(buf) - max(map(len, stops)) + 1), len(buf)):
        if any(len(s) > len(buf) - i and s.startswith(buf[i:]) for s in stops):
            return i
    return len(buf)


def _scan(buf: str, stops, start: int = 0) -> tuple[int, str | None]:
    """(position, stop) of the earliest stop in buf[start:]; (safe, None) if none is complete
    or a partial one starts earlier: buf[start:safe] can be released."""
    hits = [(i, s) for s in stops if (i := buf.find(s, start)) >= 0]
    safe = _partial_start(buf, stops, start)
    if hits and min(hits)[0] < safe:
        return min(hits)
    return safe, None


def _escape(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)[1:-1]


class StreamingParser:
    """feed(delta) -> events, then finish() -> events. `buf` holds the text not yet turned into
    events; `state` is one of "reasoning", "content", "tools", "tail" (after the tool block),
    "done" (after EOS)."""

    def __init__(self, thinking_mode: str = "chat"):
        check_mode(thinking_mode)
        self.state = "reasoning" if thinking_mode == "thinking" else "content"
        self.buf = ""
        self.n_calls = 0
        self._step = ("sep", (INVOKE, BLOCK_END))  # position inside the tool block
        self._args: list[str] = []  # '"name": value' items of the open call
        self._names: set[str] = set()
        self._is_str = False

    @property
    def complete(self) -> bool:
        """True once the text is a whole completion (EOS seen, or a closed tool block)."""
        return self.state == "done" or (self.state == "tail" and not self.buf)

    def feed(self, delta: str) -> list[Event]:
        """Events for one more piece of text. On ChatFormatError nothing of `delta` is consumed:
        the parser is as before the call and `buf` holds all the text no event has covered yet."""
        saved = {**self.__dict__, "_args": list(self._args), "_names": set(self._names)}
        self.buf += delta
        events: list[Event] = []
        try:
            while self._advance(events):
                pass
        except ChatFormatError:
            self.__dict__.update(saved)
            self.buf += delta
            raise
        return events

    def finish(self) -> list[Event]:
        """Flush at the end of the stream: held-back text was not a marker after all."""
        events: list[Event] = []
        if self.buf and self.state in ("reasoning", "content"):
            events.append((ReasoningDelta if self.state == "reasoning" else ContentDelta)(self.buf))
            self.buf = ""
        return events

    # -- one step; False when more text is needed ------------------------------------------------
    def _advance(self, events: list[Event]) -> bool:
        if self.state in ("reasoning", "content"):
            return self._text(events)
        if self.state == "tools":
            return self._tools(events)
        if self.state == "tail" and self.buf:
            if self.buf.startswith(EOS):
                self.buf, self.state = self.buf[len(EOS) :], "done"
                return True
            if not EOS.startswith(self.buf):
                raise ChatFormatError(f"unexpected text after the tool-call block: {self.buf[:40]!r}")
        if self.state == "done" and self.buf:
            raise ChatFormatError(f"text after the end-of-sentence token: {self.buf[:40]!r}")
        return False

    def _text(self, events: list[Event]) -> bool:
        kind = ReasoningDelta if self.state == "reasoning" else ContentDelta
        markers = _REASONING if self.state == "reasoning" else _CONTENT
        pos, stop = _scan(self.buf, markers)
        if pos:
            events.append(kind(self.buf[:pos]))
            self.buf = self.buf[pos:]
        if stop is None:
            return False
        if markers[stop] is None:
            where = "reasoning (before </think>)" if self.state == "reasoning" else "content"
            raise ChatFormatError(f"{stop!r} inside the {where}")
        self.buf, self.state = self.buf[len(stop) :], markers[stop]
        return True

    def _tools(self, events: list[Event]) -> bool:
        step, b, i = self._step[0], self.buf, self.n_calls
        if step == "sep":  # exactly ">\n", then one of the expected markers
            for stop in self._step[1]:
                if b.startswith(SEP + stop):
                    self.buf = b[len(SEP + stop) :]
                    return self._after(stop, events)
            if not any((SEP + stop).startswith(b) for stop in self._step[1]):
                raise ChatFormatError(f"tool block: expected '>\\n' then one of {self._step[1]}, got {b[:40]!r}")
            return False
        if step == "name":  # the invoke line, up to the first parameter or the end of the invoke
            lead = b.lstrip()
            if not (lead.startswith(_NAME_HEAD) or _NAME_HEAD.startswith(lead)):
                raise ChatFormatError(f"tool block: malformed invoke line {b[:60]!r}")
            pos, stop = _scan(b, (PARAM, INVOKE_END))
            if stop is None:
                return False
            m = NAME_LINE.fullmatch(b[:pos])
            if not m:
                raise ChatFormatError(f"tool block: malformed invoke line {b[:pos][:60]!r}")
            events.append(ToolCallStart(i, m[1]))
            self.buf, self._args, self._names = b[pos + len(stop) :], [], set()
            return self._after(stop, events)
        if step == "head":  # ' name="K" string="true|false">', the name ending at the first such tail
            if not (b.startswith(_PARAM_HEAD) or _PARAM_HEAD.startswith(b)):
                raise ChatFormatError(f"tool call {i}: malformed parameter {b[:60]!r}")
            pos, stop = _scan(b, (*_STRING, PARAM_END), len(_PARAM_HEAD))
            if stop is None:
                return False
            if stop == PARAM_END:
                raise ChatFormatError(f"tool call {i}: parameter without a string=\"true|false\" attribute")
            name = b[len(_PARAM_HEAD) : pos]
            if name in self._names:
                raise ChatFormatError(f"tool call {i}: duplicate parameter {name!r}")
            self._names.add(name)
            self._is_str = _STRING[stop]
            self._args.append(json.dumps(name, ensure_ascii=False) + ": " + ('"' if self._is_str else ""))
            events.append(ToolCallArgumentsDelta(i, ("{" if len(self._args) == 1 else ", ") + self._args[-1]))
            self.buf, self._step = b[pos + len(stop) :], ("value",)
            return True
        # value: raw text up to "</｜DSML｜parameter"
        pos, stop = _scan(b, (_VALUE_END, PARAM_END))
        if stop == PARAM_END:
            raise ChatFormatError(f"tool call {i}: a parameter value must end with '<' before {PARAM_END!r}")
        piece = _escape(b[:pos]) if self._is_str else b[:pos]
        closing = '"' if self._is_str and stop else ""
        if piece + closing:
            self._args[-1] += piece + closing
            events.append(ToolCallArgumentsDelta(i, piece + closing))
        self.buf = b[pos + len(stop or "") :]
        if stop is None:
            return False
        self._step = ("sep", (PARAM, INVOKE_END))
        return True

    def _after(self, stop: str, events: list[Event]) -> bool:
        """Where a marker of the tool block leads."""
        if stop == INVOKE:
            self._step = ("name",)
        elif stop == PARAM:
            self._step = ("head",)
        elif stop == INVOKE_END:
            args = "{" + ", ".join(self._args) + "}"
            events.append(ToolCallArgumentsDelta(self.n_calls, "}" if self._args else "{}"))
            events.append(ToolCallEnd(self.n_calls, args))
            self.n_calls += 1
            self._step = ("sep", (INVOKE, BLOCK_END))
        else:  # BLOCK_END
            self.state = "tail"
        return True
