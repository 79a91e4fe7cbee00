"""mlx-dsv4: DeepSeek-V4 on Apple silicon with MLX.

The public names load lazily, so `import mlx_dsv4` stays cheap (no MLX, mlx-lm or tokenizer import).
"""

import importlib
import sys
import types

__version__ = "0.1.0"

_EXPORTS = {
    "load": "mlx_dsv4.load",
    "generate": "mlx_dsv4.generate",
    "stream_generate": "mlx_dsv4.generate",
    "GenerationResponse": "mlx_dsv4.generate",
    "batch_generate": "mlx_dsv4.batch",
    "save_prompt_cache": "mlx_dsv4.prompt_cache",
    "load_prompt_cache": "mlx_dsv4.prompt_cache",
    "encode_messages": "mlx_dsv4.chat",
    "parse_completion": "mlx_dsv4.chat",
}
__all__ = ["GenerationResponse", "__version__", "batch_generate", "encode_messages", "generate", "load", "load_prompt_cache",
           "parse_completion", "save_prompt_cache", "stream_generate"]


def _export(name: str):
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __getattr__(name: str):
    if name in _EXPORTS:
        return _export(name)
    raise AttributeError(f"module 'mlx_dsv4' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_EXPORTS])


class _Package(types.ModuleType):
    # `load` and `generate` are also submodule names: importing a submodule binds it on the
    # package, which would shadow the function. These properties keep the functions in front and
    # swallow that binding (`from mlx_dsv4.generate import ...` still gets the module).
    load = property(lambda self: _export("load"), lambda self, value: None)
    generate = property(lambda self: _export("generate"), lambda self, value: None)


sys.modules[__name__].__class__ = _Package
