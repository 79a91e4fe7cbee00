"""safetensors_io against the reference safetensors implementation (via torch, which knows the
FP8 and E8M0 dtypes numpy lacks): read what it writes, write what it reads, byte for byte."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ckpt_util import write_raw

from mlx_dsv4.checkpoint.errors import CorruptHeaderError, MissingTensorError, TruncatedFileError
from mlx_dsv4.checkpoint.safetensors_io import SafetensorsWriter, read_chunks, read_header, read_rows, read_tensor

torch = pytest.importorskip("torch")
st = pytest.importorskip("safetensors.torch")

DT = {"F8_E4M3": torch.float8_e4m3fn, "F8_E8M0": torch.float8_e8m0fnu, "BF16": torch.bfloat16,
      "F16": torch.float16, "F32": torch.float32, "F64": torch.float64, "I8": torch.int8, "U8": torch.uint8,
      "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool}


def _bytes(t) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _sample(rng) -> dict:
    out = {}
    for i, (name, dt) in enumerate(DT.items()):
        shape = [(3, 5), (7,), (2, 3, 4), (0, 4)][i % 4]
        raw = rng.integers(0, 256, int(np.prod(shape)) * torch.empty(0, dtype=dt).element_size(), dtype=np.uint8)
        t = torch.from_numpy(raw.copy()).view(dt).reshape(shape) if raw.size else torch.empty(shape, dtype=dt)
        out[f"t.{name}"] = t.bool() if dt == torch.bool else t
    return out


def test_reads_every_dtype_written_by_reference(tmp_path):
    tensors = _sample(np.random.default_rng(0))
    path = tmp_path / "ref.safetensors"
    st.save_file(tensors, str(path))
    infos, _ = read_header(path)
    assert set(infos) == set(tensors)
    for name, t in tensors.items():
        assert infos[name].dtype == name.split(".")[1] and infos[name].shape == tuple(t.shape)
        assert read_tensor(infos[name]).tobytes() == _bytes(t), name
        assert b"".join(c.tobytes() for _, c in read_chunks(infos[name], chunk=7)) == _bytes(t), name
        if t.ndim >= 1 and t.shape[0] >= 2:
            assert read_rows(infos[name], 1, 2).tobytes() == _bytes(t[1:2]), name


def test_writer_output_loads_in_reference(tmp_path):
    tensors = _sample(np.random.default_rng(1))
    path = tmp_path / "ours.safetensors"
    specs = [(n, n.split(".")[1], tuple(t.shape)) for n, t in tensors.items()]
    w = SafetensorsWriter(path, specs, {"format": "mlx"})
    for n, t in reversed(list(tensors.items())):  # any order, and in pieces
        data = np.frombuffer(_bytes(t), np.uint8)
        half = len(data) // 2
        w.write(n, data[half:], offset=half)
        w.write(n, data[:half])
    w.close()
    assert not (tmp_path / "ours.safetensors.partial").exists()
    back = st.load_file(str(path))
    for n, t in tensors.items():
        assert back[n].dtype == t.dtype and _bytes(back[n]) == _bytes(t), n
    with open(path, "rb") as f:  # tensor data starts 8-byte aligned
        assert (8 + int.from_bytes(f.read(8), "little")) % 8 == 0


def test_writer_refuses_incomplete_output(tmp_path):
    path = tmp_path / "x.safetensors"
    w = SafetensorsWriter(path, [("a", "F32", (4,)), ("b", "U8", (3,))])
    w.write("a", np.zeros(4, np.float32))
    with pytest.raises(MissingTensorError, match="'b'"):
        w.close()
    assert list(tmp_path.iterdir()) == []
    w = SafetensorsWriter(path, [("a", "F32", (4,))])
    with pytest.raises(ValueError, match="overruns"):
        w.write("a", np.zeros(5, np.float32))
    w.abort()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("breakage, error, where", [
    (lambda p, d: p.write_bytes(d[:5]), TruncatedFileError, None),
    (lambda p, d: p.write_bytes(d[:-3]), TruncatedFileError, "b"),
    (lambda p, d: p.write_bytes((10**12).to_bytes(8, "little") + d[8:]), CorruptHeaderError, None),
    (lambda p, d: p.write_bytes(d[:8] + b"x" + d[9:]), CorruptHeaderError, None),
])
def test_header_validation(tmp_path, breakage, error, where):
    path = tmp_path / "x.safetensors"
    write_raw(path, {"a": ("F32", [2], b"\0" * 8), "b": ("U8", [4], b"\1" * 4)})
    read_header(path)  # the intact file is fine
    breakage(path, path.read_bytes())
    with pytest.raises(error) as e:
        read_header(path)
    assert e.value.file == str(path) and e.value.tensor == where and "x.safetensors" in str(e.value)


@pytest.mark.parametrize("entry, msg", [
    ({"dtype": "F7", "shape": [1], "data_offsets": [0, 1]}, "unknown dtype"),
    ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, "invalid shape"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}, "needs 8"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}, "invalid data_offsets"),
])
def test_bad_entries_name_the_tensor(tmp_path, entry, msg):
    raw = json.dumps({"w": entry}).encode()
    path = tmp_path / "y.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 16)
    with pytest.raises(CorruptHeaderError, match=msg) as e:
        read_header(path)
    assert e.value.tensor == "w"


def test_overlapping_tensors_rejected(tmp_path):
    raw = json.dumps({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                      "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}}).encode()
    path = tmp_path / "z.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 6)
    with pytest.raises(CorruptHeaderError, match="overlaps"):
        read_header(path)
