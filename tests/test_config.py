"""Official configs map onto ModelArgs; bad ones fail with the field named."""

import json
import warnings

import pytest

from mlx_dsv4.config import ConfigError, from_hf_config, load_config
from mlx_dsv4.tiny import tiny_hf_config


def _official(data_dir, name):
    return json.loads((data_dir / "configs" / f"{name}.config.json").read_text())


def test_flash(data_dir):
    a = from_hf_config(_official(data_dir, "DeepSeek-V4-Flash"))
    assert (a.dim, a.n_layers, a.n_heads, a.q_lora_rank, a.o_groups, a.index_topk) == (4096, 43, 64, 1024, 8, 512)
    r = a.compress_ratios
    assert r[:2] == (0, 0) and r[43] == 0 and len(r) == 44
    assert sum(x == 4 for x in r) == 21 and sum(x == 128 for x in r) == 20
    assert (a.rope_factor, a.original_seq_len, a.compress_rope_theta, a.route_scale) == (16, 65536, 160000, 1.5)


def test_pro(data_dir):
    a = from_hf_config(_official(data_dir, "DeepSeek-V4-Pro"))
    assert (a.dim, a.n_layers, a.n_heads, a.n_routed_experts, a.index_topk, a.route_scale) == (7168, 61, 128, 384, 1024, 2.5)
    assert 0 not in a.compress_ratios[:61] and a.compress_ratios[61] == 0


def test_flash_0731_dspark_is_recognised_and_skipped(data_dir):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        a = from_hf_config(_official(data_dir, "DeepSeek-V4-Flash-0731"))
    assert len(a.compress_ratios) == 43 and a.n_mtp_layers == 0 and a.notes and "DSpark" in a.notes[0]
    assert any("DSpark" in str(x.message) for x in w)


@pytest.mark.parametrize("change, field", [
    ({"model_type": "deepseek_v41"}, "model_type"),
    ({"hidden_size": "4096"}, "hidden_size"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"compress_ratios": [0, 0, 4]}, "compress_ratios"),
    ({"compress_ratios": [0, 0, 4, 128, 4, 0, 0]}, "compress_ratios"),
    ({"compress_ratios": [0, 0, 8, 128, 4, 0]}, "compress_ratios[2]"),
    ({"o_groups": 3}, "o_groups"),
    ({"qk_rope_head_dim": 15}, "qk_rope_head_dim"),
    ({"num_key_value_heads": 2}, "num_key_value_heads"),
    ({"num_experts_per_tok": 99}, "num_experts_per_tok"),
    ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling.type"),
    ({"expert_dtype": "int4"}, "expert_dtype"),
])
def test_bad_config_names_the_field(change, field):
    cfg = tiny_hf_config("flash")
    cfg.update(change)
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        from_hf_config(cfg)


def test_missing_field_and_bad_file(tmp_path):
    cfg = tiny_hf_config("flash")
    del cfg["index_topk"]
    with pytest.raises(ConfigError, match="index_topk"):
        from_hf_config(cfg)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(tmp_path / "nowhere")


def test_dspark_checkpoint_builds_without_the_drafter():
    from mlx.utils import tree_flatten

    from mlx_dsv4.model import Model

    cfg = tiny_hf_config("flash", compress_ratios=[0, 0, 4, 128, 4, 0, 0, 0])
    cfg.update(dspark_block_size=5, dspark_target_layer_ids=[2, 3, 4])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = from_hf_config(cfg)
    names = [n for n, _ in tree_flatten(Model(a).parameters())]
    assert a.n_mtp_layers == 0 and not any(n.startswith("mtp.") for n in names)
