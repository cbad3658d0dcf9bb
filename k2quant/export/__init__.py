"""Packed low-bit model export (pure torch + numpy).

- :mod:`k2quant.export.bitpack`: dense bit packing of uint8 codes at 1..8 bits.
- :mod:`k2quant.export.format`: the versioned, checksummed packed file
  (:func:`save_packed` / :func:`load_packed`).
- :mod:`k2quant.export.size`: per-tensor/per-layer size tables and compression ratio
  (``k2quant size``).
"""
from k2quant.export.bitpack import pack_bits, packed_nbytes, unpack_bits
from k2quant.export.format import (
    FORMAT_VERSION,
    MAGIC,
    PackedFormatError,
    is_packed_file,
    load_packed,
    read_header,
    read_tensors,
    save_packed,
)
from k2quant.export.size import (
    SizeReport,
    SizeRow,
    format_report,
    model_params,
    model_size_info,
    size_table,
    theoretical_payload_bytes,
)

__all__ = [
    "pack_bits", "unpack_bits", "packed_nbytes",
    "FORMAT_VERSION", "MAGIC", "PackedFormatError", "is_packed_file",
    "save_packed", "load_packed", "read_header", "read_tensors",
    "SizeReport", "SizeRow", "size_table", "theoretical_payload_bytes", "format_report",
    "model_params", "model_size_info",
]
