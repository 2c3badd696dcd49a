"""A fast reader of GGUF files: metadata as Python values, tensors as memory-mapped byte views.

``gguf.GGUFReader`` builds a numpy view for every element of every metadata array, which makes
opening a file with a 50k-token vocabulary take seconds (and a 128k one much longer); a worker
opens the file on every start. This reader parses the same layout (GGUF v2/v3, little-endian) with
``struct`` over one memory map, and hands tensors to ``gguf.quants.dequantize`` in the byte layout
``GGUFReader`` uses, so dequantization stays the ``gguf`` package's.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_STRING, _ARRAY = 8, 9
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_ARRAYS = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "?",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}


class GGUFFormatError(ValueError):
    """The bytes are not a well-formed GGUF file (bad magic, version, or truncated metadata)."""


@dataclass(frozen=True)
class Tensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order (rows first), as the Hugging Face weight
    data_offset: int  # from the start of the file
    n_bytes: int
    data: np.ndarray  # uint8, [*rows, bytes per row]: what gguf.quants.dequantize takes


class GGUFFile:
    """``metadata`` (key -> value; arrays as lists) and ``tensors`` of one GGUF file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._pos = 0
        try:
            self.metadata, infos = self._parse()
        except (struct.error, UnicodeDecodeError, IndexError, KeyError, OverflowError) as exc:
            raise GGUFFormatError(f"malformed or truncated metadata ({type(exc).__name__}: {exc})") from None
        alignment = int(self.metadata.get("general.alignment", 32))
        data_start = -(-self._pos // alignment) * alignment
        size = len(self._map)
        raw = np.memmap(self.path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        self.tensors: list[Tensor] = []
        for name, dims, type_id, offset in infos:
            try:
                qtype = GGMLQuantizationType(type_id)
            except ValueError:
                raise GGUFFormatError(f"tensor {name!r} has unknown type id {type_id}") from None
            block, type_size = GGML_QUANT_SIZES[qtype]
            shape = tuple(reversed(dims))
            elements = int(np.prod(shape)) if shape else 1
            if shape and shape[-1] % block:
                raise GGUFFormatError(f"tensor {name!r}: row of {shape[-1]} is not a multiple of {block}")
            n_bytes = elements // block * type_size
            start = data_start + offset
            view = raw[start : start + n_bytes]
            if view.nbytes == n_bytes and shape:
                view = view.reshape(*shape[:-1], shape[-1] // block * type_size)
            self.tensors.append(Tensor(name, qtype, shape, start, n_bytes, view))

    def _take(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self._map, self._pos)[0]
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._take("<Q")
        end = self._pos + n
        if end > len(self._map):
            raise IndexError("string runs past the end of the file")
        text = self._map[self._pos : end].decode("utf-8")
        self._pos = end
        return text

    def _value(self, type_id: int) -> Any:
        if type_id == _STRING:
            return self._string()
        if type_id == _ARRAY:
            item, count = self._take("<I"), self._take("<Q")
            if item == _STRING:
                return [self._string() for _ in range(count)]
            if item in _ARRAYS:
                dtype = np.dtype(_ARRAYS[item])
                end = self._pos + count * dtype.itemsize
                if end > len(self._map):
                    raise IndexError("array runs past the end of the file")
                values = np.frombuffer(self._map, dtype=dtype, count=count, offset=self._pos).tolist()
                self._pos = end
                return values
            return [self._value(item) for _ in range(count)]  # arrays of arrays
        return self._take(_SCALARS[type_id])

    def _parse(self) -> tuple[dict[str, Any], list[tuple[str, list[int], int, int]]]:
        if self._map[:4] != _MAGIC:
            raise GGUFFormatError("not a GGUF file (bad magic)")
        self._pos = 4
        version = self._take("<I")
        if version not in _VERSIONS:
            raise GGUFFormatError(f"GGUF version {version} is not supported (2, 3)")
        tensor_count, kv_count = self._take("<Q"), self._take("<Q")
        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = self._string()
            metadata[key] = self._value(self._take("<I"))
        infos = []
        for _ in range(tensor_count):
            name = self._string()
            dims = [self._take("<Q") for _ in range(self._take("<I"))]
            infos.append((name, dims, self._take("<I"), self._take("<Q")))
        return metadata, infos
