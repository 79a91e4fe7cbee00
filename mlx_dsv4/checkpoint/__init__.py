"""Official DeepSeek-V4 checkpoints: read them exactly, convert them to MLX in bounded memory,
load either kind lazily. See convert.convert, load.load_weights and writer_official."""

from .convert import convert
from .errors import (
                     CheckpointConfigError,
                     CheckpointError,
                     CheckpointNotFoundError,
                     CorruptHeaderError,
                     DtypeMismatchError,
                     MissingShardError,
                     MissingTensorError,
                     OutputExistsError,
                     ShapeMismatchError,
                     TruncatedFileError,
                     UnknownTensorError,
)
from .load import load_weights
from .official import expected_tensors
from .policy import CLASSES, FORMATS, PRESETS
from .writer_official import random_official_weights, write_official_checkpoint, write_random_official_checkpoint

__all__ = [
    "convert", "load_weights", "expected_tensors", "random_official_weights", "write_official_checkpoint",
    "write_random_official_checkpoint", "CLASSES", "FORMATS", "PRESETS", "CheckpointError",
    "CheckpointConfigError", "CheckpointNotFoundError", "CorruptHeaderError", "DtypeMismatchError",
    "MissingShardError", "MissingTensorError", "OutputExistsError", "ShapeMismatchError", "TruncatedFileError",
    "UnknownTensorError",
]
