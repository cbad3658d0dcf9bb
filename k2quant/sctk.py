"""NIST scoring with SCTK: ``sclite``, ``hubscr.pl`` (eval2000 stm + glm) and ``sc_stats``.

This module needs no k2. It runs the tools of NIST's Speech Recognition Scoring Toolkit (SCTK;
Debian/Ubuntu package ``sctk``, which installs them under ``/usr/lib/sctk/bin``) the way Kaldi's
``egs/swbd/s5c/local/score_sclite.sh`` does, and parses their reports:

- :func:`score_trn` -- ``sclite`` on Kaldi text files (converted to ``trn``), for corpora
  without an stm (AN4, dev splits); writes the SGML alignment that ``sc_stats`` reads.
- :func:`score_stm` -- eval2000 as NIST scores it: the hypotheses become a CTM (the words of an
  utterance spread evenly over its segment: sclite only needs them inside the segment), the
  hyp words that NIST does not score are removed first as Kaldi does (noise and laughter
  tokens, ``<UNK>``, hesitations ``UH UM EH MM HM AH HUH HA ER OOF HEE ACH EEE EW``, and
  partial words ending in ``-``), then ``hubscr.pl -l english -h hub5`` applies the GLM of
  LDC2002T43 to reference and hypothesis (``csrfilt.sh``: contractions, alternate spellings,
  ``%HESITATION``) and runs ``sclite -F -D`` (fragments and optionally deletable words such as
  ``(%HESITATION)`` and ``(IN-)`` are handled as in the official evaluation). Subsets select
  stm lines by file prefix: ``swbd`` = ``sw_*`` (the Switchboard half of Hub5'00), ``callhome``
  = ``en_*`` (CallHome), ``total`` = both.
- :func:`sc_stats_mapsswe` -- ``sc_stats -t mapsswe`` on two systems' SGML files: the NIST
  Matched-Pairs Sentence-Segment Word Error test (the reference implementation that
  :func:`k2quant.significance.mapsswe_nist` reproduces).

Tools are found in ``$SCTK_BIN``, then on ``PATH``, then in ``/usr/lib/sctk/bin``; a missing
tool is a :class:`SctkError` that says how to install it (``apt-get install sctk`` or
``tools/install.sh --with-sctk``). A failing tool raises :class:`SctkError` with the command
line and its output.
"""
import logging
import math
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from k2quant.utils.io import PathLike, atomic_write_text

log = logging.getLogger(__name__)

DEBIAN_BIN = "/usr/lib/sctk/bin"
#: Hypothesis tokens that NIST does not score (Kaldi's score_sclite.sh filter for swbd).
NOT_SCORED = frozenset({"[NOISE]", "[LAUGHTER]", "[VOCALIZED-NOISE]", "<UNK>", "<sil>", "<SIL>"})
HESITATIONS = frozenset(
    "UH UM EH MM HM AH HUH HA ER OOF HEE ACH EEE EW".split()
)
#: eval2000 subsets: name -> stm file-name prefixes (None = every file).
EVAL2000_SUBSETS: Dict[str, Optional[Tuple[str, ...]]] = {
    "total": None,
    "swbd": ("sw_",),
    "callhome": ("en_",),
}


class SctkError(RuntimeError):
    """An SCTK tool is missing or failed (the message has the command and its output)."""


def find_tool(name: str) -> str:
    """Path of the SCTK tool ``name`` (``sclite``, ``sc_stats``, ``hubscr.pl``, ...)."""
    dirs = []
    if os.environ.get("SCTK_BIN"):
        dirs.append(os.environ["SCTK_BIN"])
    found = None
    for d in dirs:
        p = Path(d) / name
        if p.is_file() and os.access(p, os.X_OK):
            found = str(p)
            break
    found = found or shutil.which(name)
    if found is None and (Path(DEBIAN_BIN) / name).is_file():
        found = str(Path(DEBIAN_BIN) / name)
    if found is None:
        raise SctkError(
            f"the NIST SCTK tool {name!r} was not found ($SCTK_BIN, PATH, {DEBIAN_BIN}). "
            "Install SCTK: 'apt-get install sctk' (Debian/Ubuntu, as root) or "
            "'tools/install.sh --with-sctk', or build it from NIST's SCTK sources and set "
            "SCTK_BIN to its bin directory"
        )
    return found


def have_sctk() -> bool:
    """True when ``sclite``, ``sc_stats`` and ``hubscr.pl`` can all be found."""
    try:
        for t in ("sclite", "sc_stats", "hubscr.pl"):
            find_tool(t)
        return True
    except SctkError:
        return False


def _run(cmd: Sequence[str], *, stdin: Optional[bytes] = None, cwd: Optional[PathLike] = None):
    """Run an SCTK command with its directory first on PATH (its scripts call each other)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(cmd[0]).parent), env.get("PATH", "")])
    try:
        p = subprocess.run(list(cmd), input=stdin, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, cwd=cwd, env=env, timeout=3600)
    except OSError as e:
        raise SctkError(f"cannot run {' '.join(map(str, cmd))}: {e}") from e
    out = p.stdout.decode("utf-8", "replace")
    if p.returncode != 0:
        raise SctkError(
            f"{' '.join(map(str, cmd))} exited with {p.returncode}; its output:\n{out[-3000:]}"
        )
    return out


# ------------------------------------------------------------------------------ reports


@dataclass
class SclitePart:
    """One scored set as sclite's ``.sys`` report gives it (counts; percentages of ref words)."""

    name: str
    num_sentences: int
    ref_words: int
    corr_percent: float
    sub_percent: float
    del_percent: float
    ins_percent: float
    wer_percent: float
    sentence_error_percent: float

    @property
    def errors(self) -> int:
        return int(round(self.wer_percent * self.ref_words / 100))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["errors"] = self.errors
        return d


def parse_sys(path: PathLike, name: str = "") -> SclitePart:
    """The ``Sum/Avg`` row of a sclite ``.sys`` report."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    for line in text.splitlines():
        if "Sum/Avg" in line:
            nums = re.findall(r"-?\d+(?:\.\d+)?", line)
            if len(nums) >= 8:
                snt, wrd = int(nums[0]), int(nums[1])
                c, s, d, i, e, se = map(float, nums[2:8])
                return SclitePart(name, snt, wrd, c, s, d, i, e, se)
    raise SctkError(f"{path}: no 'Sum/Avg' line (is this a sclite .sys report?)")


# ------------------------------------------------------------------------- trn scoring


def write_trn(texts: Mapping[str, Sequence[str]], path: PathLike) -> None:
    """Kaldi ``utt -> words`` as a sclite ``trn`` file: ``w1 w2 (utt)``, sorted by id.

    Utterance ids must not contain whitespace or parentheses.
    """
    lines = []
    for utt in sorted(texts):
        if re.search(r"[\s()]", utt):
            raise ValueError(f"utterance id {utt!r} contains whitespace or parentheses")
        lines.append(" ".join([*texts[utt], f"({utt})"]) + "\n")
    atomic_write_text(path, "".join(lines))


def score_trn(
    refs: Mapping[str, Sequence[str]],
    hyps: Mapping[str, Sequence[str]],
    out_dir: PathLike,
    name: str,
) -> Tuple[SclitePart, Path]:
    """Score ``hyps`` against ``refs`` with ``sclite`` (trn format, no filtering).

    A reference utterance without a hypothesis is scored against an empty hypothesis (all
    deletions), as :func:`k2quant.scoring.compute_wer` does.

    Returns:
      ``(SclitePart, sgml_path)``; ``out_dir`` gets ``NAME.ref.trn``, ``NAME.hyp.trn`` and
      sclite's ``NAME.sys`` / ``NAME.sgml``.
    """
    extra = sorted(set(hyps) - set(refs))
    if extra:
        raise ValueError(f"{len(extra)} hypotheses have no reference, e.g. {extra[:3]}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ref_trn, hyp_trn = out_dir / f"{name}.ref.trn", out_dir / f"{name}.hyp.trn"
    write_trn(refs, ref_trn)
    write_trn({u: hyps.get(u, []) for u in refs}, hyp_trn)
    _run([find_tool("sclite"), "-r", str(ref_trn), "trn", "-h", str(hyp_trn), "trn", name,
          "-i", "spu_id", "-o", "sum", "sgml", "-O", str(out_dir), "-n", name])
    return parse_sys(out_dir / f"{name}.sys", name), out_dir / f"{name}.sgml"


# ------------------------------------------------------------------- stm/ctm (eval2000)


def filter_hyp_words(words: Sequence[str]) -> List[str]:
    """Drop the hypothesis tokens NIST does not score (see the module docstring)."""
    return [
        w for w in words
        if w not in NOT_SCORED and w.upper() not in HESITATIONS and not w.endswith("-")
    ]


def write_ctm(
    hyps: Mapping[str, Sequence[str]],
    segments: Mapping[str, Tuple[str, str, float, float]],
    path: PathLike,
) -> None:
    """Write hypotheses as a NIST CTM: ``file channel start duration word``.

    Args:
      hyps: ``utt -> words`` (already filtered).
      segments: ``utt -> (file, channel, start_seconds, duration_seconds)``; each utterance's
        words get equal slices of its segment.
    """
    missing = sorted(set(hyps) - set(segments))
    if missing:
        raise ValueError(f"{len(missing)} hypotheses have no segment, e.g. {missing[:3]}")
    rows = []
    for utt, words in hyps.items():
        f, ch, start, dur = segments[utt]
        step = dur / max(len(words), 1)
        for i, w in enumerate(words):
            rows.append((f, ch, start + i * step, step, w))
    rows.sort(key=lambda r: (r[0], r[1], r[2]))
    atomic_write_text(
        path, "".join(f"{f} {ch} {s:.3f} {d:.3f} {w}\n" for f, ch, s, d, w in rows)
    )


def subset_lines(lines: Sequence[str], prefixes: Optional[Tuple[str, ...]]) -> List[str]:
    """stm/ctm lines whose file name starts with one of ``prefixes`` (``;;`` comments kept)."""
    if prefixes is None:
        return list(lines)
    return [ln for ln in lines if ln.startswith(";;") or ln.startswith(prefixes)]


def score_stm(
    hyps: Mapping[str, Sequence[str]],
    segments: Mapping[str, Tuple[str, str, float, float]],
    stm: PathLike,
    glm: PathLike,
    out_dir: PathLike,
    name: str,
    subsets: Mapping[str, Optional[Tuple[str, ...]]] = EVAL2000_SUBSETS,
) -> Dict[str, Tuple[SclitePart, Path]]:
    """Score hypotheses against an stm with the glm, as Kaldi scores eval2000 (``hubscr.pl``).

    Args:
      hyps: ``utt -> words`` (filtered here with :func:`filter_hyp_words`).
      segments: ``utt -> (file, channel, start, duration)``, e.g. ``("en_4156", "A", 1.0,
        1.5)``; file and channel as in the stm.
      stm, glm: the reference and the global mapping file (LDC2002T43:
        ``hub5e00.english.000405.stm`` and ``en20000405_hub5.glm``).
      subsets: name -> file-name prefixes; subsets without stm lines are skipped (logged).

    Returns:
      ``{subset: (SclitePart, sgml_path)}``. ``out_dir/NAME.SUBSET.*`` hold the ctm, the stm
      subset and hubscr's outputs (``.ctm.filt.sys``, ``.ctm.filt.dtl``, ``.ctm.filt.sgml``).
    """
    stm, glm, out_dir = Path(stm), Path(glm), Path(out_dir)
    for p, what in ((stm, "stm"), (glm, "glm")):
        if not p.is_file():
            raise FileNotFoundError(
                f"{what} file {p} does not exist (eval2000: LDC2002T43/reference/"
                f"{'hub5e00.english.000405.stm' if what == 'stm' else 'en20000405_hub5.glm'})"
            )
    hubscr, sclite = find_tool("hubscr.pl"), find_tool("sclite")
    out_dir.mkdir(parents=True, exist_ok=True)
    filtered = {u: filter_hyp_words(w) for u, w in hyps.items()}
    all_ctm = out_dir / f"{name}.ctm"
    write_ctm(filtered, segments, all_ctm)
    stm_lines = stm.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    ctm_lines = all_ctm.read_text(encoding="utf-8").splitlines(keepends=True)
    results: Dict[str, Tuple[SclitePart, Path]] = {}
    for subset, prefixes in subsets.items():
        sub_stm = subset_lines(stm_lines, prefixes)
        if not any(not ln.startswith(";;") and ln.strip() for ln in sub_stm):
            log.info("score_stm: no stm lines for subset %s (%s); skipped", subset, prefixes)
            continue
        stm_path = out_dir / f"{name}.{subset}.stm"
        ctm_path = out_dir / f"{name}.{subset}.ctm"
        atomic_write_text(stm_path, "".join(sub_stm))
        atomic_write_text(ctm_path, "".join(subset_lines(ctm_lines, prefixes)))
        _run([hubscr, "-p", str(Path(sclite).parent), "-V", "-l", "english", "-h", "hub5",
              "-g", str(glm), "-r", str(stm_path), str(ctm_path)], cwd=out_dir)
        sys_path = Path(f"{ctm_path}.filt.sys")
        results[subset] = (parse_sys(sys_path, subset), Path(f"{ctm_path}.filt.sgml"))
    return results


def segments_from_cuts(cuts_path: PathLike) -> Dict[str, Tuple[str, str, float, float]]:
    """``cut id -> (recording, "A"|"B", start, duration)`` of the supervisions of a CutSet file.

    The channel letter is the stm's: channel 0 = ``A``, 1 = ``B`` (LDC's two-channel SPHERE).
    Decoding hypotheses are keyed by cut id (one cut per supervision).
    """
    import lhotse

    out = {}
    for cut in lhotse.load_manifest(cuts_path):
        if not cut.supervisions:
            raise ValueError(f"{cuts_path}: cut {cut.id} has no supervision")
        sup = cut.supervisions[0]  # its start is relative to the cut
        ch = sup.channel[0] if isinstance(sup.channel, list) else sup.channel
        out[cut.id] = (sup.recording_id, "AB"[int(ch or 0)], round(cut.start + sup.start, 3),
                       float(sup.duration))
    return out


def score_stm_files(
    hyp_path: PathLike,
    cuts_path: PathLike,
    stm: PathLike,
    glm: PathLike,
    out_dir: PathLike,
    name: str,
    baseline: Optional[str] = None,
) -> Dict[str, object]:
    """:func:`score_stm` of a Kaldi hyp file, optionally tested against an earlier system.

    Args:
      hyp_path: Kaldi text (``cut_id words...``) of the split's cuts.
      cuts_path: the split's CutSet (segments of the hypotheses).
      baseline: the ``name`` of a system scored before into the same ``out_dir``; each subset
        is then tested with :func:`sc_stats_mapsswe` (A = baseline, B = this system).

    Returns (and writes to ``out_dir/sclite-NAME.json``):
      ``{"name", "subsets": {subset: SclitePart dict}, "mapsswe": {subset: ScStatsMapsswe dict}}``.
    """
    from k2quant.scoring import read_text
    from k2quant.utils.io import atomic_write_json

    out_dir = Path(out_dir)
    hyps = read_text(hyp_path)
    segments = segments_from_cuts(cuts_path)
    res = score_stm(hyps, segments, stm, glm, out_dir, name)
    summary: Dict[str, object] = {
        "name": name, "hyp": str(hyp_path),
        "subsets": {k: part.to_dict() for k, (part, _) in res.items()}, "mapsswe": {},
    }
    if baseline is not None:
        for subset, (_, sgml) in res.items():
            base = out_dir / f"{baseline}.{subset}.ctm.filt.sgml"
            if not base.is_file():
                raise FileNotFoundError(
                    f"no {base}: score the baseline system {baseline!r} into {out_dir} first"
                )
            st = sc_stats_mapsswe(base, sgml, out_dir, f"{baseline}-vs-{name}.{subset}")
            summary["mapsswe"][subset] = st.to_dict()
    atomic_write_json(out_dir / f"sclite-{name}.json", summary)
    return summary


def sclite_table(out_dir: PathLike, names: Sequence[str], baseline: Optional[str] = None,
                 title: str = "") -> str:
    """Markdown table of the ``sclite-NAME.json`` files in ``out_dir`` (WER per subset, words,
    and the MAPSSWE p-value against ``baseline`` where :func:`score_stm_files` computed it)."""
    import json

    rows, subsets = [], []
    for name in names:
        path = Path(out_dir) / f"sclite-{name}.json"
        if not path.is_file():
            raise FileNotFoundError(f"no {path}: score {name!r} with 'k2quant score-sclite' first")
        d = json.loads(path.read_text(encoding="utf-8"))
        rows.append(d)
        subsets += [s for s in d["subsets"] if s not in subsets]
    head = ["system"] + [f"{s} WER (words)" for s in subsets]
    if baseline:
        head += [f"{s} p vs {baseline}" for s in subsets]
    lines = ([f"## {title}", ""] if title else []) + [
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d in rows:
        cells = [d["name"]]
        for s in subsets:
            p = d["subsets"].get(s)
            cells.append("-" if p is None else f"{p['wer_percent']:.2f} ({p['ref_words']})")
        if baseline:
            for s in subsets:
                m = d.get("mapsswe", {}).get(s)
                cells.append("-" if m is None else f"{m['p_two_sided']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "WER by NIST sclite (hubscr.pl, stm + glm); p: two-sided MAPSSWE of sc_stats."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- sc_stats


@dataclass
class ScStatsMapsswe:
    """``sc_stats -t mapsswe`` for two systems (its MTCH_PR_RESULTS line and p-value).

    ``z`` is sc_stats's statistic, mean(errors of ``system_a`` - errors of ``system_b``) over
    the segments divided by its standard error. ``p_two_sided`` is the exact normal p-value of
    that ``z`` (from the printed 3 decimals); ``p_printed`` is the p-value of sc_stats's
    unified report (3 decimals, None when it prints ``<0.001``), which sc_stats looks up in a
    table of the normal CDF at 0.01 steps of |z|, taking the lower tabulated |z|.
    """

    system_a: str
    system_b: str
    num_segments: int
    wer_a_percent: float
    wer_b_percent: float
    mean: float
    std_dev: float
    z: float
    p_two_sided: float
    p_printed: Optional[float]

    def to_dict(self) -> dict:
        return asdict(self)


_MTCH = re.compile(
    r"MTCH_PR_RESULTS \(systems: (\S+) (\S+)\) \(# segs: (\d+)\).*\(% Error:\s*([\d.]+)\s+"
    r"([\d.]+)\) \(mean:\s*(-?[\d.]+)\) \(std dev:\s*(-?[\d.]+)\) \(Z Stat:\s*(-?[\d.]+|-?nan)\)"
)


def sc_stats_mapsswe(sgml_a: PathLike, sgml_b: PathLike, out_dir: PathLike,
                     name: str = "mapsswe") -> ScStatsMapsswe:
    """Run ``sc_stats -p -t mapsswe -v -u`` on the SGML alignments of systems A and B."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = Path(sgml_a).read_bytes() + Path(sgml_b).read_bytes()
    tool = find_tool("sc_stats")
    # -v writes the detailed MTCH_PR_RESULTS line, -u the unified table with the p-value; with
    # both, sc_stats keeps only the summary, hence two runs
    _run([tool, "-p", "-t", "mapsswe", "-v", "-n", name, "-O", str(out_dir)], stdin=data)
    _run([tool, "-p", "-t", "mapsswe", "-u", "-n", name, "-O", str(out_dir)], stdin=data)
    report = out_dir / f"{name}.stats.mapsswe"
    text = report.read_text(encoding="utf-8", errors="replace")
    m = _MTCH.search(text)
    if m is None:
        raise SctkError(f"{report}: no MTCH_PR_RESULTS line")
    z = 0.0 if "nan" in m.group(8) else float(m.group(8))
    p_printed = None
    unified = out_dir / f"{name}.stats.unified"
    if unified.is_file():
        u = re.search(r"\|\s+MP\s+\|\|\s+\S+\s+\|\s+\|\s+(\S+)\s+(<?[\d.]+)",
                      unified.read_text(encoding="utf-8", errors="replace"))
        if u and not u.group(2).startswith("<"):
            p_printed = float(u.group(2))
    return ScStatsMapsswe(
        system_a=m.group(1), system_b=m.group(2), num_segments=int(m.group(3)),
        wer_a_percent=float(m.group(4)), wer_b_percent=float(m.group(5)),
        mean=float(m.group(6)), std_dev=float(m.group(7)), z=z,
        p_two_sided=math.erfc(abs(z) / math.sqrt(2.0)), p_printed=p_printed,
    )


__all__ = [
    "SctkError",
    "SclitePart",
    "ScStatsMapsswe",
    "find_tool",
    "have_sctk",
    "parse_sys",
    "write_trn",
    "score_trn",
    "filter_hyp_words",
    "write_ctm",
    "score_stm",
    "score_stm_files",
    "sclite_table",
    "segments_from_cuts",
    "sc_stats_mapsswe",
]
