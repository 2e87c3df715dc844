"""safetensors files without torch: a validated header, tensors as zero-copy numpy views of a read-only mmap.

Layout: 8-byte little-endian header length N, N bytes of JSON ({name: {"dtype", "shape", "data_offsets":
[begin, end]}, "__metadata__": {...}}), then the data. bf16/f16 tensors are read through their bit
patterns (uint16 views reinterpreted as ml_dtypes). Used by wan-convert (sources) and the LoRA reader;
errors are the caller's class (``error=``), one line naming the file and the tensor.
"""
from __future__ import annotations

import dataclasses
import json
import math
import mmap
import pathlib
import struct

import numpy as np

from . import format as fmt

_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
           "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
_MAX_HEADER = 100 << 20


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    file: pathlib.Path
    dtype: str  # numpy dtype name
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: pathlib.Path, error: type[Exception] = ValueError, metadata: dict | None = None,
                check=None) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header; every offset is checked against the file size. The
    header's ``__metadata__`` (string values) goes into ``metadata`` when one is given; ``check(header)``
    (the parsed JSON object) may refuse the file before its entries are validated."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise error(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise error(f"{path}: corrupt safetensors header (length {n}, file {size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise error(f"{path}: corrupt safetensors header (not a JSON object)")
    if check is not None:
        check(header)
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, info in header.items():
        if name == "__metadata__":
            if metadata is not None and isinstance(info, dict):
                metadata.update({str(k): str(v) for k, v in info.items()})
            continue
        try:
            dt, shape = str(info["dtype"]), tuple(int(s) for s in info["shape"])
            b, e = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise error(f"{path}: tensor {name}: malformed header entry") from None
        if dt not in _DTYPES:
            raise error(f"{path}: tensor {name}: unsupported dtype {dt}")
        if any(d < 0 for d in shape):
            raise error(f"{path}: tensor {name}: negative dimension in shape {list(shape)}")
        dtype = _DTYPES[dt]
        need = math.prod(shape) * fmt.np_dtype(dtype).itemsize
        if not (0 <= b <= e) or e - b != need:
            raise error(f"{path}: tensor {name}: data offsets {b}..{e} do not fit shape {list(shape)} {dt}")
        if base + e > size:
            raise error(f"{path}: tensor {name}: data ends at byte {base + e}, past the end of the "
                              f"file ({size} bytes); the file is truncated")
        out[name] = TensorInfo(name, path, dtype, shape, base + b, base + e)
    return out


class TensorFile:
    """A read-only mmap of one safetensors file; tensors are numpy views into it."""

    def __init__(self, path: pathlib.Path, error: type[Exception] = ValueError, check=None):
        self.path = path
        self.metadata: dict[str, str] = {}
        self.tensors = read_header(path, error, self.metadata, check)
        with open(path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if path.stat().st_size else None

    def array(self, info: TensorInfo) -> np.ndarray:
        dtype = fmt.np_dtype(info.dtype)
        if info.nbytes == 0:
            return np.zeros(info.shape, dtype)
        # bf16 / f16 through their 16-bit patterns: no conversion at read time.
        raw = np.frombuffer(self._mm, dtype=np.uint8, count=info.nbytes, offset=info.begin)
        return raw.view(dtype).reshape(info.shape)

    def release(self, info: TensorInfo) -> None:
        """Drop a consumed tensor's pages from this process (clean file pages: nothing is lost)."""
        if self._mm is None or info.nbytes < mmap.PAGESIZE:
            return
        start = info.begin - info.begin % mmap.PAGESIZE
        try:
            self._mm.madvise(mmap.MADV_DONTNEED, start, info.end - start)
        except (AttributeError, OSError, ValueError):
            pass

    def close(self):
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a view is still alive (e.g. in an exception's frames): unmapped when it dies
                pass
            self._mm = None


def sha256(path, block: int = 8 << 20) -> str:
    """The hex sha256 of a file, read in blocks (manifests record their sources and LoRAs by it)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()
