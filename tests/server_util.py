"""Helpers for the server tests: the tiny model (loaded once), a real uvicorn server on a free
loopback port, a model proxy that records what the engine feeds it, a scripted engine, and the
oracle (plain greedy generation outside the server)."""

from __future__ import annotations

import functools
import socket
import threading
import time

import uvicorn

from mlx_dsv4.chat import encode_messages
from mlx_dsv4.generate import GenerationResponse, stream_generate
from mlx_dsv4.load import load
from mlx_dsv4.server.app import create_app
from mlx_dsv4.server.engine import DONE


# Every POST route, and a minimal valid body for each (the error and hostile-input tests vary them).
ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages", "/v1/messages/count_tokens"]
HELLO = [{"role": "user", "content": "Hello"}]
VALID = {"/v1/chat/completions": {"messages": HELLO, "max_tokens": 2},
         "/v1/completions": {"prompt": "Hello", "max_tokens": 2},
         "/v1/responses": {"input": "Hello", "max_output_tokens": 2},
         "/v1/messages": {"messages": HELLO, "max_tokens": 2},
         "/v1/messages/count_tokens": {"messages": HELLO}}


@functools.lru_cache(maxsize=1)
def tiny():
    return load("tiny-random")


class RecordingModel:
    """Wraps the model: records the token ids of every forward call and the thread that made it."""

    def __init__(self, model):
        self._model = model
        self._log: list[tuple[object, str]] = []

    def __call__(self, x, *args, **kw):
        # kept as given and read later: a pipelined decode step is fed tokens still being computed
        self._log.append((x, threading.current_thread().name))
        return self._model(x, *args, **kw)

    @property
    def calls(self) -> list[tuple[list[int], str]]:
        return [(x.reshape(-1).tolist(), name) for x, name in self._log]

    def clear(self) -> None:
        self._log.clear()

    def __getattr__(self, name):
        return getattr(self._model, name)

    @property
    def fed(self) -> list[int]:
        return [t for toks, _ in self.calls for t in toks]


class Running:
    """uvicorn serving `app` on 127.0.0.1 in a background thread; use as a context manager."""

    def __init__(self, app):
        self.app = app
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.app.state.server.engine.close()

    @property
    def engine(self):
        return self.app.state.server.engine


def start(model=None, **kw) -> Running:
    m, tok = tiny()
    return Running(create_app(model or m, tok, model_name="tiny", **kw))


def prompt_ids(messages, mode="chat", effort=None) -> list[int]:
    return tiny()[1].encode(encode_messages(messages, mode, effort), add_special_tokens=False)


def oracle(ids: list[int], max_tokens: int, stop=None) -> tuple[str, list[int]]:
    """Greedy text and tokens of a cold run, straight through stream_generate (no server, no cache)."""
    model, tok = tiny()
    text, toks = "", []
    for r in stream_generate(model, tok, ids, max_tokens=max_tokens, temperature=0.0, stop=stop):
        text += r.text
        if r.token is not None:
            toks.append(r.token)
    return text, toks


class ScriptedEngine:
    """Stands in for the Engine (tests only): replays a fixed completion in 3-character pieces as
    GenerationResponses, exercising the same HTTP output path as real generations."""

    def __init__(self, completion: str, error_after: int | None = None, delay: float = 0.0):
        self.completion, self.error_after, self.delay = completion, error_after, delay
        self.pending = 0

    def submit(self, tokens, params, emit):
        if self.delay:  # like a long prefill: nothing for a while, from another thread
            threading.Timer(self.delay, self._replay, (tokens, emit)).start()
        else:
            self._replay(tokens, emit)
        return _NoJob()

    def _replay(self, tokens, emit):
        pieces = [self.completion[i : i + 3] for i in range(0, len(self.completion), 3)]
        for k, p in enumerate(pieces):
            if self.error_after is not None and k == self.error_after:
                emit(RuntimeError("scripted failure"))
                break
            emit(GenerationResponse(p, 1000 + k, -0.5, None, len(tokens), 0, 1.0, k + 1, 1.0, 0.1,
                                    "stop" if k == len(pieces) - 1 else None))
        emit(DONE)

    def close(self):
        pass


class _NoJob:
    def cancel(self):
        pass
