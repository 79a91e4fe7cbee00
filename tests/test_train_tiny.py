"""The trained tiny model's recipe, in small: a few steps on a slice of the standard library must
lower the loss, and the checkpoint it writes (official layout: FP8 blocks, FP4 experts, BF16) must
load through the normal loader as exactly the network that was trained."""

import json

import mlx.core as mx
import numpy as np

from mlx_dsv4.load import load
from mlx_dsv4.train_tiny import fp4_fake, fp8_block_fake, stdlib_files, train
from tinymodels import rel_err


def test_a_few_steps_lower_the_loss_and_the_checkpoint_loads_as_trained(tmp_path):
    out = tmp_path / "tiny"
    model, meta = train(out, steps=12, seq_len=64, batch=2, lr=3e-3, seed=0, log_every=1, files_limit=6)
    losses = [r["main"] for r in meta["log"]]
    assert np.mean(losses[-3:]) < losses[0] - 0.5, losses
    record = json.loads((out / "training.json").read_text())
    assert record["train_files"] + record["heldout_files"] == stdlib_files()[:6]
    loaded, _ = load(out, dtype=mx.float32, simulate_qat=False)
    x = mx.array(np.random.default_rng(0).integers(0, 129280, (1, 80)).astype(np.int32))
    a, b = model(x), loaded(x)
    # the same stored values; quantized and plain matmuls sum in other orders (observed ~1e-6)
    assert rel_err(b, a) < 1e-4
    assert rel_err(loaded.mtp_logits(loaded.hidden_streams(x), x), model.mtp_logits(model.hidden_streams(x), x)) < 1e-4


def test_storage_roundings_are_the_official_encoders():
    """The straight-through roundings equal the writer's encoders (an independent implementation)."""
    from mlx_dsv4.checkpoint.writer_official import quantize_fp4_weight, quantize_fp8_weight
    from mlx_dsv4.formats import e4m3_to_float, fp4_block_dequantize, unpack_fp4

    w = np.random.default_rng(1).standard_normal((200, 96)).astype(np.float32) * 0.05
    codes, scales = quantize_fp8_weight(w)
    grid = np.repeat(np.repeat(np.ldexp(1.0, scales.astype(np.int32) - 127), 128, 0), 128, 1)[:200, :96]
    np.testing.assert_array_equal(np.array(fp8_block_fake(mx.array(w))), np.array(e4m3_to_float(mx.array(codes))) * grid)
    packed, exps = quantize_fp4_weight(w)
    ref = fp4_block_dequantize(unpack_fp4(mx.array(packed.view(np.uint8))), mx.array(exps), 32, mx.float32)
    np.testing.assert_array_equal(np.array(fp4_fake(mx.array(w))), np.array(ref))


def test_numpy_head_gradients_equal_autograd_of_the_full_loss():
    """train_step computes the head's softmax in numpy and feeds its input gradients back through
    the trunk; the result must equal MLX autograd of the whole loss (`losses`), which is the
    definition. Tolerance: float32 sums in other orders (observed ~7e-6 of each gradient's max)."""
    from mlx.utils import tree_flatten, tree_unflatten

    from mlx_dsv4 import train_tiny as T

    cfg = T.trained_tiny_config(64)
    model = T.init_model(cfg, 0)
    rules = T.storage_rounding(cfg)
    flat = dict(tree_flatten(model.parameters()))
    params = tree_unflatten([(k, v) for k, v in flat.items() if ".indexer." not in k and "tid2eid" not in k])
    rng = np.random.default_rng(0)
    vocab_np = np.unique(rng.integers(0, 129280, 3000))
    n_other = 129280 - len(vocab_np)
    params["other"] = mx.array(rng.standard_normal(64).astype(np.float32) * 0.1)
    rules["other"] = T.bf16_fake
    x = rng.integers(0, len(vocab_np), (2, 66))
    x[:, 9] = x[1, 40] = len(vocab_np)  # targets outside the vocabulary: the shared column
    ids = np.where(x < len(vocab_np), vocab_np[np.minimum(x, len(vocab_np) - 1)], 5)
    assert 5 not in vocab_np and (x == len(vocab_np)).any()
    b = mx.array(np.stack([ids, x]).astype(np.int32))
    main, mtp, grads = T.train_step(model, params, rules, b, vocab_np, n_other)

    def loss_fn(p):
        p = T.apply_rounding(p, rules)
        other = p.pop("other")
        model.update(p)
        a, c = T.losses(model, b, mx.array(vocab_np.astype(np.int32)), other, n_other)
        return a + T.MTP_WEIGHT * c, (a, c)

    (_, (ref_main, ref_mtp)), ref = mx.value_and_grad(loss_fn)(params)
    assert abs(main - ref_main.item()) < 1e-4 and abs(mtp - ref_mtp.item()) < 1e-4
    got = dict(tree_flatten(grads))
    for k, v in tree_flatten(ref):
        if mx.abs(v).max().item() == 0:  # not on the loss's path (the frozen router bias)
            assert mx.abs(got[k]).max().item() == 0, k
        else:
            assert rel_err(got[k], v) < 1e-4, k
    # negative control: the MTP term's weight matters (a dropped or doubled term would show)
    assert rel_err(grads["other"], ref["other"] * 0.5) > 1e-2
