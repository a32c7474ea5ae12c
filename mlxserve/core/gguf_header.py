"""A fast reader of a GGUF file's header: metadata scalars and tensor shapes, no weights.

The ``gguf`` package's reader materialises every array (a 150k-token vocabulary takes it
seconds per file); listing models needs only a few scalars, so arrays are skipped here. The
format's constants (value types, quantization block sizes) come from the ``gguf`` package.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

_MAGIC = b"GGUF"
_SCALARS: dict[int, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
# Sanity bounds, so a corrupt file fails fast instead of allocating wildly.
_MAX_ITEMS = 50_000_000
_MAX_STRING = 64 * 1024 * 1024


class GGUFFormatError(ValueError):
    pass


@dataclass
class GGUFHeader:
    metadata: dict[str, Any] = field(default_factory=dict)
    n_params: int = 0
    n_bytes: int = 0


class _Reader:
    def __init__(self, f: BinaryIO) -> None:
        self.f = f

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        data = self.f.read(size)
        if len(data) != size:
            raise GGUFFormatError("file ends inside its header")
        return struct.unpack(fmt, data)[0]

    def string(self) -> str:
        n = self.take("<Q")
        if n > _MAX_STRING:
            raise GGUFFormatError("string length out of range")
        data = self.f.read(n)
        if len(data) != n:
            raise GGUFFormatError("file ends inside a string")
        return data.decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        n = self.take("<Q")
        if n > _MAX_STRING:
            raise GGUFFormatError("string length out of range")
        self.f.seek(n, 1)

    def value(self, vtype: int, keep: bool) -> Any:
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            item_type, count = self.take("<I"), self.take("<Q")
            if count > _MAX_ITEMS:
                raise GGUFFormatError("array length out of range")
            if item_type in _SCALARS and not keep:
                self.f.seek(struct.calcsize(_SCALARS[item_type]) * count, 1)
                return None
            if item_type == GGUFValueType.STRING and not keep:
                for _ in range(count):
                    self.skip_string()
                return None
            return [self.value(item_type, keep) for _ in range(count)]
        raise GGUFFormatError(f"unknown value type {vtype}")


def read_header(path: Path, keep_arrays: tuple[str, ...] = ()) -> GGUFHeader:
    """Metadata (arrays skipped unless named in ``keep_arrays``) and tensor totals."""
    with path.open("rb") as f:
        r = _Reader(f)
        if f.read(4) != _MAGIC:
            raise GGUFFormatError("not a GGUF file (bad magic)")
        version = r.take("<I")
        if version not in (2, 3):
            raise GGUFFormatError(f"unsupported GGUF version {version}")
        n_tensors, n_kv = r.take("<Q"), r.take("<Q")
        if n_tensors > _MAX_ITEMS or n_kv > _MAX_ITEMS:
            raise GGUFFormatError("header counts out of range")
        header = GGUFHeader()
        for _ in range(n_kv):
            key = r.string()
            header.metadata[key] = r.value(r.take("<I"), key in keep_arrays)
        for _ in range(n_tensors):
            r.skip_string()
            n_dims = r.take("<I")
            if n_dims > 8:
                raise GGUFFormatError("tensor has too many dimensions")
            n = 1
            for _ in range(n_dims):
                n *= r.take("<Q")
            ggml_type = r.take("<I")
            r.take("<Q")  # offset
            try:
                block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
            except (ValueError, KeyError) as exc:
                raise GGUFFormatError(f"unknown tensor type {ggml_type}") from exc
            header.n_params += n
            header.n_bytes += n // block * size
        return header
