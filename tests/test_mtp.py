"""The MTP block: loaded, runs, causal, and consistent between one pass and a cached decode.

(transformers does not instantiate the MTP block, so there is no oracle; these are properties.)
"""

import mlx.core as mx
import numpy as np

from tinymodels import mlx_model, rel_err, tokens


def _setup():
    m = mlx_model("flash")
    toks = mx.array(tokens(200, seed=9))
    h = m.hidden_streams(toks[:, :-1])
    return m, toks, h


def test_mtp_weights_are_loaded_and_used():
    m, toks, h = _setup()
    assert m.mtp[0].attn.ratio == 0 and "bias" in m.mtp[0].ffn.gate  # sliding, learned routing
    out = np.array(m.mtp_logits(h, toks[:, 1:]))
    assert out.shape == (1, 199, m.args.vocab_size) and np.isfinite(out).all()
    m.mtp[0].e_proj.weight = mx.zeros_like(m.mtp[0].e_proj.weight)
    assert rel_err(np.array(m.mtp_logits(h, toks[:, 1:])), out) > 1e-3


def test_mtp_is_causal():
    m, toks, h = _setup()
    base = np.array(m.mtp_logits(h, toks[:, 1:]))
    nxt = np.array(toks[:, 1:])
    nxt[0, 150] = (nxt[0, 150] + 1) % m.args.vocab_size
    changed = np.array(m.mtp_logits(h, mx.array(nxt)))
    assert np.array_equal(changed[:, :150], base[:, :150])
    assert not np.allclose(changed[:, 150:], base[:, 150:])


def test_mtp_cached_decode_matches_one_pass():
    m, toks, h = _setup()
    full = np.array(m.mtp_logits(h, toks[:, 1:]))
    cache = m.make_mtp_cache()
    steps = [np.array(m.mtp_logits(h[:, s : s + 50], toks[:, 1 + s : 51 + s], cache)) for s in range(0, 199, 50)]
    assert rel_err(np.concatenate(steps, axis=1), full) <= 1e-5
