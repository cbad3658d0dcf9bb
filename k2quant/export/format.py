"""The packed low-bit model file (``*.k2q``): versioned, checksummed, written atomically.

Layout (all integers little-endian)::

    offset 0   magic      7 bytes  b"K2QPACK"
    offset 7   version    u16      FORMAT_VERSION
    offset 9   hlen       u64      length of the (compressed) header in bytes
    offset 17  header     hlen     zlib-compressed compact UTF-8 JSON, see below
               hcrc       u32      zlib.crc32 of bytes [0, 17 + hlen)  (magic+version+hlen+header)
               payload    the tensor blobs back to back, no padding, in table order

The file is exactly ``17 + hlen + 4 + header["p"]`` bytes. The header (JSON, compressed with
zlib so that the per-layer plan and tensor table stay small next to the payload) is::

    {"v": "<k2quant version that wrote it>",
     "spec": model.model_spec() or null,          # to rebuild the architecture
     "plan": the quantization plan as JSON or null,
     "p": payload size in bytes,
     "t": [tensor entry, ...]}                     # one per state_dict entry, in state_dict order

with one short-keyed entry per tensor (no per-element metadata)::

    {"n": name, "k": kind, "d": dtype, "s": shape, "o": offset in payload, "z": nbytes,
     "c": crc32 of the blob, "b": bits (kind "p" only), "a": target name (kind "a" only),
     "f": 1 if the tensor is constant and its blob holds a single element (kinds "r"/"m")}

Kinds:
  ``p`` packed: a ``<w>_codes`` buffer (uint8 codes) bit-packed at ``b`` bits
         (:mod:`k2quant.export.bitpack`), ``z = ceil(numel * b / 8)``;
  ``r`` raw: any other tensor, its bytes in its own dtype (float32 stays float32);
  ``m`` raw quantization metadata (``<w>_scale``, ``<w>_zero_point``, ``<w>_codebook`` and the
         state of quantizer sub-modules): stored like ``r`` but not part of the float model, so
         the size table does not count it towards the fp32 reference;
  ``a`` alias: the same tensor as entry ``a`` (tied weights), no bytes stored.

:func:`save_packed` converts a *copy* of a model that still has un-frozen quantized modules
(the caller's model is left untouched), so it accepts both a QAT model and a converted one.
:func:`load_packed` rebuilds the model (from the stored spec, or into a model you pass),
re-applies the plan, converts, and loads every tensor with strict checking; the result (eval
mode) gives the same outputs, bit for bit, as the fake-quant model it was saved from.

Reading never unpickles anything and checks before it allocates: :func:`read_header` limits
the decompressed header (:data:`MAX_HEADER_JSON_BYTES`), validates every table entry (types,
known dtype, back-to-back offsets inside the payload, byte counts that match shape, dtype and
bits, :data:`MAX_ELEMENTS` in all, constant tensors no larger than the stored ones) and
checks the model spec against the table (the parameter count the spec implies,
:func:`k2quant.models.spec_num_parameters`, must fit in the table's elements), so a small file
cannot make a reader allocate much more than its own size. A file whose name ends in ``.k2q``
is always read as a packed file (:func:`is_packed_file`): a damaged one is an error, never a
torch checkpoint.
"""
import copy
import json
import logging
import os
import struct
import sys
import zlib
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from k2quant.export.bitpack import pack_bits, packed_nbytes, unpack_bits
from k2quant.utils.io import PathLike, atomic_open

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "PackedFormatError",
    "PackedHeader",
    "save_packed",
    "load_packed",
    "read_header",
    "read_tensors",
    "is_packed_file",
    "verify_checksums",
    "MAX_ELEMENTS",
    "MAX_HEADER_JSON_BYTES",
]

logger = logging.getLogger(__name__)

MAGIC = b"K2QPACK"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<7sHQ")  # magic, version, header length
_CRC = struct.Struct("<I")
_KINDS = ("p", "r", "m", "a")
# Refuse absurd header lengths before allocating (a corrupt length field).
_MAX_HEADER = 1 << 31
#: Largest decompressed header JSON (a kaldi_7q model's header is a few KB).
MAX_HEADER_JSON_BYTES = 64 << 20
#: Most tensor elements one file may describe (all tensors together; 2^31 float32 = 8 GiB).
MAX_ELEMENTS = 1 << 31
#: Most table entries one file may have.
_MAX_TENSORS = 1 << 20
#: Elements that constant (one stored element) tensors may add beyond those stored in full.
_CONSTANT_SLACK = 1 << 20
#: The file-name suffix of packed files.
SUFFIX = ".k2q"


class PackedFormatError(ValueError):
    """A packed file is not a k2quant file, is of an unsupported version, truncated, corrupt,
    or does not match the model it is loaded into. The message names the file."""


# --------------------------------------------------------------------------------------------
# dtype helpers
# --------------------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype_from_name(name: str, path: PathLike) -> torch.dtype:
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise PackedFormatError(
            f"{path}: unknown tensor dtype {name!r} in the header (written by a newer torch?)"
        )
    return dt


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw bytes of ``t`` (any dtype) in C order, host byte order (little-endian)."""
    t = t.detach().cpu().contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _tensor_from_bytes(blob, dtype: torch.dtype, shape: List[int]) -> torch.Tensor:
    """Inverse of :func:`_tensor_bytes`: a new tensor of ``dtype`` and ``shape``."""
    n = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    u8 = torch.from_numpy(np.frombuffer(blob, dtype=np.uint8).copy())
    return u8.view(dtype).reshape(shape)


# --------------------------------------------------------------------------------------------
# Quantized modules and plans (k2quant.nn / k2quant.plan), imported lazily
# --------------------------------------------------------------------------------------------


def _quant_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    from k2quant.nn import QuantModule

    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantModule)]


def _is_frozen(m: nn.Module) -> bool:
    """True if ``m`` (a QuantModule) holds integer codes, i.e. ``convert``/``freeze`` ran."""
    frozen = getattr(m, "frozen", None)
    if isinstance(frozen, bool):
        return frozen
    try:
        names = m.quantized_tensors()
    except Exception:  # not frozen yet: some implementations refuse before freeze()
        return False
    if not names:
        return False
    bufs = dict(m.named_buffers(recurse=False))
    return all(n in bufs for n in names)


def _packed_names(model: nn.Module) -> Dict[str, int]:
    """Fully qualified ``<module>.<w>_codes`` state_dict names of a converted model -> bits."""
    out: Dict[str, int] = {}
    for mname, m in _quant_modules(model):
        prefix = f"{mname}." if mname else ""
        for local, bits in m.quantized_tensors().items():
            out[prefix + local] = int(bits)
    return out


def _metadata_names(model: nn.Module, packed: Dict[str, int]) -> set:
    """state_dict names that exist only because of quantization (not in the float model):
    ``<w>_scale`` / ``<w>_zero_point`` / ``<w>_codebook`` next to a packed ``<w>_codes``, and
    everything owned by a quantizer sub-module (``k2quant.quant.Quantizer``)."""
    from k2quant.quant import Quantizer

    meta = set()
    sd_names = set(model.state_dict().keys())
    for name in packed:
        base = name[: -len("_codes")] if name.endswith("_codes") else name
        for suffix in ("_scale", "_zero_point", "_codebook"):
            if base + suffix in sd_names:
                meta.add(base + suffix)
    for qname, q in model.named_modules():
        if isinstance(q, Quantizer):
            prefix = f"{qname}." if qname else ""
            meta.update(prefix + k for k in q.state_dict().keys())
    return meta


def _plan_to_json(plan: Any) -> Any:
    """A JSON-able object for ``plan`` (a ``k2quant.plan.Plan``), or None."""
    if plan is None:
        return None
    if hasattr(plan, "to_dict"):
        return plan.to_dict()
    if hasattr(plan, "to_json"):
        obj = plan.to_json()
        return json.loads(obj) if isinstance(obj, str) else obj
    raise TypeError(f"cannot serialise the model's plan of type {type(plan).__name__}")


def _plan_from_json(obj: Any):
    from k2quant.plan import Plan

    if hasattr(Plan, "from_dict"):
        return Plan.from_dict(obj)
    if hasattr(Plan, "from_json"):
        return Plan.from_json(json.dumps(obj))
    raise TypeError("k2quant.plan.Plan has neither from_dict nor from_json")  # pragma: no cover


def _model_spec(model: nn.Module) -> Optional[dict]:
    fn = getattr(model, "model_spec", None)
    if fn is None:
        return None
    spec = fn()
    try:
        json.dumps(spec)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"save_packed: model.model_spec() must return a JSON-able dict "
            f"{{'arch': str, 'config': dict}}; got {spec!r:.200} ({e})"
        ) from e
    return spec


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _converted(model: nn.Module) -> nn.Module:
    """``model`` if all its quantized modules are frozen, else a converted deep copy."""
    qmods = _quant_modules(model)
    unfrozen = [n for n, m in qmods if not _is_frozen(m)]
    if not unfrozen:
        return model
    from k2quant.plan import convert

    logger.info(
        "save_packed: %d quantized module(s) not converted yet (e.g. %r); converting a copy",
        len(unfrozen), unfrozen[0],
    )
    try:
        clone = copy.deepcopy(model)
    except Exception as e:  # pragma: no cover - exotic modules
        raise TypeError(
            f"save_packed: the model has un-converted quantized modules ({unfrozen[:3]}) and "
            f"cannot be deep-copied to convert it ({e}); call k2quant.plan.convert(model) first"
        ) from e
    clone.eval()
    convert(clone)
    return clone


def _build_entries(model: nn.Module) -> Tuple[List[dict], List[bytes]]:
    """Header tensor table entries (without offsets) and the blob of each entry."""
    has_quant = bool(_quant_modules(model))
    packed = _packed_names(model) if has_quant else {}
    meta = _metadata_names(model, packed) if has_quant else set()
    sd = model.state_dict(keep_vars=False)
    missing = sorted(set(packed) - set(sd))
    if missing:
        raise ValueError(
            f"save_packed: quantized_tensors() names {missing} are not in the model's state_dict"
        )
    entries: List[dict] = []
    blobs: List[bytes] = []
    seen: Dict[Tuple, str] = {}  # storage identity -> first name (tied weights)
    for name, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"save_packed: state_dict entry {name!r} is not a tensor ({type(t)})")
        shape = list(t.shape)
        if name in packed:
            bits = packed[name]
            if t.dtype != torch.uint8:
                raise ValueError(
                    f"save_packed: {name} must be uint8 codes, got dtype {t.dtype}"
                )
            try:
                blob = pack_bits(t.detach().cpu().numpy(), bits)
            except ValueError as err:
                raise ValueError(f"save_packed: cannot pack {name} at {bits} bits: {err}") from err
            ent = {"n": name, "k": "p", "d": "uint8", "s": shape, "b": bits}
        else:
            key = None
            if t.numel() > 0:
                key = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
                if key in seen:
                    entries.append({"n": name, "k": "a", "a": seen[key]})
                    blobs.append(b"")
                    continue
            blob = _tensor_bytes(t)
            ent = {"n": name, "k": "m" if name in meta else "r", "d": _dtype_name(t.dtype),
                   "s": shape}
            if t.numel() > 1:
                rows = np.frombuffer(blob, np.uint8).reshape(t.numel(), -1)
                if (rows == rows[0]).all():  # constant (e.g. symmetric zero points): one element
                    blob = rows[0].tobytes()
                    ent["f"] = 1
            if key is not None:
                seen[key] = name
        ent["z"] = len(blob)
        ent["c"] = zlib.crc32(blob) & 0xFFFFFFFF
        entries.append(ent)
        blobs.append(blob)
    return entries, blobs


def _write_chunks(f, chunks: Iterable[bytes]) -> None:
    """Write ``chunks`` to the open file ``f`` (a separate function so tests can inject faults)."""
    for c in chunks:
        f.write(c)


def save_packed(model: nn.Module, path: PathLike,
                extra: Optional[Mapping[str, Any]] = None) -> Dict[str, int]:
    """Write ``model`` as a packed low-bit file at ``path`` (atomically).

    Every ``<w>_codes`` buffer of a converted quantized module (``QuantModule.quantized_tensors()``)
    is bit-packed at its width; every other state_dict tensor is stored raw in its own dtype.
    The model spec (``model.model_spec()`` if defined) and the plan (``model.k2quant_plan``) are
    stored in the header so that :func:`load_packed` can rebuild the model.

    Args:
      model: a float, quantized (QAT) or converted model. If some quantized modules are not
        converted yet, a deep copy is converted (in eval mode) and saved; ``model`` itself is
        not modified.
      path: destination; written through a temporary file and an atomic rename, so an existing
        file is either fully replaced or untouched.
      extra: optional JSON-able metadata stored in the header (``PackedHeader.extra``), e.g.
        the feature normalisation the model expects (``{"utt_cmn": true}``) or the parameter
        count of the fp32 model it was compressed from (``"fp32_params"``).

    Returns:
      ``{"file_bytes": ..., "header_bytes": ..., "payload_bytes": ...}``.
    """
    if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
        raise NotImplementedError("save_packed: only little-endian hosts are supported")
    if os.path.isdir(path):
        raise IsADirectoryError(f"save_packed: {path} is a directory; give a file name")
    conv = _converted(model)
    entries, blobs = _build_entries(conv)
    offset = 0
    for e in entries:
        if e["k"] != "a":
            e["o"] = offset
            offset += e["z"]
    plan = getattr(conv, "k2quant_plan", None)
    if plan is None and any(e["k"] == "p" for e in entries):
        logger.warning(
            "save_packed: the model has quantized modules but no k2quant_plan (it was not "
            "quantized with quantize_); load_packed will need model=<a converted model>"
        )
    from k2quant import __version__

    header = {
        "v": __version__,
        "spec": _model_spec(conv),
        "plan": _plan_to_json(plan),
        "p": offset,
        "t": entries,
    }
    if extra:
        try:
            json.dumps(dict(extra))
        except (TypeError, ValueError) as e:
            raise ValueError(f"save_packed: extra metadata must be JSON-able ({e})") from None
        header["x"] = dict(extra)
    hbytes = zlib.compress(
        json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("utf-8"), 9
    )
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(hbytes))
    hcrc = _CRC.pack(zlib.crc32(hbytes, zlib.crc32(prefix)) & 0xFFFFFFFF)
    with atomic_open(path, "wb") as f:
        _write_chunks(f, [prefix, hbytes, hcrc])
        _write_chunks(f, (b for b in blobs if b))
    total = _PREFIX.size + len(hbytes) + _CRC.size + offset
    return {"file_bytes": total, "header_bytes": total - offset, "payload_bytes": offset}


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


class PackedHeader:
    """The parsed header of a packed file.

    Attributes:
      path: the file; version: format version; k2quant_version: writer's k2quant version;
      spec: model spec dict or None; plan: plan JSON or None; extra: the ``extra`` metadata
      given to :func:`save_packed` (``{}`` if none); tensors: list of entry dicts
      (see the module docstring); payload_offset: byte offset of the payload in the file;
      payload_bytes: payload size; file_bytes: expected total file size.
    """

    def __init__(self, path: PathLike, version: int, header: dict, payload_offset: int):
        self.path = str(path)
        self.version = version
        self.k2quant_version = header.get("v")
        self.spec = header.get("spec")
        self.plan = header.get("plan")
        self.extra: Dict[str, Any] = dict(header.get("x") or {})
        self.tensors: List[dict] = header["t"]
        self.payload_offset = payload_offset
        self.payload_bytes = int(header["p"])
        self.file_bytes = payload_offset + self.payload_bytes

    def get_plan(self):
        """The stored plan as a :class:`k2quant.plan.Plan` (None if the file has none)."""
        return None if self.plan is None else _plan_from_json(self.plan)

    def __repr__(self) -> str:
        return (f"PackedHeader({self.path!r}, version={self.version}, "
                f"tensors={len(self.tensors)}, payload_bytes={self.payload_bytes})")


def is_packed_file(path: PathLike) -> bool:
    """True if ``path`` is to be read as a packed file: its name ends in ``.k2q``, or it is a
    file that starts with the k2quant packed magic.

    Readers that accept both packed files and torch checkpoints branch on this; a ``.k2q``
    whose magic is damaged thus gets :class:`PackedFormatError` ("bad magic") from
    :func:`read_header` instead of being handed to ``torch.load``.
    """
    if str(path).lower().endswith(SUFFIX):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def _parse_prefix(path: PathLike, f) -> Tuple[int, bytes, int]:
    """Check magic/version/header crc; return (version, header bytes, payload offset)."""
    size = os.fstat(f.fileno()).st_size
    head = f.read(_PREFIX.size)
    if len(head) < len(MAGIC) or head[: len(MAGIC)] != MAGIC:
        raise PackedFormatError(
            f"{path}: not a k2quant packed file (bad magic: expected {MAGIC!r} at offset 0, "
            f"found {head[:len(MAGIC)]!r}). Torch checkpoints are read with torch.load; "
            f"'k2quant size' accepts both."
        )
    if len(head) < _PREFIX.size:
        raise PackedFormatError(
            f"{path}: truncated file: expected at least {_PREFIX.size} bytes, found {size}"
        )
    _, version, hlen = _PREFIX.unpack(head)
    if version > FORMAT_VERSION:
        raise PackedFormatError(
            f"{path}: written by format version {version}; this k2quant reads version "
            f"{FORMAT_VERSION}; upgrade k2quant"
        )
    if version < 1:
        raise PackedFormatError(f"{path}: invalid format version {version} (expected 1..{FORMAT_VERSION})")
    need = _PREFIX.size + hlen + _CRC.size
    if hlen > _MAX_HEADER or need > size:
        raise PackedFormatError(
            f"{path}: truncated file: expected at least {need} bytes (header of {hlen} bytes), "
            f"found {size}"
        )
    hbytes = f.read(hlen)
    (crc,) = _CRC.unpack(f.read(_CRC.size))
    if zlib.crc32(hbytes, zlib.crc32(head)) & 0xFFFFFFFF != crc:
        raise PackedFormatError(f"{path}: header checksum mismatch: the file is corrupt")
    return version, hbytes, need


def read_header(path: PathLike) -> PackedHeader:
    """Read and validate the header of a packed file (the payload is not read).

    Raises:
      PackedFormatError: bad magic, unsupported version, truncated file (the size on disk is
        compared with the size the header announces), or corrupt header.
    """
    with open(path, "rb") as f:
        version, hbytes, poff = _parse_prefix(path, f)
        size = os.fstat(f.fileno()).st_size
    try:
        dec = zlib.decompressobj()
        text = dec.decompress(hbytes, MAX_HEADER_JSON_BYTES)
        if dec.unconsumed_tail:
            raise ValueError(f"the header expands to more than {MAX_HEADER_JSON_BYTES} bytes")
        header = json.loads(text.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError(f"expected a JSON object, got {type(header).__name__}")
        payload = _nonneg_int(header.get("p"), "'p' (payload size)")
        if not isinstance(header.get("t"), list):
            raise ValueError("'t' (the tensor table) must be a list")
        for key in ("spec", "plan", "x"):
            if header.get(key) is not None and not isinstance(header[key], dict):
                raise ValueError(f"{key!r} must be an object or null, got "
                                 f"{type(header[key]).__name__}")
        float_elements = _check_table(header["t"], payload)
    except (ValueError, KeyError, TypeError, zlib.error, UnicodeDecodeError) as e:
        raise PackedFormatError(f"{path}: malformed header ({e})") from e
    h = PackedHeader(path, version, header, poff)
    if size < h.file_bytes:
        raise PackedFormatError(
            f"{path}: truncated file: expected {h.file_bytes} bytes, found {size}"
        )
    if size > h.file_bytes:
        raise PackedFormatError(
            f"{path}: unexpected trailing data: expected {h.file_bytes} bytes, found {size}"
        )
    _check_spec(h, float_elements)
    return h


def _nonneg_int(v: Any, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {v!r:.60}")
    return v


def _check_table(table: List[Any], payload_bytes: int) -> int:
    """Validate the tensor table (see the module docstring) before anything is read or
    allocated; return the number of elements of the float model's tensors (kinds p and r)."""
    if len(table) > _MAX_TENSORS:
        raise ValueError(f"{len(table)} tensor entries (at most {_MAX_TENSORS})")
    names = set()
    offset = 0
    stored = constant = float_elements = 0
    for i, e in enumerate(table):
        if not isinstance(e, dict):
            raise ValueError(f"tensor entry {i} is not an object")
        name = e.get("n")
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor entry {i} has no name")
        if name in names:
            raise ValueError(f"tensor {name!r} appears twice")
        kind = e.get("k")
        if kind not in _KINDS:
            raise ValueError(f"tensor {name!r}: unknown tensor kind {kind!r}")
        if kind == "a":
            if e.get("a") not in names:
                raise ValueError(f"alias {name!r} -> unknown or later tensor {e.get('a')!r}")
            names.add(name)
            continue
        names.add(name)
        shape = e.get("s")
        if not isinstance(shape, list) or len(shape) > 8:
            raise ValueError(f"tensor {name!r}: shape must be a list of at most 8 sizes")
        numel = 1
        for d in shape:
            numel *= _nonneg_int(d, f"tensor {name!r}: shape entry")
            if numel > MAX_ELEMENTS:
                raise ValueError(f"tensor {name!r}: shape {shape} has more than {MAX_ELEMENTS} "
                                 f"elements")
        o = _nonneg_int(e.get("o"), f"tensor {name!r}: offset 'o'")
        z = _nonneg_int(e.get("z"), f"tensor {name!r}: byte count 'z'")
        c = _nonneg_int(e.get("c"), f"tensor {name!r}: checksum 'c'")
        if c > 0xFFFFFFFF:
            raise ValueError(f"tensor {name!r}: checksum {c} is not a crc32")
        if o != offset or o + z > payload_bytes:
            raise ValueError(f"tensor {name!r}: bytes {o}..{o + z} are not the next "
                             f"{z} bytes of the {payload_bytes}-byte payload (expected offset "
                             f"{offset})")
        offset += z
        if kind == "p":
            bits = e.get("b")
            if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
                raise ValueError(f"tensor {name!r}: packed bits must be 1..8, got {bits!r}")
            if e.get("d") != "uint8":
                raise ValueError(f"tensor {name!r}: packed codes must be uint8, got {e.get('d')!r}")
            need = packed_nbytes(numel, bits)
            stored += numel
        else:
            dt = getattr(torch, str(e.get("d")), None)
            if not isinstance(dt, torch.dtype):
                raise ValueError(f"tensor {name!r}: unknown tensor dtype {e.get('d')!r}")
            if e.get("f"):
                need = _element_size(dt) if numel else 0
                constant += numel
            else:
                need = numel * _element_size(dt)
                stored += numel
        if z != need:
            raise ValueError(f"tensor {name!r}: shape {shape} of {e.get('d')}"
                             f"{' at %s bits' % e.get('b') if kind == 'p' else ''}"
                             f"{' (constant)' if e.get('f') else ''} needs {need} bytes, the "
                             f"table says {z}")
        if kind != "m":
            float_elements += numel
    if offset != payload_bytes:
        raise ValueError(f"the tensors hold {offset} bytes, 'p' says {payload_bytes}")
    if stored + constant > MAX_ELEMENTS:
        raise ValueError(f"the tensors have {stored + constant} elements (at most {MAX_ELEMENTS})")
    if constant > max(stored, _CONSTANT_SLACK):
        raise ValueError(f"constant tensors expand to {constant} elements, more than the "
                         f"{stored} stored ones")
    return float_elements


def _check_spec(h: "PackedHeader", float_elements: int) -> None:
    """The header's model spec must be valid and imply no more parameters than the table
    holds (checked from the spec alone, before any model is built)."""
    if h.spec is None:
        return
    from k2quant.models import spec_num_parameters

    try:
        n = spec_num_parameters(h.spec)
    except (ValueError, TypeError) as e:
        raise PackedFormatError(f"{h.path}: invalid model spec in the header ({e})") from e
    if n is not None and n > float_elements:
        raise PackedFormatError(
            f"{h.path}: the header's model spec ({h.spec.get('arch')!r}, {n:,} parameters) does "
            f"not match its tensor table ({float_elements:,} elements): the file is corrupt or "
            f"was altered"
        )


def verify_checksums(path: PathLike) -> PackedHeader:
    """Read the payload of a packed file in order and check every tensor's crc32 (without
    unpacking anything). Returns the header.

    Raises:
      PackedFormatError: as :func:`read_header`, or ``checksum mismatch`` naming the tensor.
    """
    h = read_header(path)
    with open(path, "rb") as f:
        f.seek(h.payload_offset)
        for e in h.tensors:
            if e["k"] == "a":
                continue
            blob = f.read(e["z"])
            if len(blob) != e["z"]:
                raise PackedFormatError(f"{path}: truncated file (tensor {e['n']!r})")
            if zlib.crc32(blob) & 0xFFFFFFFF != e["c"]:
                o = h.payload_offset + e["o"]
                raise PackedFormatError(
                    f"{path}: checksum mismatch in tensor {e['n']!r} (bytes {o}.."
                    f"{o + e['z'] - 1}): the file is corrupt"
                )
    return h


def read_tensors(path: PathLike) -> Tuple[PackedHeader, Dict[str, torch.Tensor], Dict[str, int]]:
    """Read every tensor of a packed file, verifying checksums.

    Returns:
      ``(header, state_dict, packed_bits)``: ``state_dict`` maps each name to a tensor (packed
      codes unpacked to uint8 of their stored shape; raw tensors in their dtype; aliases share
      the target tensor), ``packed_bits`` maps each packed name to its width.

    Raises:
      PackedFormatError: as :func:`read_header`, and ``checksum mismatch`` naming the first
      corrupt tensor.
    """
    if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
        raise NotImplementedError("read_tensors: only little-endian hosts are supported")
    h = read_header(path)
    with open(path, "rb") as f:
        f.seek(h.payload_offset)
        payload = f.read(h.payload_bytes)
    if len(payload) != h.payload_bytes:  # file shrank after read_header
        raise PackedFormatError(
            f"{path}: truncated file: expected {h.file_bytes} bytes, found "
            f"{h.payload_offset + len(payload)}"
        )
    mv = memoryview(payload)
    out: Dict[str, torch.Tensor] = {}
    bits_of: Dict[str, int] = {}
    for e in h.tensors:
        name, kind = e["n"], e["k"]
        if kind == "a":
            if e["a"] not in out:
                raise PackedFormatError(f"{path}: alias {name!r} -> unknown tensor {e['a']!r}")
            out[name] = out[e["a"]]
            continue
        o, z = int(e["o"]), int(e["z"])
        if o < 0 or o + z > h.payload_bytes:
            raise PackedFormatError(f"{path}: tensor {name!r} lies outside the payload")
        blob = mv[o : o + z]
        if zlib.crc32(blob) & 0xFFFFFFFF != int(e["c"]):
            raise PackedFormatError(
                f"{path}: checksum mismatch in tensor {name!r} (bytes {h.payload_offset + o}.."
                f"{h.payload_offset + o + z - 1}): the file is corrupt"
            )
        shape = [int(s) for s in e["s"]]
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if kind == "p":
            bits = int(e["b"])
            if z != packed_nbytes(count, bits):
                raise PackedFormatError(
                    f"{path}: tensor {name!r}: {count} codes at {bits} bits need "
                    f"{packed_nbytes(count, bits)} bytes, the header says {z}"
                )
            codes = unpack_bits(blob, bits, count)
            out[name] = torch.from_numpy(codes).reshape(shape)
            bits_of[name] = bits
        else:
            dtype = _dtype_from_name(e["d"], path)
            fill = bool(e.get("f"))
            need = (1 if fill else count) * _element_size(dtype)
            if z != need:
                raise PackedFormatError(
                    f"{path}: tensor {name!r}: shape {shape} of {e['d']}"
                    f"{' (constant)' if fill else ''} needs {need} bytes, the header says {z}"
                )
            if fill:
                out[name] = _tensor_from_bytes(blob, dtype, [1]).expand(shape).clone()
            else:
                out[name] = _tensor_from_bytes(blob, dtype, shape)
    return h, out, bits_of


def _prepare_model(h: PackedHeader, model: Optional[nn.Module]) -> nn.Module:
    """Build (if needed), quantize with the stored plan (if needed) and convert the model."""
    path = h.path
    if model is None:
        if h.spec is None:
            raise PackedFormatError(
                f"{path}: the file has no model spec (the saved model had no model_spec()); "
                f"pass model=... (a model of the same architecture) to load_packed"
            )
        from k2quant.models import build_model

        model = build_model(h.spec)
    has_packed = any(e["k"] == "p" for e in h.tensors)
    qmods = _quant_modules(model) if has_packed or h.plan is not None else []
    if not qmods and h.plan is not None:
        from k2quant.plan import quantize_

        try:
            model = quantize_(model, _plan_from_json(h.plan))
        except ValueError as e:
            raise PackedFormatError(
                f"{path}: cannot apply the stored plan to the model (spec/plan mismatch): {e}"
            ) from e
        qmods = _quant_modules(model)
    elif not qmods and has_packed:
        raise PackedFormatError(
            f"{path}: the file holds packed quantized tensors but no plan; pass "
            f"model=... already quantized with the plan it was saved with"
        )
    if any(not _is_frozen(m) for _, m in qmods):
        from k2quant.plan import convert

        model.eval()
        convert(model)
    return model


def load_packed(path: PathLike, model: Optional[nn.Module] = None) -> nn.Module:
    """Load a packed file written by :func:`save_packed`.

    Args:
      path: the packed file.
      model: None to rebuild the model from the stored spec (``k2quant.models.build_model``);
        otherwise a model of the same architecture, float (the stored plan is applied with
        ``quantize_``), quantized (it is converted) or converted. It is modified in place.

    Returns:
      The converted model in eval mode with all tensors loaded (strictly): its outputs equal,
      bit for bit, those of the fake-quant model that was saved (in eval mode).

    Raises:
      PackedFormatError (a ValueError): not a k2quant file, newer format version, truncated,
        checksum mismatch (naming the tensor), no spec and no ``model``, or a model whose
        tensors do not match the file (missing/unexpected names, shapes, dtypes or bit widths).
    """
    h, tensors, bits_of = read_tensors(path)
    model = _prepare_model(h, model)
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing in the file: {missing}")
    if unexpected:
        problems.append(f"unexpected in the file (not in the model): {unexpected}")
    for k, t in tensors.items():
        if k in expected:
            ref = expected[k]
            if tuple(ref.shape) != tuple(t.shape):
                problems.append(f"{k}: file shape {tuple(t.shape)} != model shape {tuple(ref.shape)}")
            elif ref.dtype != t.dtype:
                problems.append(f"{k}: file dtype {t.dtype} != model dtype {ref.dtype}")
    model_bits = _packed_names(model) if _quant_modules(model) else {}
    for k in sorted(set(model_bits) | set(bits_of)):
        if k in expected and k in tensors and model_bits.get(k) != bits_of.get(k):
            problems.append(
                f"{k}: file has {bits_of.get(k) or 'raw'} bits, model expects "
                f"{model_bits.get(k) or 'raw'}"
            )
    if problems:
        raise PackedFormatError(
            f"{path}: the model does not match the file (spec/plan mismatch): " + "; ".join(problems)
        )
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise PackedFormatError(f"{path}: the model does not match the file: {e}") from e
    return model.eval()
