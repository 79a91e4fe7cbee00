"""perplexity(): against the model's own logits scored independently, and closed forms."""

import math

import mlx.core as mx
import numpy as np
import pytest
from typer.testing import CliRunner

from mlx_dsv4.load import load
from mlx_dsv4.perplexity import perplexity, read_text_tokens, unigram_entropy


@pytest.fixture(scope="module")
def tiny():
    return load("tiny-random")


def test_matches_log_softmax_of_the_models_logits(tiny):
    model, _ = tiny
    ids = np.random.default_rng(0).integers(0, 129280, 70).astype(np.int32)
    r = perplexity(model, ids, sequence_length=32, mtp=True)  # two windows; the last 6 ids are dropped
    nll, mtp = [], []
    for w in ids[:64].reshape(2, 32):
        logits = np.array(model(mx.array(w[None])), np.float64)[0]
        lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll += list(lse[:-1] - logits[np.arange(31), w[1:]])
        h = model.hidden_streams(mx.array(w[None]))
        d = np.array(model.mtp_logits(h[:, :-2], mx.array(w[None, 1:-1])), np.float64)[0]
        dl = np.log(np.exp(d - d.max(-1, keepdims=True)).sum(-1)) + d.max(-1)
        mtp += list(dl - d[np.arange(30), w[2:]])
    assert r.tokens == 62
    assert abs(r.nll - np.mean(nll)) < 1e-4 * abs(np.mean(nll))  # float32 logits, float64 here
    assert abs(r.stderr - np.std(nll, ddof=1) / math.sqrt(62)) < 1e-3 * r.stderr
    assert abs(r.perplexity - math.exp(r.nll)) < 1e-9 * r.perplexity
    assert abs(r.mtp_nll - np.mean(mtp)) < 1e-4 * abs(np.mean(mtp))
    # num_tokens keeps a prefix: one window
    assert perplexity(model, ids, sequence_length=32, num_tokens=40).tokens == 31


def test_unigram_entropy_closed_form():
    assert unigram_entropy(np.array([5, 5, 5, 5])) == 0
    assert abs(unigram_entropy(np.array([1, 2, 3, 4])) - math.log(4)) < 1e-12
    assert abs(unigram_entropy(np.array([1, 1, 1, 2])) - (-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))) < 1e-12


def test_bad_input(tiny, tmp_path):
    model, tok = tiny
    with pytest.raises(ValueError, match="fewer than one sequence"):
        perplexity(model, [1, 2, 3], sequence_length=8)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        perplexity(model, [0, 1, 200000, 3], sequence_length=3)
    with pytest.raises(FileNotFoundError):
        read_text_tokens(tok, tmp_path / "missing.py")
    with pytest.raises(ValueError, match="no files matching"):
        read_text_tokens(tok, tmp_path)


def test_cli(tmp_path):
    from mlx_dsv4 import cli as cli_mod

    src = tmp_path / "a.py"
    src.write_text("def f(x):\n    return x + 1\n" * 20)
    r = CliRunner().invoke(cli_mod.app, ["perplexity", "--model", "tiny-random", "--data", str(src),
                                         "--sequence-length", "16", "--num-tokens", "64", "--mtp",
                                         "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    assert "mean NLL" in r.output and "MTP NLL" in r.output and "unigram entropy" in r.output
    assert (tmp_path / "r.json").exists()
    r = CliRunner().invoke(cli_mod.app, ["perplexity", "--model", "tiny-random", "--data", str(tmp_path / "no")])
    assert r.exit_code == 1 and "error:" in r.output
