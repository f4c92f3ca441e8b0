"""kvshard.models.safetensors: the NumPy reader against files this test writes by the format."""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest
from _hf_checkpoints import write_safetensors

from kvshard.models.safetensors import SafetensorsError, open_checkpoint


def test_reads_every_dtype_bit_exactly_and_sharded_by_index(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16)
    b = rng.standard_normal((4,)).astype(np.float16)
    c = rng.standard_normal((2, 2, 2)).astype(np.float32)
    write_safetensors(tmp_path / "x-1.safetensors", {"a": a, "b": b})
    write_safetensors(tmp_path / "x-2.safetensors", {"c": c})
    weight_map = {"a": "x-1.safetensors", "b": "x-1.safetensors", "c": "x-2.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ckpt = open_checkpoint(tmp_path)
    assert sorted(ckpt) == ["a", "b", "c"] and len(ckpt.files) == 2
    for name, want in (("a", a), ("b", b), ("c", c)):
        got = ckpt[name]
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes()


def test_an_index_that_lies_is_refused(tmp_path):
    write_safetensors(tmp_path / "x-1.safetensors", {"a": np.zeros(2, np.float32)})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "x-2.safetensors"}}))
    with pytest.raises(FileNotFoundError, match=r"names x-2\.safetensors"):
        open_checkpoint(tmp_path)
    write_safetensors(tmp_path / "x-2.safetensors", {"b": np.zeros(2, np.float32)})
    with pytest.raises(SafetensorsError, match=r"a is not in x-2\.safetensors"):
        open_checkpoint(tmp_path)


def _raw(path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "do not hold"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, b"\0" * 16, "do not hold"),
        ({"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8, "'C64'"),
    ],
)
def test_malformed_files_name_the_tensor(tmp_path, header, data, message):
    _raw(tmp_path / "m.safetensors", header, data)
    with pytest.raises(SafetensorsError, match=message):
        open_checkpoint(tmp_path)


def test_truncated_and_empty_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        open_checkpoint(tmp_path)
    (tmp_path / "m.safetensors").write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(SafetensorsError, match="header length 10000 exceeds"):
        open_checkpoint(tmp_path)
