"""openpi's msgpack-numpy wire format, decoded without trusting the sender.

Format (openpi_client/msgpack_numpy.py): a numpy array is the map ``{b"__ndarray__": True,
b"data": <raw bytes>, b"dtype": <dtype.str>, b"shape": [...]}``, a numpy scalar is
``{b"__npgeneric__": True, b"data": <item>, b"dtype": <dtype.str>}``; everything else is plain msgpack.

Decoding here never unpickles and never evaluates anything: the dtype string must match a short
whitelist (bool, ints, floats, unicode strings; no object, void/structured, complex, datetime), the
shape must be a list of non-negative ints whose product times the itemsize equals ``len(data)``, and
:class:`Limits` caps the array size, the number of dimensions, strings and container sizes (msgpack's
own length caps, so a hostile length prefix fails before any allocation). The whole message size is
capped by the websocket server (``max_size``).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

# Little-endian or byte-order-free numeric types and unicode strings, as numpy's dtype.str writes them.
_DTYPE_RE = re.compile(r"^(\|b1|\|u1|\|i1|<[uif][248]|<U\d{1,6})$")


class WireError(ValueError):
    """A request that is not a well-formed, allowed msgpack-numpy message; the text says why."""


@dataclass(frozen=True)
class Limits:
    max_array_bytes: int = 64 << 20   # one array; a 2048 x 2048 x 3 uint8 frame is 12 MiB
    max_ndim: int = 4
    max_str_chars: int = 4096         # prompts and other strings
    max_items: int = 256              # entries of one map / list


def _array(obj: dict, limits: Limits) -> np.ndarray:
    dtype_str, shape, data = obj.get(b"dtype"), obj.get(b"shape"), obj.get(b"data")
    if not isinstance(dtype_str, str) or not _DTYPE_RE.match(dtype_str):
        raise WireError(f"array dtype {dtype_str!r} is not allowed (allowed: bool, int/uint 8-64 bit, "
                        "float 16-64 bit little-endian, unicode strings; object, structured and complex "
                        "arrays are refused)")
    if not isinstance(data, bytes):
        raise WireError(f"array data must be bytes, got {type(data).__name__}")
    if (not isinstance(shape, (list, tuple)) or len(shape) > limits.max_ndim
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
        raise WireError(f"array shape {shape!r} must be a list of at most {limits.max_ndim} "
                        "non-negative ints")
    dtype = np.dtype(dtype_str)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > limits.max_array_bytes:
        raise WireError(f"array of shape {list(shape)} {dtype} is {nbytes} bytes, over the server's "
                        f"limit of {limits.max_array_bytes} bytes per array")
    if nbytes != len(data):
        raise WireError(f"array of shape {list(shape)} {dtype} needs {nbytes} bytes of data, got {len(data)}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _scalar(obj: dict) -> Any:
    dtype_str, value = obj.get(b"dtype"), obj.get(b"data")
    if not isinstance(dtype_str, str) or not _DTYPE_RE.match(dtype_str):
        raise WireError(f"scalar dtype {dtype_str!r} is not allowed")
    if not isinstance(value, (bool, int, float, str)):
        raise WireError(f"scalar data must be a bool, int, float or str, got {type(value).__name__}")
    try:
        return np.dtype(dtype_str).type(value)
    except (ValueError, OverflowError, TypeError) as e:
        raise WireError(f"scalar {value!r} does not fit dtype {dtype_str}: {e}") from None


def unpackb(data: bytes, limits: Limits = Limits()) -> Any:
    """Decode one request; raises :class:`WireError` with a reason on anything malformed or refused."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError("requests must be binary msgpack frames (got a text frame)")

    def hook(obj: dict) -> Any:
        if b"__ndarray__" in obj:
            return _array(obj, limits)
        if b"__npgeneric__" in obj:
            return _scalar(obj)
        return obj

    try:
        return msgpack.unpackb(bytes(data), object_hook=hook, raw=False, strict_map_key=True,
                               max_str_len=limits.max_str_chars * 4, max_bin_len=limits.max_array_bytes,
                               max_array_len=limits.max_items, max_map_len=limits.max_items,
                               max_ext_len=0)
    except WireError:
        raise
    except ValueError as e:
        if "exceeds max_" in str(e):  # msgpack's own length caps (checked before allocating)
            raise WireError(f"over the server's limit: {e} (per array {limits.max_array_bytes} bytes, "
                            f"{limits.max_items} entries per map or list)") from None
        raise WireError(f"not a valid msgpack message: {type(e).__name__}: {e}") from None
    except (TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise WireError(f"not a valid msgpack message: {type(e).__name__}: {e}") from None


def _pack_default(obj: Any) -> Any:
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in "VOc":
        raise TypeError(f"refusing to send dtype {obj.dtype}")
    if isinstance(obj, np.ndarray):
        obj = np.ascontiguousarray(obj)
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot send {type(obj).__name__}")


def packb(obj: Any) -> bytes:
    """Encode a response or the metadata exactly as openpi_client.msgpack_numpy.packb would."""
    return msgpack.packb(obj, default=_pack_default, use_bin_type=True)
