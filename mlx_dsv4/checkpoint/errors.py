"""Checkpoint errors. Each names the file and the tensor it is about, so a user with a 160 GB
download knows which shard to fetch again instead of re-downloading everything."""

from __future__ import annotations

from pathlib import Path


class CheckpointError(Exception):
    """Base class: `file` and `tensor` (either may be None) locate the problem."""

    def __init__(self, message: str, file: str | Path | None = None, tensor: str | None = None):
        self.file = str(file) if file is not None else None
        self.tensor = tensor
        where = ", ".join(x for x in (f"file {self.file}" if self.file else "",
                                      f"tensor '{tensor}'" if tensor else "") if x)
        super().__init__(f"{where}: {message}" if where else message)


class CheckpointNotFoundError(CheckpointError):
    """The path is neither a checkpoint directory nor a downloadable Hub repo."""


class MissingShardError(CheckpointError):
    """The index names a shard file that does not exist."""


class TruncatedFileError(CheckpointError):
    """A shard is shorter than its header says (an interrupted download)."""


class CorruptHeaderError(CheckpointError):
    """A shard's header is not valid safetensors (bad length, JSON, dtype, offsets)."""


class ShapeMismatchError(CheckpointError):
    """A tensor's shape differs from what the config implies."""


class DtypeMismatchError(CheckpointError):
    """A tensor's dtype differs from what the official layout specifies."""


class UnknownTensorError(CheckpointError):
    """The checkpoint holds a tensor the architecture does not have."""


class MissingTensorError(CheckpointError):
    """The architecture needs a tensor the checkpoint does not have (or the index lists one
    that its shard lacks)."""


class CheckpointConfigError(CheckpointError):
    """config.json is missing, unreadable, or describes an unsupported model."""


class OutputExistsError(CheckpointError):
    """The conversion target already exists and overwriting was not requested."""
