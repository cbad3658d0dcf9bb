"""Dense bit packing of low-bit integer codes.

Layout (little-endian bit stream): code ``i`` of width ``b`` occupies bits ``i*b .. i*b+b-1`` of
the stream, least significant bit first, and stream bit ``k`` is bit ``k % 8`` (LSB = 0) of byte
``k // 8``. Unused high bits of the last byte are zero. ``n`` codes take exactly
``ceil(n * b / 8)`` bytes. Example, ``bits=3``, codes ``[5, 3, 7]`` (``101, 011, 111``)::

    stream bits (LSB first): 1 0 1 | 1 1 0 | 1 1 1 | 0 ...
    byte 0 = 0b11_011_101 = 0xDD, byte 1 = 0b0000000_1 = 0x01

Implementation: 8 codes of ``b`` bits are exactly ``b`` bytes, so the codes are processed in
groups of 8 held in one little-endian ``uint64`` (``sum(code_k << k*b)``), whose first ``b``
bytes are the packed group. This is a handful of vectorised numpy operations per call (16M codes
pack in well under a second on one core) and is independent of the host byte order.
"""
from typing import Union

import numpy as np

__all__ = ["pack_bits", "unpack_bits", "packed_nbytes"]

_U64 = np.dtype("<u8")
# Process this many groups of 8 codes per step to bound temporary memory (~8 bytes * 8 per group).
_CHUNK_GROUPS = 1 << 20


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise ValueError(f"bits must be an int in 1..8, got {bits!r} ({type(bits).__name__})")
    bits = int(bits)
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    return bits


def packed_nbytes(count: int, bits: int) -> int:
    """Number of bytes that ``count`` codes of width ``bits`` occupy when packed: ceil(n*b/8)."""
    bits = _check_bits(bits)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    return (int(count) * bits + 7) // 8


def _as_uint8_array(codes) -> np.ndarray:
    """Flatten ``codes`` (numpy array or torch tensor, dtype uint8) to a contiguous 1-D uint8 array."""
    if not isinstance(codes, np.ndarray):
        # torch.Tensor (without importing torch here): anything with .numpy()/.detach().
        if hasattr(codes, "detach") and hasattr(codes, "numpy"):
            t = codes.detach()
            if str(t.dtype) != "torch.uint8":
                raise ValueError(f"pack_bits: codes must have dtype uint8, got {t.dtype}")
            codes = t.cpu().contiguous().numpy()
        else:
            raise ValueError(
                f"pack_bits: codes must be a numpy array or torch tensor of dtype uint8, "
                f"got {type(codes).__name__}"
            )
    if codes.dtype != np.uint8:
        raise ValueError(f"pack_bits: codes must have dtype uint8, got {codes.dtype}")
    return np.ascontiguousarray(codes).reshape(-1)


def pack_bits(codes: Union[np.ndarray, "torch.Tensor"], bits: int) -> bytes:  # noqa: F821
    """Pack integer codes densely at ``bits`` bits each.

    Args:
      codes: uint8 array/tensor of any shape (flattened in C order), values in ``[0, 2**bits-1]``.
      bits: code width, 1..8.

    Returns:
      ``ceil(codes.size * bits / 8)`` bytes in the layout described in the module docstring.

    Raises:
      ValueError: ``bits`` outside 1..8, ``codes`` not uint8, or a code ``>= 2**bits``.
    """
    bits = _check_bits(bits)
    flat = _as_uint8_array(codes)
    n = flat.size
    if n == 0:
        return b""
    if bits < 8:
        mx = int(flat.max())
        if mx >= (1 << bits):
            bad = int(np.argmax(flat >= (1 << bits)))
            raise ValueError(
                f"pack_bits: code {mx} does not fit in {bits} bits (valid range 0..{(1 << bits) - 1}); "
                f"first offending element at flat index {bad}"
            )
    if bits == 8:
        return flat.tobytes()
    out_nbytes = packed_nbytes(n, bits)
    if bits in (1, 2, 4):
        # Byte-aligned widths: numpy's packbits handles the 1-bit case directly; 2 and 4 bits
        # combine 4 resp. 2 codes per byte.
        if bits == 1:
            return np.packbits(flat, bitorder="little").tobytes()
        per = 8 // bits
        pad = (-n) % per
        if pad:
            flat = np.concatenate([flat, np.zeros(pad, np.uint8)])
        g = flat.reshape(-1, per)
        acc = g[:, 0].copy()
        for k in range(1, per):
            acc |= g[:, k] << np.uint8(k * bits)
        return acc.tobytes()[:out_nbytes]

    pieces = []
    n_groups = -(-n // 8)
    for g0 in range(0, n_groups, _CHUNK_GROUPS):
        g1 = min(n_groups, g0 + _CHUNK_GROUPS)
        chunk = flat[g0 * 8 : g1 * 8]
        pad = (-chunk.size) % 8
        if pad:
            chunk = np.concatenate([chunk, np.zeros(pad, np.uint8)])
        g = chunk.reshape(-1, 8)
        acc = g[:, 0].astype(_U64)
        for k in range(1, 8):
            acc |= g[:, k].astype(_U64) << np.uint64(k * bits)
        # Each uint64 (little-endian) holds the group's `bits` bytes in its low bytes.
        pieces.append(acc.view(np.uint8).reshape(-1, 8)[:, :bits].tobytes())
    return b"".join(pieces)[:out_nbytes]


def unpack_bits(data: Union[bytes, bytearray, memoryview], bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`.

    Args:
      data: packed bytes; must hold at least ``ceil(count * bits / 8)`` bytes (extra bytes are
        ignored).
      bits: code width, 1..8.
      count: number of codes to unpack.

    Returns:
      A 1-D ``np.uint8`` array of ``count`` codes (writable, owns its memory).

    Raises:
      ValueError: ``bits`` outside 1..8, negative ``count``, or ``data`` too short.
    """
    bits = _check_bits(bits)
    count = int(count)
    need = packed_nbytes(count, bits)
    buf = np.frombuffer(data, dtype=np.uint8)
    if buf.size < need:
        raise ValueError(
            f"unpack_bits: {count} codes of {bits} bits need {need} bytes, got {buf.size}"
        )
    if count == 0:
        return np.zeros(0, np.uint8)
    buf = buf[:need]
    if bits == 8:
        return buf.copy()
    if bits in (1, 2, 4):
        if bits == 1:
            return np.unpackbits(buf, count=count, bitorder="little")
        per = 8 // bits
        mask = np.uint8((1 << bits) - 1)
        out = np.empty((need, per), np.uint8)
        for k in range(per):
            out[:, k] = (buf >> np.uint8(k * bits)) & mask
        return out.reshape(-1)[:count].copy()

    n_groups = -(-count // 8)
    out = np.empty(n_groups * 8, np.uint8)
    mask = np.uint64((1 << bits) - 1)
    for g0 in range(0, n_groups, _CHUNK_GROUPS):
        g1 = min(n_groups, g0 + _CHUNK_GROUPS)
        lo, hi = g0 * bits, min(g1 * bits, need)
        grp = np.zeros((g1 - g0) * bits, np.uint8)
        grp[: hi - lo] = buf[lo:hi]
        wide = np.zeros((g1 - g0, 8), np.uint8)
        wide[:, :bits] = grp.reshape(-1, bits)
        acc = wide.reshape(-1).view(_U64)
        o = out[g0 * 8 : g1 * 8].reshape(-1, 8)
        for k in range(8):
            o[:, k] = ((acc >> np.uint64(k * bits)) & mask).astype(np.uint8)
    return out[:count] if out.size == count else out[:count].copy()
