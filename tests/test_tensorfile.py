"""Safetensors files written in place and read memory-mapped (core/tensorfile.py)."""

import json
import os
import struct

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from core.errors import InfluenceError
from core.tensorfile import TensorFileWriter, map_tensors


def test_written_in_place_reads_back_with_safetensors_and_as_maps(tmp_path):
    """Arrays declared first and filled in pieces read back identically through the safetensors
    library and through the memory maps; the metadata given at close replaces the first."""
    rng = np.random.default_rng(0)
    values = {
        "rows": rng.integers(-127, 128, (7, 5)).astype(np.int8),
        "empty": np.zeros((0, 3), np.float32),
        "scales": rng.random(7).astype(np.float32),
        "ids": rng.integers(0, 1000, (7, 2)).astype(np.int16),
        "sums": rng.random(3),
    }
    path = tmp_path / "x.safetensors"
    with TensorFileWriter(path, {k: (v.shape, v.dtype) for k, v in values.items()}, {"meta": "first"}) as out:
        for lo in range(0, 7, 3):  # batch by batch
            out["rows"][lo : lo + 3] = values["rows"][lo : lo + 3]
        for name in ("scales", "ids", "sums"):
            out[name][...] = values[name]
        out.close({"meta": json.dumps({"final": True})})
    assert not list(tmp_path.glob(".*.tmp"))
    loaded = load_file(path)
    with safe_open(str(path), framework="numpy") as f:
        assert json.loads(f.metadata()["meta"]) == {"final": True}
    mapped, metadata = map_tensors(path)
    assert json.loads(metadata["meta"]) == {"final": True}
    for name, value in values.items():
        np.testing.assert_array_equal(loaded[name], value)
        np.testing.assert_array_equal(mapped[name], value)
        assert mapped[name].dtype == value.dtype
    # A file the safetensors library wrote maps too.
    save_file(values, tmp_path / "y.safetensors")
    np.testing.assert_array_equal(map_tensors(tmp_path / "y.safetensors")[0]["rows"], values["rows"])


def test_an_interrupted_write_leaves_the_previous_file(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": np.arange(3)}, path)
    before = path.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        with TensorFileWriter(path, {"a": ((4,), np.dtype(np.int64))}, {}) as out:
            out["a"][:2] = 1
            raise KeyboardInterrupt
    assert path.read_bytes() == before and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b[:5], "shorter than a header"),
        (lambda b: b[:-9], "truncated"),
        (lambda b: struct.pack("<Q", 10**9) + b[8:], "a header of 1000000000 bytes"),
        (lambda b: b[:8] + b"[" + b[9:], "header"),
        (lambda b: b"", "shorter than a header"),
    ],
)
def test_damaged_files_are_refused_naming_the_file(tmp_path, damage, message):
    path = tmp_path / "x.safetensors"
    save_file({"a": np.arange(6, dtype=np.int64).reshape(2, 3)}, path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(InfluenceError, match=f"the factors {path}.*{message}.*rebuild"):
        map_tensors(path, "the factors", "rebuild them", InfluenceError)
    os.remove(path)
    with pytest.raises(InfluenceError, match="not found"):
        map_tensors(path, "the factors", "rebuild them", InfluenceError)
