"""Bit packing (k2quant.export.bitpack): layout, round trips, errors, speed."""
import time

import numpy as np
import pytest
import torch

from k2quant.export.bitpack import pack_bits, packed_nbytes, unpack_bits


def _reference_pack(codes: np.ndarray, bits: int) -> bytes:
    """Bit-by-bit reference of the documented layout (code i at stream bits i*b.., LSB first)."""
    out = bytearray((codes.size * bits + 7) // 8)
    for i, c in enumerate(codes.reshape(-1).tolist()):
        for j in range(bits):
            if (c >> j) & 1:
                k = i * bits + j
                out[k // 8] |= 1 << (k % 8)
    return bytes(out)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 63, 65, 1001])
def test_round_trip_every_width_and_length(bits, n):
    rng = np.random.default_rng(1000 * bits + n)
    codes = rng.integers(0, 2 ** bits, size=n, dtype=np.uint8)
    data = pack_bits(codes, bits)
    assert isinstance(data, bytes)
    assert len(data) == (n * bits + 7) // 8 == packed_nbytes(n, bits)
    assert data == _reference_pack(codes, bits)
    back = unpack_bits(data, bits, n)
    assert back.dtype == np.uint8 and back.shape == (n,)
    np.testing.assert_array_equal(back, codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_extreme_values_and_unused_bits_zero(bits):
    codes = np.full(13, 2 ** bits - 1, np.uint8)
    data = pack_bits(codes, bits)
    total_bits = 13 * bits
    if total_bits % 8:
        # the unused high bits of the last byte are zero
        assert data[-1] >> (total_bits % 8) == 0
    np.testing.assert_array_equal(unpack_bits(data, bits, 13), codes)
    assert pack_bits(np.zeros(13, np.uint8), bits) == bytes(len(data))


def test_known_layout_hand_example():
    # 3 bits: 5=101, 3=011, 7=111 -> stream LSB first 1,0,1, 1,1,0, 1,1,1
    # byte0 bits 0..7 = 1,0,1,1,1,0,1,1 -> 0b11011101 = 0xDD; byte1 = 0b1 = 0x01
    assert pack_bits(np.array([5, 3, 7], np.uint8), 3) == bytes([0xDD, 0x01])
    # 1 bit: first code is the LSB of byte 0
    assert pack_bits(np.array([1, 0, 0, 0, 0, 0, 0, 0, 1], np.uint8), 1) == bytes([0x01, 0x01])
    # 4 bits: low nibble first
    assert pack_bits(np.array([0x1, 0xA, 0xF], np.uint8), 4) == bytes([0xA1, 0x0F])
    # 2 bits
    assert pack_bits(np.array([3, 0, 1, 2], np.uint8), 2) == bytes([0b10_01_00_11])
    # 5 bits: 31, 1 -> bits 11111 10000 -> byte0 = 0b00111111 = 0x3F, byte1 = 0b00 = 0x00
    assert pack_bits(np.array([31, 1], np.uint8), 5) == bytes([0x3F, 0x00])
    # 8 bits: identity
    assert pack_bits(np.array([0, 255, 7], np.uint8), 8) == bytes([0, 255, 7])
    np.testing.assert_array_equal(unpack_bits(bytes([0xDD, 0x01]), 3, 3), [5, 3, 7])


def test_accepts_torch_tensor_any_shape():
    codes = torch.randint(0, 64, (5, 7, 3), dtype=torch.uint8)
    data = pack_bits(codes, 6)
    assert len(data) == (105 * 6 + 7) // 8
    np.testing.assert_array_equal(unpack_bits(data, 6, 105), codes.reshape(-1).numpy())
    # non-contiguous input is flattened in C order of its logical shape
    t = codes.transpose(0, 2)
    np.testing.assert_array_equal(unpack_bits(pack_bits(t, 6), 6, 105), t.reshape(-1).numpy())


def test_unpack_ignores_extra_bytes():
    codes = np.array([1, 2, 3], np.uint8)
    data = pack_bits(codes, 7) + b"\xff\xff"
    np.testing.assert_array_equal(unpack_bits(data, 7, 3), codes)


@pytest.mark.parametrize("bits", [1, 3, 4, 7])
def test_code_too_large_raises(bits):
    codes = np.zeros(10, np.uint8)
    codes[4] = 2 ** bits
    with pytest.raises(ValueError, match=f"does not fit in {bits} bits.*index 4"):
        pack_bits(codes, bits)


@pytest.mark.parametrize("bits", [0, 9, -1, 2.0, True, "4", None])
def test_bad_bits_raises(bits):
    with pytest.raises(ValueError, match="bits must be"):
        pack_bits(np.zeros(4, np.uint8), bits)
    with pytest.raises(ValueError, match="bits must be"):
        unpack_bits(b"\x00" * 4, bits, 4)


def test_wrong_dtype_and_short_data_raise():
    with pytest.raises(ValueError, match="dtype uint8"):
        pack_bits(np.zeros(4, np.int64), 4)
    with pytest.raises(ValueError, match="dtype uint8"):
        pack_bits(torch.zeros(4, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="numpy array or torch tensor"):
        pack_bits([1, 2, 3], 4)
    with pytest.raises(ValueError, match="need 3 bytes, got 2"):
        unpack_bits(b"\x00\x00", 3, 7)
    with pytest.raises(ValueError, match="count must be >= 0"):
        unpack_bits(b"", 3, -1)


@pytest.mark.parametrize("bits", [3, 4, 5, 7])
def test_fast_for_16m_codes(bits):
    n = 16 * 1024 * 1024
    codes = np.random.default_rng(0).integers(0, 2 ** bits, size=n, dtype=np.uint8)
    t0 = time.perf_counter()
    data = pack_bits(codes, bits)
    back = unpack_bits(data, bits, n)
    elapsed = time.perf_counter() - t0
    assert len(data) == n * bits // 8
    assert np.array_equal(back, codes)
    # typically ~0.05-0.1 s; generous bound for a loaded shared CI machine
    assert elapsed < 3.0, f"pack+unpack of 16M {bits}-bit codes took {elapsed:.2f}s"
