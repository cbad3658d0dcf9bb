"""Switchboard-1 (300 h) + Hub5'00 (eval2000): lhotse manifests, Kaldi-style text and splits.

Source: Linguistic Data Consortium. Audio: Switchboard-1 Release 2, LDC97S62 (2,438
conversations, 2-channel 8 kHz SPHERE, ~260 h of speech). Transcripts and lexicon: the ISIP
Mississippi State "MS-98" word transcriptions (``switchboard_word_alignments.tar.gz``, directory
``swb_ms98_transcriptions/`` with ``*/*/sw*-ms98-a-trans.text`` and ``sw-ms98-dict.text``).
Test set: 2000 HUB5 English evaluation, LDC2002S09 (audio) + LDC2002T43 (transcripts, and the
scoring files ``reference/hub5e00.english.000405.stm`` and ``reference/en20000405_hub5.glm``).
LM text (optional): the Fisher English transcripts, LDC2004T19 (``fe_03_p1_tran``) and LDC2005T19
(``fe_03_p2_tran``), ``data/trans/NNN/fe_03_NNNNN.txt`` each.

Licence: LDC97S62, LDC2002S09 and LDC2002T43 need an LDC licence; the MS-98 transcriptions are
public. Nothing is downloaded here: all three directories must be given.

Reading the LDC layouts is lhotse's (``lhotse.recipes.prepare_switchboard`` and
``prepare_eval2000``); this module adds Kaldi's swbd/s5c conventions on top:

- Speakers: one per conversation side (``sw02001-A``), as Kaldi (lhotse 1.33 labels both sides
  ``sw02001A``).
- Training text (Kaldi ``swbd1_data_prep.sh`` + ``swbd1_map_words.pl``), per utterance: drop
  ``[silence]``, ``<b_aside>``, ``<e_aside>``; then per word, in this order:

  ``[noise]`` / ``[laughter]`` / ``[vocalized-noise]`` -> ``[NOISE]`` / ``[LAUGHTER]`` /
  ``[VOCALIZED-NOISE]`` (noise words with the phones NSN / LAU / SPN in the lexicon);
  ``[laughter-WORD]`` -> ``WORD``; mispronunciations ``[bocket/bucket]`` -> ``BUCKET`` (the
  intended word); coinages ``{weirdest}`` -> ``WEIRDEST``; partial words (MS-98 writes the
  unspoken part in brackets: ``hel[lo]-``, ``[th]at``, or a bare leading/trailing hyphen
  ``-ing``, ``th-``) -> ``<UNK>``; any other bracketed token -> ``<UNK>``; everything upper-case.
  (Kaldi keeps fragments such as ``HEL-`` as words that become OOVs later; we map them to
  ``<UNK>`` directly.) Utterances left empty are dropped.
- Test text (eval2000, LDC2002T43 ``.txt`` files; Kaldi scores these through a GLM, which we do
  not have): ``<contraction ...>`` and other ``<...>`` tags removed (the word stays), ``{breath}``
  style events and ``[...]`` markers dropped, ``((uncertain))`` -> ``UNCERTAIN``, ``(( ))``
  dropped, hesitations ``%uh`` -> ``UH``, partial words ``wh-``/``-ing`` -> ``<UNK>``,
  punctuation ``, . ? ! " ;  :`` removed, upper-case; empty segments dropped.
- ``dev``: ``num_dev_utts`` utterances held out from training. ``dev_split="first"`` (default)
  is Kaldi's ``train_dev``: the first ``num_dev_utts`` utterances in Kaldi's order (conversation,
  side, start time). It is reproducible and comparable with published numbers, but *not*
  speaker-disjoint: the last dev conversation side continues in train, and callers recur across
  conversations. ``dev_split="conversations"`` instead holds out whole conversations (both sides),
  sampled with ``random.Random(seed)`` until ``num_dev_utts`` utterances are reached, so no
  conversation side is in both; real caller identity (LDC's caller table) is not used, so even
  this is not strictly speaker-disjoint. ``seed`` is used only by ``"conversations"``.
- ``train``: the rest. Kaldi's ``train_nodup`` (at most 300 copies of an identical transcript)
  is applied when ``max_dup_utts`` is set (default 300, None keeps all).
- ``eval2000``: the whole Hub5'00 set (Switchboard + CallHome halves) when ``eval2000_dir`` is
  given, else no test split (logged).
- Scoring files: the stm and glm of LDC2002T43 are copied to ``swbd_eval2000.stm`` and
  ``swbd_eval2000.glm`` (NIST scoring with :func:`k2quant.sctk.score_stm`).
- Fisher LM text ``swbd_fisher_text.txt`` (one utterance per line, when ``fisher_dirs`` are
  given), normalised as Kaldi's ``fisher_map_words.pl`` / ``swbd1_train_lms.sh`` do, in the
  training-text conventions above: ``((`` ``))`` (uncertain transcription) removed, the word
  kept; ``[laugh]`` / ``[laughter]`` -> ``[LAUGHTER]``; other bracketed events (``[noise]``,
  ``[sigh]``, ``[cough]``, ``[lipsmack]``, ``[breath]``, ``[mn]``) -> ``[NOISE]``; partial words
  (``wh-``, ``-ing``) -> ``<UNK>``; upper-case; empty lines dropped.
- Lexicon ``swbd_lexicon.txt``: ``sw-ms98-dict.text`` (``#`` comments skipped) with words mapped
  like training words and upper-cased, phones upper-cased, bracketed/partial entries and
  duplicates dropped; plus ``[NOISE] NSN``, ``[LAUGHTER] LAU``, ``[VOCALIZED-NOISE] SPN``,
  ``<sil> SIL`` and ``<UNK> SPN``. Kaldi's acronym reformatting
  (``format_acronyms_dict.py``) is not done.

Audio: the ``.sph`` files are referenced in place. lhotse reads SPHERE through the ``sph2pipe``
binary (LDC97S62 is shorten-compressed, which only sph2pipe decodes): put it on ``PATH`` before
``k2quant compute-fbank``. Without it, preparation falls back to libsndfile for reading the
headers, which works for uncompressed PCM/mu-law SPHERE only.
"""

import logging
import random
import re
import shutil
import tempfile
from collections import Counter, OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

from k2quant.data.lexicon import SIL_PHONE, SIL_WORD, UNK_PHONE, UNK_WORD, Lexicon, write_lexicon
from k2quant.data.manifests import (
    lexicon_path,
    read_done,
    recordings_path,
    save_manifest,
    supervisions_path,
    write_done,
)
from k2quant.utils.deps import optional_import
from k2quant.utils.io import PathLike, atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

PREFIX = "swbd"
DEV_SPLITS = ("first", "conversations")
#: MS-98 noise markers -> (our word, its phone), as Kaldi's swbd1_prepare_dict.sh.
NOISE_WORDS = {
    "[noise]": ("[NOISE]", "NSN"),
    "[laughter]": ("[LAUGHTER]", "LAU"),
    "[vocalized-noise]": ("[VOCALIZED-NOISE]", "SPN"),
}
_DROP_TRAIN = {"[silence]", "<b_aside>", "<e_aside>"}
_HINT_AUDIO = (
    "--audio-dir must be the LDC97S62 (Switchboard-1 Release 2) directory, holding "
    "swb1/sw0NNNN.sph (searched recursively for *.sph)"
)
_HINT_TRANS = (
    "--transcripts-dir must hold swb_ms98_transcriptions/ (the ISIP MS-98 transcripts: "
    "*/*/swNNNNA-ms98-a-trans.text and sw-ms98-dict.text), or be that directory itself"
)
_HINT_EVAL = (
    "--eval2000-dir must hold LDC2002S09/hub5e_00/english/*.sph and LDC2002T43/reference/ with "
    "english/*.txt, hub5e00.english.000405.stm and en20000405_hub5.glm"
)
_HINT_FISHER = (
    "each --fisher-dir must be a Fisher English transcript release, LDC2004T19 or LDC2005T19 "
    "(or its fe_03_p1_tran / fe_03_p2_tran directory), holding data/trans/NNN/fe_03_NNNNN.txt"
)
EVAL2000_STM = "hub5e00.english.000405.stm"
EVAL2000_GLM = "en20000405_hub5.glm"


def normalize_swbd_word(word: str) -> Optional[str]:
    """Map one MS-98 training token to our word (see the module docstring); None = drop it."""
    w = word.lower()
    if w in _DROP_TRAIN:
        return None
    if w in NOISE_WORDS:
        return NOISE_WORDS[w][0]
    m = re.fullmatch(r"\[laughter-(.+)\]", w)
    if m:
        w = m.group(1)
    m = re.fullmatch(r"\[[^\]/]*/([^\]/]+)\]", w)  # [bocket/bucket] -> bucket
    if m:
        w = m.group(1)
    m = re.fullmatch(r"\{(.+)\}", w)  # coinage
    if m:
        w = m.group(1)
    if "[" in w or "]" in w or w.startswith("-") or w.endswith("-") or not w:
        return UNK_WORD  # partial word (hel[lo]-, [th]at, -ing) or unknown marker
    return w.upper()


def normalize_swbd_text(text: str) -> str:
    """Kaldi swbd-style normalisation of an MS-98 transcript (``""`` if nothing is left)."""
    words = (normalize_swbd_word(w) for w in text.split())
    return " ".join(w for w in words if w)


def normalize_eval2000_text(text: str) -> str:
    """Normalise an LDC2002T43 reference line (see the module docstring)."""
    text = re.sub(r'<contraction\s[^"]*"[^"]*"\s*>', " ", text)  # e_form="[we=>we]['re=>are]"
    text = re.sub(r"</?[A-Za-z_]+[^<>]*>", " ", text)  # </contraction>, <b_aside>, ...
    text = re.sub(r"\{[^{}]*\}", " ", text)  # {breath}, {laugh}, ...
    text = re.sub(r"\[[^\[\]]*\]", " ", text)  # [distortion], [noise], ...
    text = text.replace("((", " ").replace("))", " ")
    out = []
    for w in text.split():
        w = w.strip(',.?!";:').lstrip("%")
        if not w:
            continue
        if w.startswith("-") or w.endswith("-"):
            out.append(UNK_WORD)
        else:
            out.append(w.upper())
    return " ".join(out)


def normalize_fisher_text(text: str) -> str:
    """Normalise one Fisher transcript line's words (see the module docstring)."""
    out = []
    for w in text.replace("((", " ").replace("))", " ").split():
        lw = w.lower()
        if lw in ("[laugh]", "[laughter]"):
            out.append(NOISE_WORDS["[laughter]"][0])
        elif re.fullmatch(r"\[[^\]]*\]", lw):
            out.append(NOISE_WORDS["[noise]"][0])
        elif lw.startswith("-") or lw.endswith("-") or "[" in lw or "]" in lw:
            out.append(UNK_WORD)
        else:
            out.append(w.upper())
    return " ".join(out)


def fisher_transcripts(fisher_dir: PathLike) -> List[Path]:
    """The ``fe_03_*.txt`` files of a Fisher transcript release (sorted); error naming the dir."""
    fisher_dir = Path(fisher_dir)
    if not fisher_dir.is_dir():
        raise FileNotFoundError(f"Fisher: {fisher_dir} does not exist. {_HINT_FISHER}")
    files = sorted(p for p in fisher_dir.rglob("*.txt") if p.parent.parent.name == "trans")
    if not files:
        raise FileNotFoundError(
            f"Fisher: no transcripts data/trans/NNN/*.txt under {fisher_dir}. {_HINT_FISHER}"
        )
    return files


def write_fisher_text(fisher_dirs: List[PathLike], out_path: PathLike) -> int:
    """Normalised Fisher transcript lines (``start end side: words``) -> plain text; returns lines."""
    lines = []
    for d in fisher_dirs:
        for f in fisher_transcripts(d):
            for raw in f.read_text(encoding="utf-8", errors="replace").splitlines():
                raw = raw.strip()
                if not raw or raw.startswith("#"):
                    continue
                m = re.match(r"^[\d.]+\s+[\d.]+\s+[AB]\d*:\s*(.*)$", raw)
                if m is None:
                    raise ValueError(
                        f"{f}: expected 'START END A|B: words', got {raw[:80]!r} (is this a "
                        "Fisher fe_03 transcript?)"
                    )
                text = normalize_fisher_text(m.group(1))
                if text:
                    lines.append(text + "\n")
    atomic_write_text(out_path, "".join(lines))
    return len(lines)


def convert_ms98_dictionary(dict_path: PathLike) -> Lexicon:
    """``sw-ms98-dict.text`` as a Kaldi lexicon (see the module docstring)."""
    dict_path = Path(dict_path)
    if not dict_path.is_file():
        raise FileNotFoundError(
            f"Switchboard: expected the MS-98 lexicon at {dict_path}, but it does not exist "
            "(it ships in swb_ms98_transcriptions/sw-ms98-dict.text); pass --lexicon FILE"
        )
    lexicon: Lexicon = []
    seen = set()
    for lineno, line in enumerate(dict_path.read_text(encoding="latin-1").splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) < 2:
            raise ValueError(
                f"{dict_path}:{lineno}: expected 'word phone [phone ...]', got {line.strip()!r}"
            )
        if fields[0].lower() in NOISE_WORDS or fields[0].lower() in _DROP_TRAIN:
            continue  # re-added below with Kaldi's phones
        word = normalize_swbd_word(fields[0])
        if word is None or word == UNK_WORD:
            continue
        pron = [p.upper() for p in fields[1:]]
        if (word, tuple(pron)) not in seen:
            seen.add((word, tuple(pron)))
            lexicon.append((word, pron))
    if not lexicon:
        raise ValueError(f"{dict_path}: no pronunciations found (is this sw-ms98-dict.text?)")
    lexicon.extend((w, [p]) for w, p in NOISE_WORDS.values())
    lexicon.append((SIL_WORD, [SIL_PHONE]))
    lexicon.append((UNK_WORD, [UNK_PHONE]))
    return lexicon


def _ms98_dir(transcripts_dir: Path) -> Path:
    for cand in (transcripts_dir / "swb_ms98_transcriptions", transcripts_dir):
        if cand.is_dir() and any(cand.rglob("*trans.text")):
            return cand
    raise FileNotFoundError(
        f"Switchboard: no MS-98 transcripts (*trans.text) under {transcripts_dir}. {_HINT_TRANS}"
    )


def _check_inputs(audio_dir: Path, transcripts_dir: Path) -> Path:
    if not audio_dir.is_dir():
        raise FileNotFoundError(
            f"Switchboard: audio directory {audio_dir} does not exist. {_HINT_AUDIO}"
        )
    sph = sorted(audio_dir.rglob("*.sph"))
    if not sph:
        raise FileNotFoundError(f"Switchboard: no .sph files under {audio_dir}. {_HINT_AUDIO}")
    if not transcripts_dir.is_dir():
        raise FileNotFoundError(
            f"Switchboard: transcripts directory {transcripts_dir} does not exist. {_HINT_TRANS}"
        )
    ms98 = _ms98_dir(transcripts_dir)
    have = {p.name.split("-")[0] for p in ms98.rglob("*trans.text")}
    missing = [
        p.name
        for p in sph
        if any(f"{p.stem.replace('sw0', 'sw')}{side}" not in have for side in "AB")
    ]
    if missing:
        raise FileNotFoundError(
            f"Switchboard: {len(missing)} of {len(sph)} conversations have no MS-98 transcripts "
            f"for both sides (expected swNNNN{{A,B}}-ms98-a-trans.text under {ms98}), e.g. "
            f"{missing[:3]}. Is --transcripts-dir the MS-98 release for this audio?"
        )
    return ms98


@contextmanager
def _sph_reader() -> Iterator[None]:
    """lhotse's default (sph2pipe) when available, else libsndfile for SPHERE headers."""
    if shutil.which("sph2pipe"):
        yield
        return
    from lhotse.audio.backend import get_current_audio_backend, set_current_audio_backend

    log.warning(
        "sph2pipe is not on PATH: reading SPHERE headers with libsndfile (uncompressed SPHERE "
        "only). Install sph2pipe before computing features of Switchboard."
    )
    previous = get_current_audio_backend()
    set_current_audio_backend("LibsndfileBackend")
    try:
        yield
    except Exception as e:
        if ".sph" in str(e).lower():
            raise ValueError(
                f"cannot read SPHERE audio without sph2pipe ({e}); LDC's shorten-compressed "
                "SPHERE needs it: put sph2pipe on PATH (e.g. from Kaldi's tools/ or 'lhotse "
                "install-sph2pipe') and retry"
            ) from e
        raise
    finally:
        set_current_audio_backend(previous)


def _side(channel) -> str:
    ch = channel[0] if isinstance(channel, list) else channel
    return "AB"[int(ch)]


def _load_swbd(audio_dir: Path, ms98: Path):
    from lhotse.recipes import prepare_switchboard
    from lhotse.utils import fastcopy

    with _sph_reader():
        m = prepare_switchboard(
            audio_dir, transcripts_dir=ms98, output_dir=None, omit_silence=True, absolute_paths=True
        )
    sups = []
    dropped = 0
    for s in m["supervisions"]:
        text = normalize_swbd_text(s.text or "")
        if not text:
            dropped += 1
            continue
        sups.append(
            fastcopy(s, text=text, speaker=f"{s.recording_id}-{_side(s.channel)}")
        )
    # Kaldi's order: conversation, side, start time
    sups.sort(key=lambda s: (s.recording_id, _side(s.channel), s.start, s.id))
    log.info(
        "Switchboard: %d utterances (%d empty after normalisation dropped)", len(sups), dropped
    )
    return m["recordings"], sups


def _check_eval2000(eval2000_dir: Path) -> None:
    """LDC2002S09 audio, LDC2002T43 transcripts, stm and glm; error naming what is missing."""
    audio = eval2000_dir / "LDC2002S09" / "hub5e_00" / "english"
    trans = eval2000_dir / "LDC2002T43" / "reference" / "english"
    for d, what in ((audio, "audio"), (trans, "transcripts")):
        if not d.is_dir():
            raise FileNotFoundError(
                f"eval2000: the {what} directory {d} does not exist. {_HINT_EVAL}"
            )
    if not any(audio.glob("*.sph")) or not any(trans.rglob("*.txt")):
        raise FileNotFoundError(
            f"eval2000: no *.sph in {audio} or no *.txt in {trans}. {_HINT_EVAL}"
        )
    for name in (EVAL2000_STM, EVAL2000_GLM):
        if not (trans.parent / name).is_file():
            raise FileNotFoundError(
                f"eval2000: the scoring file {trans.parent / name} does not exist (NIST scoring "
                f"needs the stm and glm of LDC2002T43). {_HINT_EVAL}"
            )


def _load_eval2000(eval2000_dir: Path):
    from lhotse.recipes import prepare_eval2000
    from lhotse.utils import fastcopy

    _check_eval2000(eval2000_dir)
    with tempfile.TemporaryDirectory() as tmp, _sph_reader():
        # prepare_eval2000 always writes its own (unnormalised) manifests; keep them out of ours
        m = prepare_eval2000(eval2000_dir, tmp, absolute_paths=True)
    sups = []
    for s in m["supervisions"]:
        text = normalize_eval2000_text(s.text or "")
        if text:
            sups.append(fastcopy(s, text=text))
    sups.sort(key=lambda s: (s.recording_id, _side(s.channel), s.start, s.id))
    return m["recordings"], sups


def split_dev(sups: List, num_dev_utts: int, dev_split: str = "first", seed: int = 0):
    """Split sorted training supervisions into ``(train, dev)`` (see the module docstring)."""
    if dev_split not in DEV_SPLITS:
        raise ValueError(f"dev_split must be one of {DEV_SPLITS}, got {dev_split!r}")
    if num_dev_utts < 0 or num_dev_utts >= len(sups):
        raise ValueError(
            f"num_dev_utts must be in [0, {len(sups) - 1}] (there are {len(sups)} training "
            f"utterances and train needs at least one), got {num_dev_utts}"
        )
    if dev_split == "first":
        return sups[num_dev_utts:], sups[:num_dev_utts]
    by_conv: "OrderedDict[str, List]" = OrderedDict()
    for s in sups:
        by_conv.setdefault(s.recording_id, []).append(s)
    convs = list(by_conv)
    random.Random(seed).shuffle(convs)
    dev_convs, n = set(), 0
    for c in convs:
        if n >= num_dev_utts or len(dev_convs) == len(convs) - 1:
            break
        dev_convs.add(c)
        n += len(by_conv[c])
    return (
        [s for s in sups if s.recording_id not in dev_convs],
        [s for s in sups if s.recording_id in dev_convs],
    )


def remove_dup_utts(sups: List, max_count: int) -> List:
    """Keep at most ``max_count`` utterances per identical transcript (Kaldi's train_nodup)."""
    seen: Counter = Counter()
    out = []
    for s in sups:
        seen[s.text] += 1
        if seen[s.text] <= max_count:
            out.append(s)
    return out


def prepare_swbd(
    audio_dir: PathLike,
    transcripts_dir: PathLike,
    output_dir: PathLike,
    *,
    eval2000_dir: Optional[PathLike] = None,
    lexicon: Optional[PathLike] = None,
    fisher_dirs: Sequence[PathLike] = (),
    num_dev_utts: int = 4000,
    seed: int = 0,
    dev_split: str = "first",
    max_dup_utts: Optional[int] = 300,
) -> Dict[str, Dict[str, object]]:
    """Write Switchboard (+ eval2000) lhotse manifests and the lexicon into ``output_dir``.

    Args:
      audio_dir: LDC97S62 (``swb1/*.sph``, searched recursively).
      transcripts_dir: directory holding ``swb_ms98_transcriptions/`` (or that directory).
      output_dir: where ``swbd_{recordings,supervisions}_{train,dev,eval2000}.jsonl.gz``,
        ``swbd_lexicon.txt`` and the marker ``.swbd.done`` go.
      eval2000_dir: root holding ``LDC2002S09/`` and ``LDC2002T43/``; None = no eval2000 split.
      lexicon: the MS-98 dictionary; None = ``swb_ms98_transcriptions/sw-ms98-dict.text``.
      fisher_dirs: Fisher transcript releases (LDC2004T19, LDC2005T19) for
        ``swbd_fisher_text.txt``; empty = none.
      num_dev_utts: utterances held out as ``dev`` (0 = no dev split).
      seed: seed of ``dev_split="conversations"``.
      dev_split: ``"first"`` (Kaldi's train_dev) or ``"conversations"``.
      max_dup_utts: Kaldi's train_nodup limit for train (None = keep duplicates).

    Returns:
      ``{split: {"recordings": RecordingSet, "supervisions": SupervisionSet}}``. A second call
      with the same arguments only loads the manifests.

    Raises:
      FileNotFoundError: a missing directory or file, naming what was expected.
      ValueError: bad ``num_dev_utts``/``dev_split`` or a malformed lexicon.
    """
    lhotse = optional_import("lhotse")
    audio_dir, transcripts_dir = Path(audio_dir), Path(transcripts_dir)
    output_dir = Path(output_dir)
    ms98 = _check_inputs(audio_dir, transcripts_dir)
    dict_path = Path(lexicon) if lexicon is not None else ms98 / "sw-ms98-dict.text"
    if eval2000_dir is not None:
        if not Path(eval2000_dir).is_dir():
            raise FileNotFoundError(
                f"eval2000 directory {eval2000_dir} does not exist. {_HINT_EVAL}"
            )
        _check_eval2000(Path(eval2000_dir))
    if max_dup_utts is not None and max_dup_utts < 1:
        raise ValueError(f"max_dup_utts must be >= 1 or None, got {max_dup_utts}")
    config = {
        "audio_dir": str(audio_dir.resolve()),
        "transcripts_dir": str(ms98.resolve()),
        "eval2000_dir": None if eval2000_dir is None else str(Path(eval2000_dir).resolve()),
        "lexicon": str(dict_path.resolve()),
        "fisher_dirs": [str(Path(d).resolve()) for d in fisher_dirs],
        "num_dev_utts": num_dev_utts,
        "seed": seed,
        "dev_split": dev_split,
        "max_dup_utts": max_dup_utts,
    }
    done = output_dir / f".{PREFIX}.done"
    marker = read_done(done)
    if marker is not None and marker.get("config") == config:
        splits = marker["splits"]
        paths = [recordings_path(output_dir, PREFIX, s) for s in splits]
        paths += [supervisions_path(output_dir, PREFIX, s) for s in splits]
        paths += [output_dir / n for n in marker.get("extra_files", [])]
        if all(p.is_file() for p in paths) and lexicon_path(output_dir, PREFIX).is_file():
            log.info("Switchboard manifests in %s are up to date (%s); skipping", output_dir, done)
            return {
                s: {
                    "recordings": lhotse.load_manifest(recordings_path(output_dir, PREFIX, s)),
                    "supervisions": lhotse.load_manifest(supervisions_path(output_dir, PREFIX, s)),
                }
                for s in splits
            }

    lex = convert_ms98_dictionary(dict_path)  # fail early, before reading the audio headers
    fisher_files = [fisher_transcripts(d) for d in fisher_dirs]  # (checks the directories)
    recordings, sups = _load_swbd(audio_dir, ms98)
    train, dev = split_dev(sups, num_dev_utts, dev_split, seed)
    if max_dup_utts is not None:
        n = len(train)
        train = remove_dup_utts(train, max_dup_utts)
        log.info(
            "train_nodup: %d of %d utterances kept (<= %d per transcript)",
            len(train),
            n,
            max_dup_utts,
        )
    parts: "OrderedDict[str, tuple]" = OrderedDict(train=(recordings, train))
    if num_dev_utts > 0:
        parts["dev"] = (recordings, dev)
    if eval2000_dir is not None:
        parts["eval2000"] = _load_eval2000(Path(eval2000_dir))
    else:
        log.warning("Switchboard: no --eval2000-dir; writing train/dev only")

    output_dir.mkdir(parents=True, exist_ok=True)
    manifests: Dict[str, Dict[str, object]] = {}
    for split, (recs, split_sups) in parts.items():
        used = {s.recording_id for s in split_sups}
        rec_set = lhotse.RecordingSet.from_recordings(r for r in recs if r.id in used)
        sup_set = lhotse.SupervisionSet.from_segments(split_sups)
        save_manifest(rec_set, recordings_path(output_dir, PREFIX, split))
        save_manifest(sup_set, supervisions_path(output_dir, PREFIX, split))
        manifests[split] = {"recordings": rec_set, "supervisions": sup_set}
        log.info(
            "Switchboard %s: %d utterances, %d recordings, %d speakers, %.2f h",
            split,
            len(split_sups),
            len(rec_set),
            len({s.speaker for s in split_sups}),
            sum(s.duration for s in split_sups) / 3600,
        )
    for stale in ("train", "dev", "eval2000"):
        if stale not in parts:
            for p in (
                recordings_path(output_dir, PREFIX, stale),
                supervisions_path(output_dir, PREFIX, stale),
            ):
                if p.is_file():
                    log.info("removing %s (no %s split in this configuration)", p, stale)
                    p.unlink()
    extra = []
    if eval2000_dir is not None:
        ref_dir = Path(eval2000_dir) / "LDC2002T43" / "reference"
        for name, ours in ((EVAL2000_STM, "swbd_eval2000.stm"), (EVAL2000_GLM, "swbd_eval2000.glm")):
            atomic_write_bytes(output_dir / ours, (ref_dir / name).read_bytes())
            extra.append(ours)
    if fisher_dirs:
        n = write_fisher_text(list(fisher_dirs), output_dir / "swbd_fisher_text.txt")
        log.info("Fisher LM text: %d lines from %d transcript files -> %s", n,
                 sum(len(f) for f in fisher_files), output_dir / "swbd_fisher_text.txt")
        extra.append("swbd_fisher_text.txt")
    write_lexicon(lexicon_path(output_dir, PREFIX), lex)
    write_done(done, {"config": config, "splits": list(parts), "extra_files": extra})
    return manifests
