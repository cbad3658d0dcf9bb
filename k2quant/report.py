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
           "make_report", "COLUMNS", "SYSTEM_COLUMNS", "load_rescore_summaries",
           "build_system_rows", "render_system_markdown", "make_system_report"]

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


# ---------------------------------------------------------------------------------------------
# AM + LM systems (rescoring outputs)
# ---------------------------------------------------------------------------------------------
SYSTEM_COLUMNS = ("system", "AM", "LM", "AM bytes", "LM bytes", "AM+LM bytes",
                  "ratio vs fp32 system", "1-best WER (%)", "WER (%)", "p MAPSSWE",
                  "p bootstrap", "lossless", "rescoring utt/s")
SUMMARY_FILE = "rescore-summary.json"


def load_rescore_summaries(specs: Sequence[str]) -> List[Dict[str, Any]]:
    """Read ``k2quant rescore --out DIR`` summaries; a spec is ``DIR`` or ``NAME=DIR`` (the
    system's name in the table; default: the directory name).

    Raises:
      FileNotFoundError naming the missing summary; ValueError for a summary without
      references (rescored without ``--refs``) or without the AM/LM sizes (lattices not
      written by ``k2quant decode --save-lattices``).
    """
    out = []
    for spec in specs:
        name, _, d = spec.rpartition("=")
        d = Path(d)
        f = d / SUMMARY_FILE if d.is_dir() or not d.name.endswith(".json") else d
        if not f.is_file():
            raise FileNotFoundError(f"{f}: no rescoring summary (expected DIR/{SUMMARY_FILE} "
                                    f"written by 'k2quant rescore --out DIR')")
        try:
            s = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{f}: not JSON ({e})") from None
        if "wer_details" not in s:
            raise ValueError(f"{f}: no WER in the summary; rescore with --refs")
        if not s.get("am") or not s.get("lm_size"):
            raise ValueError(
                f"{f}: the summary lacks the AM size (lattices without am-info.json: decode "
                f"with 'k2quant decode --save-lattices') or the LM size (older k2quant); rerun "
                f"'k2quant rescore'")
        s["_dir"] = str(f.parent)
        s["_name"] = name or f.parent.name
        out.append(s)
    return out


def _per_utt(summary: Mapping[str, Any], setting: str) -> Path:
    if setting != "1best" and setting not in summary.get("wer", {}):
        raise ValueError(f"{summary['_dir']}: no rescoring setting {setting!r}; it has "
                         f"{sorted(summary.get('wer', {}))}")
    return Path(summary["_dir"]) / f"per_utt-{setting}.tsv"


def _label(path: str) -> str:
    p = Path(str(path).split(" (")[0])
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


def build_system_rows(summaries: Sequence[Mapping[str, Any]], setting: str = "auto",
                      alpha: float = 0.05, num_samples: int = 10000) -> List[ReportRow]:
    """One row per AM + LM system; the first summary is the reference (the fp32 AM with the
    fp32 LM), against which sizes and WERs are compared.

    ``setting``: the rescoring setting (e.g. ``lm_scale_0.3-ngram_scale_1``) reported for
    every system; ``"auto"`` = the reference's best setting (so the LM scale is tuned on the
    fp32 system only, and the compressed systems are scored at the same scale). Each row
    also records its own best setting (``own_best_*``, not used for the verdict).
    ``ratio vs fp32 system`` = (AM bytes + LM bytes of the reference) / (AM + LM bytes), with
    4 bytes per parameter for float models and the packed file size for packed ones.
    """
    from k2quant.significance import load_errors, lossless_verdict

    if not summaries:
        raise ValueError("no systems given")
    ref = summaries[0]
    if ref["am"].get("packed") or ref["lm_size"].get("packed"):
        raise ValueError(f"{ref['_dir']}: the first system must be the fp32 reference (fp32 "
                         f"AM lattices rescored with the fp32 LM); it has a packed "
                         f"{'AM' if ref['am'].get('packed') else 'LM'}")
    if setting == "auto":
        setting = ref.get("best_setting")
        if not setting:
            raise ValueError(f"{ref['_dir']}: no best setting in the reference summary")
    ref_bytes = int(ref["am"]["bytes"]) + int(ref["lm_size"]["bytes"])
    ref_errs = load_errors(_per_utt(ref, setting))
    rows: List[ReportRow] = []
    for i, s in enumerate(summaries):
        am_b, lm_b = int(s["am"]["bytes"]), int(s["lm_size"]["bytes"])
        if s.get("num_utts") != ref.get("num_utts"):
            raise ValueError(f"{s['_dir']}: {s.get('num_utts')} utterances, the reference "
                             f"{ref['_dir']} has {ref.get('num_utts')}; rescore the same set")
        row: ReportRow = {
            "system": s["_name"], "am": _label(s["am"]["model"]), "lm": _label(s["lm"]),
            "am_bytes": am_b, "lm_bytes": lm_b, "bytes": am_b + lm_b,
            "ratio": ref_bytes / (am_b + lm_b), "one_best_wer": s["baseline_wer"],
            "setting": setting, "wer": s["wer_details"][setting]["wer"]
            if setting in s["wer_details"] else None,
            "errors": s["wer_details"].get(setting, {}).get("errors"),
            "ref_words": s["wer_details"].get(setting, {}).get("ref_words"),
            "own_best_setting": s.get("best_setting"), "own_best_wer": s.get("best_wer"),
            "p_mapsswe": None, "p_bootstrap": None, "lossless": None, "alpha": alpha,
            "dir": s["_dir"], "utts_per_second": s.get("utts_per_second"),
        }
        if row["wer"] is None:
            raise ValueError(f"{s['_dir']}: no rescoring setting {setting!r}")
        if i > 0:
            v = lossless_verdict(ref_errs, load_errors(_per_utt(s, setting)), alpha=alpha,
                                 num_samples=num_samples)
            row.update(p_mapsswe=v["mapsswe"]["p_value"], p_bootstrap=v["bootstrap"]["p_value"],
                       lossless=bool(v["lossless"]))
        rows.append(row)
    return rows


def render_system_markdown(rows: Sequence[ReportRow], title: Optional[str] = None,
                           alpha: float = 0.05) -> str:
    lines = [f"# {title}", ""] if title else []
    lines.append("| " + " | ".join(SYSTEM_COLUMNS) + " |")
    lines.append("|" + "|".join(["---"] * 3 + ["---:"] * (len(SYSTEM_COLUMNS) - 5) + [":---:"]
                                + ["---:"]) + "|")
    for r in rows:
        lossless = "-" if r["lossless"] is None else ("yes" if r["lossless"] else "no")
        lines.append("| " + " | ".join([
            r["system"], r["am"], r["lm"], f"{r['am_bytes']:,}", f"{r['lm_bytes']:,}",
            f"{r['bytes']:,}", f"{r['ratio']:.2f}x", f"{r['one_best_wer']:.2f}",
            f"{r['wer']:.2f}", _fmt_p(r["p_mapsswe"]), _fmt_p(r["p_bootstrap"]), lossless,
            "-" if r.get("utts_per_second") is None else f"{r['utts_per_second']:.2f}",
        ]) + " |")
    setting = rows[0]["setting"] if rows else "-"
    lines += [
        "",
        f"WER (%) after n-best rescoring at the setting `{setting}` for every system (the fp32 "
        f"system's best, so compressed systems are not tuned on the test data); 1-best = "
        f"lattice best path before rescoring. Bytes: packed files on disk, 4 bytes per "
        f"parameter for float models; ratio vs the first (fp32) system. p-values one-sided "
        f"(H1: the WER rises vs the first row) on the same utterances; lossless = both "
        f"p >= {alpha:g}. rescoring utt/s: n-best LM rescoring throughput of each run "
        f"(lattice reading, n-best extraction and LM scoring; same machine, sequential runs).",
    ]
    return "\n".join(lines) + "\n"


def make_system_report(specs: Sequence[str], out: PathLike, title: Optional[str] = None,
                       setting: str = "auto", alpha: float = 0.05,
                       num_samples: int = 10000) -> List[ReportRow]:
    """:func:`load_rescore_summaries` + :func:`build_system_rows`; writes ``out`` (Markdown)
    and ``out`` with ``.json``; returns the rows."""
    rows = build_system_rows(load_rescore_summaries(specs), setting=setting, alpha=alpha,
                             num_samples=num_samples)
    out = Path(out)
    atomic_write_text(out, render_system_markdown(rows, title, alpha))
    atomic_write_json(out.with_suffix(".json"), {
        "format": "k2quant-system-table", "columns": list(SYSTEM_COLUMNS), "alpha": alpha,
        "setting": rows[0]["setting"], "rows": rows})
    return rows
