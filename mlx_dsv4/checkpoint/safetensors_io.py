"""safetensors without surprises: a validating header parser, a read-only memory-mapped tensor
reader for every dtype the official checkpoints use (F8_E4M3 and F8_E8M0 come back as uint8,
BF16 as uint16 bit patterns), a shard-set reader driven by model.safetensors.index.json, and a
streaming writer that lays out the header first and fills tensors in any order.

Nothing here writes to an input file: the Hugging Face cache may be read-only or shared.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CorruptHeaderError, MissingShardError, MissingTensorError, TruncatedFileError

# safetensors dtype -> numpy storage dtype. Formats numpy lacks are read as raw bits.
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
    "U16": np.dtype("<u2"), "I16": np.dtype("<i2"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "U32": np.dtype("<u4"), "I32": np.dtype("<i4"), "F32": np.dtype("<f4"),
    "U64": np.dtype("<u8"), "I64": np.dtype("<i8"), "F64": np.dtype("<f8"),
    "F8_E4M3": np.dtype(np.uint8), "F8_E5M2": np.dtype(np.uint8), "F8_E8M0": np.dtype(np.uint8),
}
MAX_HEADER = 100 * 1024 * 1024  # the limit the reference safetensors implementation enforces
INDEX_NAME = "model.safetensors.index.json"


def nbytes(dtype: str, shape) -> int:
    return math.prod(shape) * DTYPES[dtype].itemsize


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int
    file: Path

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one file's header -> ({name: TensorInfo}, metadata)."""
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise TruncatedFileError(f"only {size} bytes, shorter than the 8-byte header length", path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n == 0 or n > MAX_HEADER:
            raise CorruptHeaderError(f"header length {n} is not plausible (not a safetensors file?)", path)
        if 8 + n > size:
            raise TruncatedFileError(f"header claims {n} bytes but the file has {size}", path)
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptHeaderError(f"header is not valid JSON ({e})", path) from None
    if not isinstance(header, dict):
        raise CorruptHeaderError("header is not a JSON object", path)
    meta = header.pop("__metadata__", None) or {}
    data_len, base = size - 8 - n, 8 + n
    infos: dict[str, TensorInfo] = {}
    for name, e in header.items():
        if not isinstance(e, dict) or set(e) < {"dtype", "shape", "data_offsets"}:
            raise CorruptHeaderError("entry lacks dtype/shape/data_offsets", path, name)
        dt, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if dt not in DTYPES:
            raise CorruptHeaderError(f"unknown dtype {dt!r}", path, name)
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise CorruptHeaderError(f"invalid shape {shape!r}", path, name)
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)
                and 0 <= offs[0] <= offs[1]):
            raise CorruptHeaderError(f"invalid data_offsets {offs!r}", path, name)
        if offs[1] - offs[0] != nbytes(dt, shape):
            raise CorruptHeaderError(
                f"data_offsets span {offs[1] - offs[0]} bytes but {dt}{shape} needs {nbytes(dt, shape)}", path, name)
        infos[name] = TensorInfo(name, dt, tuple(shape), base + offs[0], base + offs[1], path)
    prev = None
    for t in sorted(infos.values(), key=lambda t: (t.start, t.end)):
        if t.end - base > data_len:
            raise TruncatedFileError(
                f"data ends at byte {t.end} but the file has {size} bytes (incomplete download?)", path, t.name)
        if prev is not None and t.start < prev.end and t.nbytes and prev.nbytes:
            raise CorruptHeaderError(f"data overlaps tensor '{prev.name}'", path, t.name)
        prev = t
    return infos, meta


def read_tensor(info: TensorInfo) -> np.ndarray:
    """A read-only memory map of one tensor (drop it to release the pages)."""
    dt = DTYPES[info.dtype]
    if info.nbytes == 0:
        return np.zeros(info.shape, dt)
    return np.memmap(info.file, dtype=dt, mode="r", offset=info.start, shape=info.shape)


def read_rows(info: TensorInfo, r0: int, r1: int) -> np.ndarray:
    """A read-only memory map of rows [r0, r1) of a tensor (axis 0)."""
    dt = DTYPES[info.dtype]
    row = math.prod(info.shape[1:]) * dt.itemsize
    shape = (r1 - r0, *info.shape[1:])
    if row * (r1 - r0) == 0:
        return np.zeros(shape, dt)
    return np.memmap(info.file, dtype=dt, mode="r", offset=info.start + r0 * row, shape=shape)


def read_chunks(info: TensorInfo, chunk: int = 64 << 20) -> Iterator[tuple[int, np.ndarray]]:
    """(offset, uint8 bytes) pieces of one tensor, read with plain reads: copying a tensor this
    way keeps at most `chunk` bytes resident, unlike a memory map whose pages stay mapped."""
    with open(info.file, "rb") as f:
        f.seek(info.start)
        for off in range(0, info.nbytes, chunk):
            buf = f.read(min(chunk, info.nbytes - off))
            if len(buf) != min(chunk, info.nbytes - off):
                raise TruncatedFileError("file shrank while being read", info.file, info.name)
            yield off, np.frombuffer(buf, np.uint8)


class ShardSet:
    """All tensors of a checkpoint directory: via the index if there is one, else every
    *.safetensors file. Validates that every shard exists and holds what the index says.
    Tensors for which `ignore(name)` is true are dropped (listed in `ignored`), and a shard that
    holds only such tensors may be absent (e.g. never downloaded)."""

    def __init__(self, root: str | Path, ignore: Callable[[str], bool] | None = None):
        self.root = Path(root)
        ignore = ignore or (lambda name: False)
        self.ignored: dict[str, str] = {}
        index = self.root / INDEX_NAME
        if index.exists():
            try:
                wmap = json.loads(index.read_text())["weight_map"]
                assert isinstance(wmap, dict)
            except (json.JSONDecodeError, KeyError, TypeError, AssertionError, UnicodeDecodeError) as e:
                raise CorruptHeaderError(f"not a valid index (need a 'weight_map' object): {e!r}", index) from None
        else:
            files = sorted(p.name for p in self.root.glob("*.safetensors"))
            if not files:
                raise MissingShardError("no model.safetensors.index.json and no *.safetensors files", self.root)
            wmap = None
        if wmap is not None:
            self.ignored = {k: v for k, v in wmap.items() if ignore(k)}
            wmap = {k: v for k, v in wmap.items() if k not in self.ignored}
        self.files = sorted(set(wmap.values())) if wmap is not None else files
        for f in self.files:
            if not (self.root / f).is_file():
                listed = sorted(k for k, v in wmap.items() if v == f)
                raise MissingShardError(
                    f"shard is missing (the index lists {len(listed)} tensors in it; download it again)",
                    self.root / f, listed[0])
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, dict] = {}
        for f in self.files:
            infos, meta = read_header(self.root / f)
            self.metadata[f] = meta
            for name, info in infos.items():
                if ignore(name):
                    self.ignored[name] = f
                    continue
                if name in self.tensors:
                    raise CorruptHeaderError(f"tensor also stored in {self.tensors[name].file.name}", info.file, name)
                self.tensors[name] = info
        if wmap is not None:
            for name, f in wmap.items():
                if name not in self.tensors or self.tensors[name].file.name != f:
                    raise MissingTensorError(f"listed in {INDEX_NAME} but absent from the shard", self.root / f, name)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def read(self, name: str) -> np.ndarray:
        return read_tensor(self.tensors[name])

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def _header(specs, metadata) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The header bytes (8-byte aligned) and each tensor's (offset, size) in the data section."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    off, slots = 0, {}
    for name, dt, shape in specs:
        n = nbytes(dt, shape)
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + n]}
        slots[name] = (off, n)
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8), slots  # keep the data 8-byte aligned


def header_bytes(specs, metadata=None) -> int:
    """Bytes a file of these tensors spends before its data (length prefix + header)."""
    return 8 + len(_header(specs, metadata)[0])


class SafetensorsWriter:
    """Write one safetensors file whose tensors are known up front and whose data arrives in any
    order, possibly in pieces (`write(name, part, offset)`). Data goes to `<path>.partial`;
    `close()` checks that every byte was written, fsyncs and renames into place."""

    def __init__(self, path: str | Path, specs: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        raw, self.slots = _header(specs, metadata)
        self.written = dict.fromkeys(self.slots, 0)
        off = sum(n for _, n in self.slots.values())
        self.base, self.size = 8 + len(raw), 8 + len(raw) + off
        self.fd = os.open(self.partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            self._pwrite(struct.pack("<Q", len(raw)) + raw, 0)
            os.ftruncate(self.fd, self.size)
        except BaseException:
            self.abort()
            raise

    def _pwrite(self, buf, pos: int) -> None:
        view = memoryview(buf).cast("B")
        while view:
            n = os.pwrite(self.fd, view, pos)
            view, pos = view[n:], pos + n

    def write(self, name: str, data: np.ndarray, offset: int = 0) -> None:
        start, n = self.slots[name]
        data = np.ascontiguousarray(data)
        if offset < 0 or offset + data.nbytes > n:
            raise ValueError(f"{self.path.name}: write of {data.nbytes} B at {offset} overruns '{name}' ({n} B)")
        self._pwrite(data, self.base + start + offset)
        self.written[name] += data.nbytes

    def close(self) -> None:
        short = [k for k, (_, n) in self.slots.items() if self.written[k] != n]
        if short:
            self.abort()
            k = short[0]
            raise MissingTensorError(
                f"only {self.written[k]} of {self.slots[k][1]} bytes were produced ({len(short)} tensors incomplete)",
                self.path, k)
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        os.replace(self.partial, self.path)

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.partial.unlink(missing_ok=True)


def index_text(weight_map: dict[str, str], total_size: int) -> str:
    body = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    return json.dumps(body, indent=2) + "\n"


def write_index(root: str | Path, weight_map: dict[str, str], total_size: int) -> None:
    (Path(root) / INDEX_NAME).write_text(index_text(weight_map, total_size))
