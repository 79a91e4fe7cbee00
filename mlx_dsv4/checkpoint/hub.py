"""A local directory or a Hugging Face Hub repo id -> a local checkpoint directory.

For a repo, config.json and the index are fetched first, then only the files a conversion needs:
the config, tokenizer files and the shards that hold at least one tensor we use (Flash-0731's
last shards hold only DSpark drafter tensors and are skipped). The inference/ code, encoding/
scripts and README assets of the official repos are never downloaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import CheckpointNotFoundError
from .official import skip_reason
from .safetensors_io import INDEX_NAME

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SIDE_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", INDEX_NAME]


def resolve_source(path_or_repo: str | Path, revision: str | None = None) -> Path:
    """Local directory as is; otherwise download the needed files of a Hub repo (cached)."""
    p = Path(path_or_repo).expanduser()
    if p.exists():
        if not p.is_dir():
            raise CheckpointNotFoundError("expected a checkpoint directory, found a file", p)
        return p
    if not REPO_ID.match(str(path_or_repo)):
        raise CheckpointNotFoundError("no such directory, and not a Hugging Face repo id (owner/name)", p)
    return download(str(path_or_repo), revision)


def needed_shards(weight_map: dict[str, str], hf_config: dict) -> list[str]:
    return sorted({f for name, f in weight_map.items() if skip_reason(name, hf_config) is None})


def download(repo_id: str, revision: str | None = None) -> Path:
    import huggingface_hub as hub
    from huggingface_hub.errors import EntryNotFoundError

    try:
        cfg = json.loads(Path(hub.hf_hub_download(repo_id, "config.json", revision=revision)).read_text())
        try:
            index = Path(hub.hf_hub_download(repo_id, INDEX_NAME, revision=revision))
            shards = needed_shards(json.loads(index.read_text())["weight_map"], cfg)
        except EntryNotFoundError:
            shards = ["*.safetensors"]  # a single-file checkpoint
        return Path(hub.snapshot_download(repo_id, revision=revision, allow_patterns=SIDE_FILES + shards))
    except CheckpointNotFoundError:
        raise
    except Exception as e:  # offline, unknown repo, gated repo, ...: say which repo and why
        raise CheckpointNotFoundError(f"could not fetch from the Hugging Face Hub: {type(e).__name__}: {e}",
                                      f"hf://{repo_id}") from e
