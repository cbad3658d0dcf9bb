"""Report tables of compressed systems (the paper's table), as Markdown and JSON.

Input: the ``report.json`` files written by :func:`k2quant.compress.compress` (one per
compressed system; a directory stands for its ``report.json``). Output, one row per system plus
one ``fp32`` row per distinct fp32 reference::

    | system | method | avg bits | params | bytes on disk | ratio vs fp32 | WER (%) |
    | p MAPSSWE | p bootstrap | lossless |

- ``bytes on disk``: the size of the packed file (``os.path.getsize`` at report time when the
  file is still there, else the size recorded by ``compress``); for the fp32 row, the fp32
  model packed by the same format (float32 tensors, BatchNorm statistics, header).
- ``ratio vs fp32`` = ``fp32_bytes / bytes on disk`` with ``fp32_bytes`` = 4 bytes per
  parameter of the fp32 model (so the fp32 row itself shows slightly under 1.0x: its file also
  holds the BatchNorm statistics and the header).
- ``p MAPSSWE`` / ``p bootstrap``: one-sided p-values for "the compressed system's WER is
  higher than fp32's" on the same utterances; recomputed from the per-utterance error files
  when both are still there (:func:`k2quant.significance.lossless_verdict`), else taken from
  the report. ``lossless`` = both p-values >= alpha (0.05).
"""
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from k2quant.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

PathLike = Union[str, Path]

__all__ = ["ReportRow", "load_reports", "build_rows", "render_markdown", "write_report",
           "make_report", "COLUMNS"]

COLUMNS = ("system", "method", "avg bits", "params", "bytes on disk", "ratio vs fp32",
           "WER (%)", "p MAPSSWE", "p bootstrap", "lossless")
REPORT_FORMAT = "k2quant-compress-report"


ReportRow = Dict[str, Any]


def load_reports(paths: Sequence[PathLike]) -> List[Dict[str, Any]]:
    """Read ``report.json`` files (a directory means ``DIR/report.json``).

    Raises:
      FileNotFoundError naming the missing report; ValueError for a file that is not a
      compress report.
    """
    out = []
    for p in paths:
        p = Path(p)
        f = p / "report.json" if p.is_dir() else p
        if not f.is_file():
            raise FileNotFoundError(
                f"{f}: no compress report (expected DIR/report.json written by 'k2quant "
                f"compress --out-dir DIR')"
            )
        try:
            d = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{f}: not JSON ({e})") from None
        if not isinstance(d, dict) or d.get("format") != REPORT_FORMAT:
            raise ValueError(f"{f}: not a k2quant compress report (format={REPORT_FORMAT!r})")
        d["_path"] = str(f)
        out.append(d)
    return out


def _file_size(path: Optional[str], recorded: Optional[int], base: Optional[str]) -> Optional[int]:
    if path:
        p = Path(path)
        if not p.is_absolute() and base and not p.is_file():
            p = Path(base).parent / p
        if p.is_file():
            return os.path.getsize(p)
    return recorded


def _resolve(path: Optional[str], base: Optional[str]) -> Optional[Path]:
    if not path:
        return None
    p = Path(path)
    if p.is_file():
        return p
    if base and (Path(base).parent / p).is_file():
        return Path(base).parent / p
    return None


def _significance(r: Mapping[str, Any], alpha: float, num_samples: int) -> Dict[str, Any]:
    files = r.get("files", {})
    base = r.get("_path")
    a = _resolve(files.get("fp32_per_utt"), base)
    b = _resolve(files.get("per_utt"), base)
    if a is not None and b is not None:
        from k2quant.significance import load_errors, lossless_verdict

        v = lossless_verdict(load_errors(a), load_errors(b), alpha=alpha, num_samples=num_samples)
        v["source"] = "per-utterance files"
        return v
    v = dict(r.get("significance") or {})
    if not v:
        raise ValueError(f"{base}: the report has no significance results and its "
                         f"per-utterance error files are gone; rerun 'k2quant compress'")
    v["source"] = "report"
    m, bs = v["mapsswe"]["p_value"], v["bootstrap"]["p_value"]
    v["lossless"] = bool(min(m, bs) >= alpha)
    return v


def build_rows(reports: Sequence[Mapping[str, Any]], alpha: float = 0.05,
               num_samples: int = 10000) -> List[ReportRow]:
    """Rows of the table: an ``fp32`` row per distinct fp32 reference (first), then one row
    per report in the given order."""
    rows: List[ReportRow] = []
    fp32_rows: Dict[str, ReportRow] = {}
    for r in reports:
        fp = r["fp32"]
        fp32_bytes = int(r["fp32_bytes"])
        # one fp32 row per distinct reference (same parameters and per-utterance errors)
        key = json.dumps([int(fp.get("params", fp32_bytes // 4)), fp["wer"].get("errors"),
                          fp["wer"].get("ref_words"), fp["wer"].get("num_utts")])
        if key not in fp32_rows:
            disk = _file_size(fp.get("packed"), fp.get("bytes_on_disk"), r.get("_path"))
            fp32_rows[key] = {
                "system": "fp32", "method": "-", "avg_bits": 32.0,
                "params": int(fp.get("params", fp32_bytes // 4)), "bytes_on_disk": disk,
                "fp32_bytes": fp32_bytes,
                "ratio": fp32_bytes / disk if disk else None,
                "wer": fp["wer"]["wer"], "errors": fp["wer"].get("errors"),
                "ref_words": fp["wer"].get("ref_words"),
                "p_mapsswe": None, "p_bootstrap": None, "lossless": None,
                "reference": key,
            }
        disk = _file_size(r.get("files", {}).get("model"), r.get("bytes_on_disk"), r.get("_path"))
        sig = _significance(r, alpha, num_samples)
        rows.append({
            "system": r["system"],
            "method": r["method"] + ("+subspace" if r.get("subspace") else ""),
            "avg_bits": float(r["avg_bits"]), "params": int(r["params"]),
            "bytes_on_disk": disk, "fp32_bytes": fp32_bytes,
            "ratio": fp32_bytes / disk if disk else None,
            "wer": r["wer"]["wer"], "errors": r["wer"].get("errors"),
            "ref_words": r["wer"].get("ref_words"),
            "p_mapsswe": sig["mapsswe"]["p_value"], "p_bootstrap": sig["bootstrap"]["p_value"],
            "lossless": bool(sig["lossless"]), "alpha": alpha,
            "significance_source": sig["source"], "reference": key,
            "report": r.get("_path"),
            "timings": r.get("timings"),
        })
    return list(fp32_rows.values()) + rows


def _fmt_p(p: Optional[float]) -> str:
    if p is None:
        return "-"
    if p < 0.001:
        return "<0.001"
    return f"{p:.3f}"


def _cells(row: Mapping[str, Any]) -> List[str]:
    lossless = "-" if row["lossless"] is None else ("yes" if row["lossless"] else "no")
    ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
    disk = "-" if row["bytes_on_disk"] is None else f"{int(row['bytes_on_disk']):,}"
    wer = "-" if row["wer"] is None or not math.isfinite(row["wer"]) else f"{row['wer']:.2f}"
    return [row["system"], row["method"], f"{row['avg_bits']:.2f}", f"{row['params']:,}", disk,
            ratio, wer, _fmt_p(row["p_mapsswe"]), _fmt_p(row["p_bootstrap"]), lossless]


def render_markdown(rows: Sequence[ReportRow], title: Optional[str] = None,
                    alpha: float = 0.05) -> str:
    """The Markdown table (with a short legend)."""
    lines = []
    if title:
        lines += [f"# {title}", ""]
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(COLUMNS) - 3) + [":---:"]) + "|")
    for r in rows:
        lines.append("| " + " | ".join(_cells(r)) + " |")
    lines += [
        "",
        "ratio vs fp32 = (4 bytes x fp32 parameters) / bytes of the packed file on disk; "
        f"p-values are one-sided (H1: the WER rises) on the same utterances; lossless = both "
        f"p >= {alpha:g}.",
    ]
    return "\n".join(lines) + "\n"


def write_report(rows: Sequence[ReportRow], out: PathLike, title: Optional[str] = None,
                 alpha: float = 0.05) -> Dict[str, str]:
    """Write ``out`` (Markdown) and the rows as JSON next to it (``out`` with ``.json``)."""
    out = Path(out)
    md = render_markdown(rows, title, alpha)
    atomic_write_text(out, md)
    js = out.with_suffix(".json")
    atomic_write_json(js, {"format": "k2quant-report-table", "columns": list(COLUMNS),
                           "alpha": alpha, "rows": list(rows)})
    return {"markdown": str(out), "json": str(js)}


def make_report(paths: Sequence[PathLike], out: PathLike, title: Optional[str] = None,
                alpha: float = 0.05, num_samples: int = 10000) -> List[ReportRow]:
    """:func:`load_reports` + :func:`build_rows` + :func:`write_report`; returns the rows."""
    rows = build_rows(load_reports(paths), alpha=alpha, num_samples=num_samples)
    write_report(rows, out, title, alpha)
    return rows
