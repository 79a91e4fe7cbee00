"""One sampling-parameters type (mlx_dsv4/sampling.py): its rules, and the same rule reaching the user
from generation, the CLI and every server API. Truth: the ranges written out here by hand."""

from __future__ import annotations

import re

import httpx
import pytest
from server_util import HELLO, ScriptedEngine, Running, tiny
from typer.testing import CliRunner

import mlx_dsv4.cli as cli_mod
from mlx_dsv4.generate import stream_generate
from mlx_dsv4.sampling import SamplingError, SamplingParams
from mlx_dsv4.server.app import create_app

GOOD = [{}, {"temperature": 0.0}, {"temperature": 7.5}, {"top_p": 1.0}, {"top_p": 1e-9}, {"top_k": 0},
        {"top_k": 2**31 - 1}, {"min_p": 0.0}, {"min_p": 1.0}, {"repetition_penalty": 1e-3}, {"seed": 0},
        {"seed": 2**64 - 1}]
BAD = [("temperature", -0.1), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.01), ("top_k", -1),
       ("top_k", 2**31), ("top_k", 1.5), ("top_k", True), ("min_p", -0.01), ("min_p", 1.5),
       ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("seed", -1), ("seed", 2**64)]


def test_the_ranges():
    for kw in GOOD:
        assert SamplingParams(**kw).check() == SamplingParams(**kw)
    for field, v in BAD:
        with pytest.raises(SamplingError, match=field) as e:
            SamplingParams(**{field: v}).check()
        assert e.value.field == field


def test_api_caps():
    SamplingParams(temperature=2.0, repetition_penalty=10.0).check(max_temperature=2.0, max_repetition_penalty=10.0)
    for kw in ({"temperature": 2.5}, {"repetition_penalty": 10.5}):
        with pytest.raises(SamplingError, match="<= "):
            SamplingParams(**kw).check(max_temperature=2.0, max_repetition_penalty=10.0)
        SamplingParams(**kw).check()  # generation itself has no such cap


@pytest.mark.parametrize("field, value", [("top_p", 0.0), ("repetition_penalty", 0.0), ("top_k", -1)])
def test_every_front_end_reports_the_same_rule(field, value, monkeypatch):
    rule = str(pytest.raises(SamplingError, SamplingParams(**{field: value}).check).value).split(", got")[0]
    model, tok = tiny()
    with pytest.raises(ValueError, match=re.escape(rule)):
        stream_generate(model, tok, "hello", **{field: value})
    flag = "--" + field.replace("_", "-")
    if field != "top_k":  # typer bounds --top-k itself (min=0)
        monkeypatch.setattr(cli_mod, "_generate", lambda *a: None)
        r = CliRunner().invoke(cli_mod.app, ["generate", "-m", "tiny-random", flag, str(value), "x"])
        assert r.exit_code == 2 and rule in r.output.replace("\n", " ").replace("│", "").replace("  ", " ")
    with Running(create_app(model, tok, model_name="tiny", engine=ScriptedEngine("x"))) as s:
        for route, body in (("/v1/chat/completions", {"messages": HELLO, "max_tokens": 2}),
                            ("/v1/completions", {"prompt": "Hello", "max_tokens": 2}),
                            ("/v1/responses", {"input": "Hello", "max_output_tokens": 2}),
                            ("/v1/messages", {"messages": HELLO, "max_tokens": 2})):
            r = httpx.post(s.url + route, json={**body, field: value}, timeout=30)
            assert r.status_code == 400 and rule in r.text, (route, r.text)
