"""Reading and writing safetensors files with numpy alone, streaming tensors instead of loading whole files.

Layout (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N, N bytes of JSON
`{"__metadata__": {str: str}, key: {"dtype": "F16", "shape": [..], "data_offsets": [begin, end]}}` (offsets
relative to the end of the header, which may be padded with spaces), then the raw little-endian tensor bytes.

Our own reader because LoRAs are often bfloat16, which numpy (and so safetensors' numpy backend) has no type for:
bf16 is the top half of a float32, so `uint16 << 16` viewed as float32 is exact. Every tensor comes back float32.
The writer writes its header first, so a payload of many large tensors goes to disk one tensor at a time.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from diffkiln.lora.errors import LoraError

_NUMPY = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1"}
_CODES = {np.dtype(v).name: k for k, v in _NUMPY.items()}
MAX_HEADER = 100 << 20  # the reference implementation's own limit


class TensorFile:
    """The tensors of one safetensors file, memory-mapped; `get(key)` returns float32 (bf16/f16/f64 converted)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if not 2 <= n <= min(MAX_HEADER, size - 8):
                    raise ValueError("bad header length")
                header = json.loads(fh.read(n))
            self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
            self._entries = {k: _entry(k, v, size - 8 - n) for k, v in header.items()}
        except FileNotFoundError:
            raise LoraError(f"no such file: {self.path}; check the path") from None
        except (ValueError, KeyError, TypeError, AttributeError, struct.error, UnicodeDecodeError) as e:
            raise LoraError(
                f"{self.path} is not a safetensors file ({e}); convert .pt/.ckpt/.bin files to .safetensors first"
            ) from None
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else np.empty(0)

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def get(self, key: str) -> np.ndarray:
        """The tensor as float32; a NaN or infinity in it is an error (it would poison every folded weight)."""
        dtype, shape, (begin, end) = self._entries[key]
        raw = self._data[begin:end]
        if dtype == "BF16":
            value = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
        else:
            value = raw.view(_NUMPY[dtype]).astype(np.float32).reshape(shape)
        if not np.isfinite(value).all():
            raise LoraError(f"{self.path}: tensor {key} holds NaN/Inf values; the file is damaged")
        return value


def _entry(key: str, info: dict, data_size: int) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
    itemsize = 2 if dtype == "BF16" else np.dtype(_NUMPY.get(dtype, "V1")).itemsize
    if dtype != "BF16" and dtype not in _NUMPY:
        raise ValueError(f"tensor {key} has unsupported dtype {dtype}")
    if not 0 <= begin <= end <= data_size or end - begin != itemsize * int(np.prod(shape, dtype=np.int64)):
        raise ValueError(f"tensor {key} lies outside the file or has the wrong size")
    return dtype, shape, (begin, end)


class TensorWriter:
    """Write a safetensors file tensor by tensor: shapes and dtypes are declared up front, values come later.

    The metadata may hold placeholders that are only known at the end (sha256 hex digests of fixed length): the
    header is written at `open`, and `close(metadata)` rewrites it in place, padded with spaces to the same length.
    """

    def __init__(self, path: Path, specs: list[tuple[str, np.dtype, tuple[int, ...]]], metadata: dict[str, str]):
        self.path, self._offsets, offset = Path(path), {}, 0
        header: dict = {}
        for key, dtype, shape in specs:
            nbytes = np.dtype(dtype).itemsize * int(np.prod(shape, dtype=np.int64))
            header[key] = {
                "dtype": _CODES[np.dtype(dtype).name],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._offsets[key] = (offset, np.dtype(dtype), tuple(shape))
            offset += nbytes
        self._header = header
        first = self._encode(metadata)
        self._size = len(first) + 256  # room for metadata that grows a little (it should not, but be safe)
        self._fh = open(self.path, "wb")  # noqa: SIM115 (stays open across write calls, closed by close/abort)
        self._fh.write(struct.pack("<Q", self._size) + first.ljust(self._size))

    def _encode(self, metadata: dict[str, str]) -> bytes:
        return json.dumps({"__metadata__": metadata, **self._header}, separators=(",", ":")).encode()

    def write(self, key: str, array: np.ndarray) -> None:
        offset, dtype, shape = self._offsets[key]
        if array.shape != shape:
            raise ValueError(f"{key}: shape {array.shape} was declared as {shape}")
        self._fh.seek(8 + self._size + offset)
        self._fh.write(np.ascontiguousarray(array, dtype=dtype.newbyteorder("<")).tobytes())

    def close(self, metadata: dict[str, str]) -> None:
        header = self._encode(metadata)
        if len(header) > self._size:
            raise ValueError("safetensors metadata grew past its reserved space")
        self._fh.seek(8)
        self._fh.write(header.ljust(self._size))
        self._fh.close()

    def abort(self) -> None:
        self._fh.close()
        self.path.unlink(missing_ok=True)
