"""Safetensors files too large to hold in memory twice: written in place, read memory-mapped.

The safetensors layout is an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the raw little-endian data. When every shape is known
before the data is (the influence store knows its positions from the packed corpus before its
pass over it), the file can be laid out first and filled through memory maps, array by array
and batch by batch, so a build never holds the store in memory; the file is written under a
temporary name and renamed into place only when complete (:class:`TensorFileWriter`).
:func:`map_tensors` reads such a file (or any safetensors file) without loading it: each array
is a read-only ``np.memmap`` over its byte range, so a query touches only the pages it reads
and several processes share them through the page cache. The header is checked against the
file's size before anything is mapped, so a truncated or foreign file is refused with the
caller's error naming the file.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from core.errors import ArtifactError, PrismError

# safetensors dtype names of the numpy dtypes the library writes
DTYPE_NAMES = {
    np.dtype(np.bool_): "BOOL",
    np.dtype(np.uint8): "U8",
    np.dtype(np.int8): "I8",
    np.dtype(np.int16): "I16",
    np.dtype(np.int32): "I32",
    np.dtype(np.int64): "I64",
    np.dtype(np.float16): "F16",
    np.dtype(np.float32): "F32",
    np.dtype(np.float64): "F64",
}
NUMPY_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own bound


class TensorFileWriter:
    """A safetensors file laid out from declared shapes and filled through memory maps.

    Usage::

        with TensorFileWriter(path, {"x": ((n, d), np.int8)}, metadata={"meta": "..."}) as out:
            out["x"][lo:hi] = rows       # any order, any number of times
        # on a clean exit the file is flushed and renamed to ``path``; on an exception the
        # temporary file is removed and ``path`` is untouched

    Arrays are zero until written. The declared order is the file's order. The metadata can be
    replaced at :meth:`close` (a build's timings are known only then): the header keeps
    ``reserve`` bytes of padding for it.
    """

    def __init__(
        self,
        path: str | Path,
        specs: dict[str, tuple[tuple[int, ...], np.dtype]],
        metadata: dict[str, str],
        reserve: int = 4096,
    ):
        self.path = Path(path)
        header: dict[str, object] = {"__metadata__": dict(metadata)}
        offset = 0
        layout = []
        for name, (shape, dtype) in specs.items():
            dtype = np.dtype(dtype)
            if dtype not in DTYPE_NAMES:
                raise ValueError(f"{name}: dtype {dtype} has no safetensors name")
            shape = tuple(int(s) for s in shape)
            size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            layout.append((name, shape, dtype, offset))
            offset += size
        self.header = header
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (reserve + (-(len(blob) + reserve) % 8))  # the data starts 8-byte aligned
        self.header_bytes = len(blob)
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(self.tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            f.truncate(8 + len(blob) + offset)
        base = 8 + len(blob)
        self.arrays: dict[str, np.ndarray] = {}
        for name, shape, dtype, start in layout:
            if 0 in shape:
                self.arrays[name] = np.zeros(shape, dtype=dtype)  # nothing on disk to map
            else:
                self.arrays[name] = np.memmap(self.tmp, dtype=dtype, mode="r+", offset=base + start, shape=shape)
        self.size = base + offset
        self.closed = False

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def close(self, metadata: dict[str, str] | None = None) -> Path:
        """Flush every map, write the final ``metadata`` (if given) and rename the file into place."""
        for array in self.arrays.values():
            if isinstance(array, np.memmap):
                array.flush()
        self.arrays = {}
        with open(self.tmp, "rb+") as f:
            if metadata is not None:
                self.header["__metadata__"] = dict(metadata)
                blob = json.dumps(self.header, separators=(",", ":")).encode("utf-8")
                if len(blob) > self.header_bytes:
                    raise ValueError(f"the final metadata needs {len(blob)} header bytes, {self.header_bytes} kept")
                f.seek(8)
                f.write(blob + b" " * (self.header_bytes - len(blob)))
            os.fsync(f.fileno())
        os.chmod(self.tmp, 0o644)
        os.replace(self.tmp, self.path)
        self.closed = True
        return self.path

    def abort(self) -> None:
        """Drop the maps and remove the temporary file."""
        self.arrays = {}
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> TensorFileWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if self.closed:
            return
        if kind is None:
            self.close()
        else:
            self.abort()


def map_tensors(
    path: str | Path,
    what: str = "file",
    fix: str | None = None,
    error: type[PrismError] = ArtifactError,
    writable: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A safetensors file's arrays as read-only memory maps, and its metadata.

    ``writable`` maps them for writing instead: another process fills its share of a file that a
    :class:`TensorFileWriter` laid out (its ``tmp``), which that writer then closes.

    Raises:
        ``error`` naming the file: missing, unreadable, truncated, or a header that is not
        safetensors (bad JSON, unknown dtype, a byte range outside the file or of the wrong size).
    """
    path = Path(path)
    tail = f"; {fix}" if fix else ""

    def refuse(why: str) -> PrismError:
        return error(f"{what} {path} is not a readable safetensors file ({why}){tail}")

    if not path.is_file():
        raise error(f"{what} {path} not found{tail}")
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            text = f.read(length) if 0 <= length <= min(MAX_HEADER_BYTES, file_size - 8) else None
    except OSError as err:
        raise error(f"{what} {path} cannot be read ({err}){tail}") from None
    if length < 0:
        raise refuse(f"{file_size} bytes, shorter than a header")
    if text is None:
        raise refuse(f"a header of {length} bytes in a file of {file_size}")
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, bad UTF-8, deep nesting
        raise refuse(f"header: {err}") from None
    if not isinstance(header, dict):
        raise refuse("the header is not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise refuse("__metadata__ is not a map of strings")
    base = 8 + length
    arrays: dict[str, np.ndarray] = {}
    for name, entry in header.items():
        try:
            dtype = NUMPY_DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            start, stop = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise refuse(f"tensor {name!r}: {err!r}") from None
        if min(shape, default=0) < 0 or stop - start != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise refuse(f"tensor {name!r}: {stop - start} bytes for shape {list(shape)} of {entry['dtype']}")
        if start < 0 or base + stop > file_size:
            raise refuse(f"tensor {name!r} ends at byte {base + stop}, the file has {file_size} (truncated?)")
        if stop == start:
            arrays[name] = np.zeros(shape, dtype=dtype)
        else:
            mode = "r+" if writable else "r"
            arrays[name] = np.memmap(path, dtype=dtype, mode=mode, offset=base + start, shape=shape)
    return arrays, metadata
