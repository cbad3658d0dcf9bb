"""Model size accounting for packed files (and plain torch checkpoints).

For a packed file (:mod:`k2quant.export.format`) every tensor gives a row
``(name, params, bits, bytes)``:

- packed ``<w>_codes``: ``params = numel``, ``bits = b``, ``bytes = ceil(numel * b / 8)``;
- raw tensors: ``bits`` = the dtype's width, ``bytes = numel * element_size`` (one element
  for a constant tensor, e.g. the zero points of a symmetric quantizer, which the file stores
  once);
- aliases (tied weights): ``bytes = 0``.

Totals:

- ``payload_bytes`` (theoretical payload) = sum of ``numel_i * b_i / 8`` over packed tensors
  (not rounded up) + the bytes of every raw tensor;
- ``file_bytes`` = the measured size on disk (``os.path.getsize``);
- ``fp32_bytes`` = what the float model would take: 4 bytes per parameter, quantized weights
  counted as float, quantization metadata (scales, zero points, codebooks, quantizer state)
  not counted, non-float buffers at their own size;
- ``ratio`` = ``fp32_bytes / file_bytes`` (compression vs fp32, from the real file size).

A torch checkpoint (a state_dict or ``{"model": state_dict}``) is reported as stored
(fp32 weights: ratio 1.0x); for it ``ratio = fp32_bytes / payload_bytes``, since the file also
holds the pickle container and possibly optimizer state.
"""
import os
from dataclasses import dataclass, field
from typing import Dict, List

import torch

from k2quant.export.format import is_packed_file, verify_checksums, _dtype_from_name, _element_size
from k2quant.utils.io import PathLike, UnsafeFileError, load_torch

__all__ = ["SizeRow", "SizeReport", "size_table", "theoretical_payload_bytes", "format_report",
           "model_params", "model_size_info"]


def model_params(model: torch.nn.Module) -> int:
    """Weights and biases of ``model`` (quantizer state and BatchNorm buffers not counted)."""
    return int(sum(p.numel() for name, p in model.named_parameters()
                   if "_quantizers." not in name))


def model_size_info(model: torch.nn.Module, path: PathLike) -> Dict[str, object]:
    """``{"params", "packed", "bytes"}`` of a model loaded from ``path``: ``bytes`` is the
    packed file's size on disk, or 4 bytes per parameter for a float checkpoint (the fp32
    reference size; a training checkpoint on disk also holds optimizer state)."""
    params = model_params(model)
    packed = is_packed_file(path)
    return {"params": params, "packed": packed,
            "bytes": os.path.getsize(path) if packed else 4 * params}


@dataclass
class SizeRow:
    """One tensor (or, after :meth:`SizeReport.by_layer`, one layer).

    ``params``: number of elements; ``bits``: width per element (packed width, or the dtype's
    width for raw tensors; a string such as ``"4,32"`` for a layer mixing widths);
    ``bytes``: stored bytes (float: the exact theoretical ``params * bits / 8`` for packed
    codes); ``fp32_bytes``: bytes in the float reference (0 for quantization metadata);
    ``kind``: ``packed``, ``raw``, ``meta`` or ``alias``.
    """

    name: str
    params: int
    bits: object
    bytes: float
    fp32_bytes: int
    kind: str


@dataclass
class SizeReport:
    """Rows and totals; see the module docstring for the definitions."""

    path: str
    file_kind: str  # "packed" or "checkpoint"
    rows: List[SizeRow]
    payload_bytes: float
    file_bytes: int
    fp32_bytes: int
    header_bytes: int = 0
    extra: Dict[str, object] = field(default_factory=dict)

    @property
    def params(self) -> int:
        """Parameters of the float model (quantization metadata excluded)."""
        return sum(r.params for r in self.rows if r.kind in ("packed", "raw"))

    @property
    def ratio(self) -> float:
        """Compression vs fp32 (``fp32_bytes / file_bytes``; checkpoints: ``/ payload_bytes``)."""
        denom = self.file_bytes if self.file_kind == "packed" else self.payload_bytes
        return self.fp32_bytes / denom if denom else float("nan")

    def by_layer(self) -> List[SizeRow]:
        """Rows grouped by module (the name up to the last ``.``). ``params`` counts the
        float-model parameters of the layer, ``bytes`` everything stored for it (incl.
        metadata), ``bits`` the distinct widths of its non-metadata tensors."""
        def module_of(name: str) -> str:
            return name.rsplit(".", 1)[0] if "." in name else name

        # Layers are the modules holding packed/raw tensors; metadata such as
        # "<layer>.weight_quantizers.weight.initialized" goes to the closest enclosing layer.
        layers = {module_of(r.name) for r in self.rows if r.kind in ("packed", "raw")}
        groups: Dict[str, List[SizeRow]] = {}
        for r in self.rows:
            layer = module_of(r.name)
            if r.kind == "meta" and layer not in layers:
                parts = r.name.split(".")
                for k in range(len(parts) - 1, 0, -1):
                    if ".".join(parts[:k]) in layers:
                        layer = ".".join(parts[:k])
                        break
            groups.setdefault(layer, []).append(r)
        out = []
        for layer, rs in groups.items():
            main = [r for r in rs if r.kind in ("packed", "raw")] or rs
            widths = []
            for r in sorted(main, key=lambda r: (r.kind != "packed", str(r.bits))):
                if str(r.bits) not in widths:
                    widths.append(str(r.bits))
            out.append(SizeRow(
                name=layer,
                params=sum(r.params for r in rs if r.kind in ("packed", "raw")),
                bits=",".join(widths),
                bytes=sum(r.bytes for r in rs),
                fp32_bytes=sum(r.fp32_bytes for r in rs),
                kind="packed" if any(r.kind == "packed" for r in rs) else "raw",
            ))
        return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _packed_report(path: PathLike) -> SizeReport:
    h = verify_checksums(path)
    rows = []
    for e in h.tensors:
        name, kind = e["n"], e["k"]
        if kind == "a":
            rows.append(SizeRow(name, 0, "alias", 0, 0, "alias"))
            continue
        n = _numel(e["s"])
        if kind == "p":
            b = int(e["b"])
            rows.append(SizeRow(name, n, b, n * b / 8, 4 * n, "packed"))
        else:
            dt = _dtype_from_name(e["d"], path)
            es = _element_size(dt)
            fp32 = 0 if kind == "m" else (4 * n if dt.is_floating_point else n * es)
            stored = es if e.get("f") else n * es  # constant tensors store one element
            rows.append(SizeRow(name, n, 8 * es, stored, fp32, "meta" if kind == "m" else "raw"))
    return SizeReport(
        path=str(path),
        file_kind="packed",
        rows=rows,
        payload_bytes=sum(r.bytes for r in rows),
        file_bytes=os.path.getsize(path),
        fp32_bytes=sum(r.fp32_bytes for r in rows),
        header_bytes=h.payload_offset,
        extra={"format_version": h.version, "k2quant_version": h.k2quant_version,
               "arch": (h.spec or {}).get("arch") if isinstance(h.spec, dict) else None},
    )


def _checkpoint_state_dict(obj, path) -> Dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                return obj[key]
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    keys = list(obj.keys())[:10] if isinstance(obj, dict) else None
    raise ValueError(
        f"{path}: expected a torch checkpoint holding a state_dict (or {{'model': state_dict}}), "
        f"got {type(obj).__name__}" + (f" with keys {keys}" if keys is not None else "")
    )


def _checkpoint_report(path: PathLike, allow_pickle: bool) -> SizeReport:
    try:
        obj = load_torch(path, "checkpoint", allow_pickle=allow_pickle)
    except UnsafeFileError:
        raise
    except ValueError as e:
        cause = e.__cause__ if e.__cause__ is not None else e
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]
        raise ValueError(f"{path}: neither a k2quant packed file nor a readable torch "
                         f"checkpoint ({first})") from e
    sd = _checkpoint_state_dict(obj, path)
    rows = []
    seen = {}
    for name, t in sd.items():
        if not isinstance(t, torch.Tensor):
            continue
        key = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride())) if t.numel() else None
        if key is not None and key in seen:
            rows.append(SizeRow(name, 0, "alias", 0, 0, "alias"))
            continue
        if key is not None:
            seen[key] = name
        n, es = t.numel(), t.element_size()
        fp32 = 4 * n if t.is_floating_point() else n * es
        rows.append(SizeRow(name, n, 8 * es, n * es, fp32, "raw"))
    return SizeReport(
        path=str(path),
        file_kind="checkpoint",
        rows=rows,
        payload_bytes=sum(r.bytes for r in rows),
        file_bytes=os.path.getsize(path),
        fp32_bytes=sum(r.fp32_bytes for r in rows),
    )


def size_table(path: PathLike, allow_pickle: bool = False) -> SizeReport:
    """Size report of a packed file or a torch checkpoint at ``path``.

    Args:
      path: a packed file (:func:`k2quant.export.save_packed`) or a torch checkpoint holding a
        state_dict / ``{"model": state_dict}``.
      allow_pickle: unpickle checkpoints that hold Python objects beyond tensors, numbers,
        strings, lists and dicts (:func:`k2quant.utils.io.load_torch`; only for trusted files).

    A packed file's checksums are verified (a corrupt file raises ``PackedFormatError``).

    Returns:
      A :class:`SizeReport`: ``.rows`` (one :class:`SizeRow` per tensor, ``.by_layer()`` per
      layer) and the totals ``payload_bytes``, ``file_bytes``, ``fp32_bytes``, ``ratio``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"size_table: no such file: {path}")
    if is_packed_file(path):
        return _packed_report(path)
    return _checkpoint_report(path, allow_pickle)


def theoretical_payload_bytes(path: PathLike) -> float:
    """sum(numel_i * bits_i / 8) over packed tensors + bytes of raw tensors (see module doc)."""
    return size_table(path).payload_bytes


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"  # pragma: no cover


def format_report(report: SizeReport, per_tensor: bool = False) -> str:
    """The table printed by ``k2quant size``: one line per layer (or tensor) and the totals."""
    rows = report.rows if per_tensor else report.by_layer()
    w = max([len("name")] + [len(r.name) for r in rows])
    lines = [f"{'name':<{w}}  {'params':>12}  {'bits':>8}  {'bytes':>14}"]
    lines.append("-" * len(lines[0]))
    for r in rows:
        b = f"{r.bytes:,.0f}" if float(r.bytes).is_integer() else f"{r.bytes:,.1f}"
        lines.append(f"{r.name:<{w}}  {r.params:>12,}  {str(r.bits):>8}  {b:>14}")
    lines.append("-" * len(lines[0]))
    lines.append(f"file: {report.path} ({report.file_kind}"
                 + (f", format v{report.extra.get('format_version')}" if report.file_kind == "packed" else "")
                 + ")")
    lines.append(f"parameters:        {report.params:,}")
    lines.append(f"fp32 size:         {report.fp32_bytes:,} bytes ({_human(report.fp32_bytes)})")
    lines.append(f"payload (theory):  {report.payload_bytes:,.0f} bytes ({_human(report.payload_bytes)})")
    lines.append(f"file size:         {report.file_bytes:,} bytes ({_human(report.file_bytes)})")
    if report.file_kind == "packed":
        over = report.file_bytes - report.payload_bytes
        lines.append(f"overhead:          {over:,.0f} bytes (header {report.header_bytes:,} bytes)")
        lines.append(f"compression ratio: {report.ratio:.2f}x vs fp32 (from the file size)")
    else:
        lines.append(f"compression ratio: {report.ratio:.2f}x vs fp32 (tensor payload; "
                     f"the checkpoint container adds {report.file_bytes - report.payload_bytes:,.0f} bytes)")
    return "\n".join(lines)
