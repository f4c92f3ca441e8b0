"""Reads safetensors files with NumPy alone (no torch, no ``safetensors`` package needed).

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length N,
N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
...}``, then the tensors' bytes, offsets relative to the end of the header. Tensors are
memory-mapped, so a checkpoint is read one tensor at a time and never held whole; bfloat16
and float8 come from ``ml_dtypes`` (a JAX dependency).

:func:`open_checkpoint` reads a Hugging Face model directory: ``model.safetensors``, or the
shards that ``model.safetensors.index.json`` maps names to, or every ``*.safetensors`` file.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

__all__ = ["Checkpoint", "SafetensorsError", "open_checkpoint", "read_header"]

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
# A header larger than this is not a safetensors file (the format caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000


class SafetensorsError(ValueError):
    """A file that is not a well-formed safetensors file; the message names file and tensor."""


def read_header(path: Path) -> tuple[dict[str, tuple[np.dtype, tuple[int, ...], int, int]], int]:
    """Returns ({name: (dtype, shape, begin, end)} with absolute byte offsets, file size).

    Raises:
      SafetensorsError: a truncated file, a header that is not JSON, an unknown dtype, or a
        tensor whose byte range does not match its shape or leaves the file.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SafetensorsError(f"{path}: {size} bytes, too short for a safetensors header")
        (length,) = struct.unpack("<Q", raw)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise SafetensorsError(f"{path}: header length {length} exceeds the file ({size} B)")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SafetensorsError(f"{path}: header is not JSON ({err})") from None
    start = 8 + length
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in DTYPES:
            raise SafetensorsError(f"{path}: {name}: dtype {info.get('dtype')!r} is not supported")
        dtype, shape = DTYPES[info["dtype"]], tuple(int(d) for d in info["shape"])
        begin, end = (int(o) for o in info["data_offsets"])
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != expected or begin < 0 or start + end > size:
            raise SafetensorsError(
                f"{path}: {name}: bytes [{begin}, {end}) do not hold {info['dtype']}{list(shape)} "
                f"({expected} B) inside the {size - start} B of data"
            )
        tensors[name] = (dtype, shape, start + begin, start + end)
    return tensors, size


class Checkpoint(Mapping[str, np.ndarray]):
    """A read-only mapping tensor name -> memory-mapped NumPy array over one or several files."""

    def __init__(self, files: list[Path]) -> None:
        self._where: dict[str, tuple[Path, np.dtype, tuple[int, ...], int]] = {}
        for path in files:
            header, _ = read_header(path)
            for name, (dtype, shape, begin, _end) in header.items():
                if name in self._where:
                    raise SafetensorsError(
                        f"{name} is in both {self._where[name][0].name} and {path.name}"
                    )
                self._where[name] = (path, dtype, shape, begin)
        self.files = files

    def __getitem__(self, name: str) -> np.ndarray:
        path, dtype, shape, begin = self._where[name]
        if not np.prod(shape, dtype=np.int64):
            return np.zeros(shape, dtype)
        return np.memmap(path, dtype=dtype, mode="r", offset=begin, shape=shape)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name][2]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def open_checkpoint(directory: str | Path) -> Checkpoint:
    """The tensors of a Hugging Face model directory (single file, index + shards, or a glob).

    Raises:
      FileNotFoundError: no safetensors file, or a shard the index names is missing.
      SafetensorsError: a malformed file or index, or a tensor the index places in a file that
        does not hold it.
    """
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text("utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise SafetensorsError(f"{index}: no weight_map ({err})") from None
        files = [directory / name for name in sorted(set(weight_map.values()))]
        for path in files:
            if not path.exists():
                raise FileNotFoundError(f"{index} names {path.name}, which is not in {directory}")
        checkpoint = Checkpoint(files)
        for name, file in weight_map.items():
            if name not in checkpoint or checkpoint._where[name][0].name != file:
                raise SafetensorsError(f"{index}: {name} is not in {file}")
        return checkpoint
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors file")
    return Checkpoint(files)
