"""Terminal side of the CLI: reasoning shown apart from the answer, the interactive chat session,
prefill progress bars.

Reasoning (thinking mode) is printed dim on a terminal; in a pipe or file it is framed by
"Thinking..." / "...done thinking." lines, so the answer always stands apart.
"""

from __future__ import annotations

import contextlib
import sys
from typing import TextIO

DIM, RESET = "\x1b[2m", "\x1b[0m"
HELP = "commands: /reset clears the history, /exit (or /quit, or end of input) ends the chat"


def encode_turns(messages: list[dict], mode: str, effort: str | None) -> str:
    from .chat import encode_messages

    return encode_messages(messages, thinking_mode=mode, reasoning_effort=effort)


def reusable_prefix(tokenizer, ids: list[int], messages: list[dict], mode: str, effort: str | None) -> list[int]:
    """The part of a prompt worth caching on disk: the encoded system prompt when it is a proper
    token prefix of the prompt (then other questions can reuse it), else all but the last token."""
    if messages and messages[0]["role"] == "system":
        p = tokenizer.encode(encode_turns(messages[:1], mode, effort), add_special_tokens=False)
        if 0 < len(p) < len(ids) and ids[: len(p)] == p:
            return p
    return ids[:-1]


@contextlib.contextmanager
def progress_bar(total: int, step: int):
    """A prefill progress callback(done, total) drawing a bar on a terminal, for prefills of more
    than one chunk (shorter ones take no noticeable time)."""
    if total <= step or not sys.stderr.isatty():
        yield None
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc="prefill", unit="tok", leave=False, file=sys.stderr) as bar:
        yield lambda done, _total: bar.update(done - bar.n)


class Display:
    """Streams generated text to `out` through the chat format's StreamingParser: reasoning
    (thinking mode) apart from the answer, tool calls as readable lines. Both parts are collected
    (`reasoning`, `content`) for the chat history."""

    def __init__(self, out: TextIO, mode: str, show_reasoning: bool = True):
        from .chat import StreamingParser

        self.out, self.show = out, show_reasoning
        self.tty = out.isatty()
        self.parser = StreamingParser(mode)
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self._in_reasoning = False

    def feed(self, delta: str) -> None:
        if delta:
            self._show(self._parse(self.parser.feed, delta))

    def finish(self) -> None:
        self._show(self._parse(self.parser.finish))
        if self._in_reasoning and self.show:  # the reply ended inside its reasoning
            self.out.write((RESET if self.tty else "\n...done thinking.") + "\n")
        elif self.content:
            self.out.write("\n")
        self._in_reasoning = False
        self.out.flush()

    def _parse(self, fn, *args) -> list:
        from .chat import ChatFormatError, ContentDelta

        try:
            return fn(*args)
        except ChatFormatError:  # a malformed tool block: show the raw text instead of failing
            raw, self.parser.buf, self.parser.state = self.parser.buf, "", "content"
            return [ContentDelta(raw)]

    def _show(self, events: list) -> None:
        from .chat import ContentDelta, ReasoningDelta, ToolCallArgumentsDelta, ToolCallEnd, ToolCallStart

        for e in events:
            if isinstance(e, ReasoningDelta):
                self._write(e.text, reasoning=True)
            elif isinstance(e, ContentDelta):
                self._write(e.text)
            elif isinstance(e, ToolCallStart):
                self._write(f"\n[tool call {e.name}: ")
            elif isinstance(e, ToolCallArgumentsDelta):
                self._write(e.text)
            elif isinstance(e, ToolCallEnd):
                self._write("]")

    def _switch(self, reasoning: bool) -> None:
        if reasoning != self._in_reasoning and self.show:
            if self.tty:
                self.out.write(DIM if reasoning else RESET + "\n\n")
            else:
                self.out.write("Thinking...\n" if reasoning else "\n...done thinking.\n\n")
        self._in_reasoning = reasoning

    def _write(self, text: str, reasoning: bool = False) -> None:
        if not text:
            return
        (self.reasoning if reasoning else self.content).append(text)
        if reasoning and not self.show:
            return
        self._switch(reasoning)
        self.out.write(text)
        self.out.flush()


class ChatSession:
    """Reads one user message per line until /exit or end of input; keeps the history, and the
    cache while the next prompt extends exactly the tokens it holds (chat mode, usually)."""

    def __init__(self, model, tokenizer, system: str | None, mode: str, effort: str | None, opts: dict,
                 show_reasoning: bool = True, verbose: bool = False):
        self.model, self.tok, self.mode, self.effort = model, tokenizer, mode, effort
        self.show, self.verbose = show_reasoning, verbose
        if opts.get("seed") is not None:  # seed the session once, not every turn alike
            import mlx.core as mx

            mx.random.seed(opts["seed"])
        self.opts = {**opts, "seed": None}
        self.base = [{"role": "system", "content": system}] if system else []
        self.reset()

    def reset(self) -> None:
        self.messages = list(self.base)
        self.cache, self.cache_ids = None, []

    def run(self, inp: TextIO, out: TextIO, err: TextIO | None = None) -> None:
        err = err or sys.stderr  # looked up now: a default bound at import would outlive a redirected stderr
        tty = inp.isatty()
        print(HELP, file=err)
        while True:
            try:
                line = input(">>> ") if tty else inp.readline()
            except EOFError:
                line = ""
            if not line:  # end of input
                break
            msg = line.strip()
            if not msg:
                continue
            if msg.startswith("/"):
                cmd = msg.split()[0].lower()
                if cmd in ("/exit", "/quit"):
                    break
                if cmd == "/reset":
                    self.reset()
                    print("(history cleared)", file=err)
                else:
                    print(f"unknown command {cmd}; {HELP}", file=err)
                continue
            try:
                self.turn(msg, out, err)
            except KeyboardInterrupt:  # stop this reply, keep the session
                self.messages.pop()
                self.cache = None
                print("\n(interrupted)", file=err)

    def turn(self, message: str, out: TextIO, err: TextIO) -> None:
        from .generate import format_stats, stream_generate

        self.messages.append({"role": "user", "content": message})
        ids = self.tok.encode(encode_turns(self.messages, self.mode, self.effort), add_special_tokens=False)
        context = self.model.args.max_position_embeddings
        if len(ids) > context:
            self.messages.pop()
            print(f"error: the conversation has {len(ids)} tokens, longer than the model's context of {context};"
                  " /reset to start over", file=err)
            return
        n = len(self.cache_ids)
        if self.cache is None or not (n < len(ids) and ids[:n] == self.cache_ids):
            self.cache, self.cache_ids = self.model.make_cache(), []
        display, tokens, r = Display(out, self.mode, self.show), [], None
        cache, self.cache = self.cache, None  # only a turn that completes leaves a usable cache
        with progress_bar(len(ids) - len(self.cache_ids), self.opts["prefill_step_size"]) as bar:
            for r in stream_generate(self.model, self.tok, ids, prompt_cache=cache, progress_callback=bar,
                                     **self.opts):
                if r.token is not None:
                    tokens.append(r.token)
                display.feed(r.text)
        display.finish()
        self.cache, self.cache_ids = cache, (ids + tokens)[:-1]  # the last token is never fed
        self.messages.append({"role": "assistant", "content": "".join(display.content),
                              "reasoning_content": "".join(display.reasoning)})
        if self.verbose and r is not None:
            print(format_stats(r), file=err)
