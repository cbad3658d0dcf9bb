"""AN4 (CMU Census database): lhotse manifests, speaker-disjoint dev split and lexicon.

Source: Carnegie Mellon University, "AN4" alphanumeric database (recorded 1991; A. Acero,
"Acoustical and environmental robustness in automatic speech recognition", Kluwer 1993),
distributed by CMU Sphinx at http://www.speech.cs.cmu.edu/databases/an4/ as
``an4_sphere.tar.gz`` (NIST SPHERE audio) and ``an4_raw.bigendian.tar.gz`` (headerless audio).

Licence: free for any use, commercial or otherwise, under CMU's BSD-style terms (keep the
copyright notice; the ``LICENSE`` file ships with the corpus).

Content: 16 kHz, 16-bit, close-talking microphone; spoken letters, digits, numbers, dates and
short commands ("ERASE C B J V C THIRTY FIVE", "S H A R O N", "REPEAT"). Training part: 948
utterances from 74 speakers (21 female, 53 male); official test part: 130 utterances from 10
other speakers.

Layout expected under ``corpus_dir`` (the CMU distribution, audio as ``.wav`` or ``.sph``)::

    etc/an4.dic                 pronunciations, alternates as WORD(2)
    etc/an4.phone               phone set (34 phones incl. SIL)
    etc/an4.filler              <s>, </s>, <sil> -> SIL
    etc/an4_train.fileids       an4_clstk/fash/an251-fash-b           (optional)
    etc/an4_train.transcription <s> YES </s> (an251-fash-b)
    etc/an4_test.fileids        an4test_clstk/fcaw/an406-fcaw-b       (optional)
    etc/an4_test.transcription  test part (optional)
    wav/an4_clstk/<speaker>/<utt>.{wav,sph}
    wav/an4test_clstk/<speaker>/<utt>.{wav,sph}                        (optional)

Splits written by :func:`prepare_an4`:

- ``dev``: ``num_dev_speakers`` whole training speakers (speaker-disjoint from ``train``). The
  first letter of an AN4 speaker id encodes gender (``f``/``m``), so dev is gender-balanced:
  ``num_dev_speakers // 2`` female and the rest male, each group sampled with
  ``random.Random(seed)`` from its sorted speaker list (at least one speaker of each gender stays
  in train). With the defaults (8 speakers, seed 0) that is 4 female + 4 male speakers.
- ``dev2``: ``num_dev2_speakers`` further whole training speakers, chosen the same way (seed
  ``seed + 1``) among the speakers not in ``dev``: a second speaker-disjoint evaluation set that
  is never used for tuning (model selection, LM scales and compression settings use ``dev``),
  so that a result tuned on ``dev`` can be confirmed on unseen speakers. 0 disables it.
- ``train``: the other training speakers.
- ``test``: the official test part, when ``wav/an4test_clstk`` and
  ``etc/an4_test.transcription`` exist; otherwise there is no test split (logged).

Audio: ``.wav`` files are referenced in place; ``.sph`` files (the ``an4_sphere.tar.gz``
download) are converted once to ``output_dir/wav/.../<utt>.wav``, because lhotse reads SPHERE
only through the external ``sph2pipe`` binary. The headerless ``.raw`` variant is not supported.

Transcripts: ``<s>``, ``</s>``, fillers and the trailing ``(uttid)`` are removed and words are
upper-cased. The lexicon ``an4_lexicon.txt`` is ``etc/an4.dic`` in Kaldi format with alternates
``A(2)`` written as ``A``, plus ``<sil> SIL`` and ``<UNK> SPN``.
"""

import logging
import random
import re
import shutil
import tarfile
import urllib.request
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from k2quant.data.lexicon import (
    AN4_PHONES,
    SIL_PHONE,
    SIL_WORD,
    UNK_PHONE,
    UNK_WORD,
    Lexicon,
    write_lexicon,
)
from k2quant.data.manifests import (
    lexicon_path,
    read_done,
    recordings_path,
    save_manifest,
    supervisions_path,
    write_done,
)
from k2quant.utils.deps import optional_import
from k2quant.utils.io import PathLike, atomic_open

log = logging.getLogger(__name__)

#: AN4 is 16 kHz, 16-bit mono; preparation rejects any other audio, naming the file.
SAMPLING_RATE = 16000

AN4_URL = "http://www.speech.cs.cmu.edu/databases/an4/an4_sphere.tar.gz"
AUDIO_EXTENSIONS = (".wav", ".sph", ".WAV", ".SPH", ".flac")
_PARTS = {"train": "an4_clstk", "test": "an4test_clstk"}
_DOWNLOAD_HINT = (
    "Point --corpus-dir at an extracted AN4 corpus (the directory holding etc/ and wav/), or "
    "run 'k2quant prepare-an4 --corpus-dir DIR --output-dir OUT --download' to fetch it from "
    f"CMU ({AN4_URL})."
)


@dataclass(frozen=True)
class An4Utterance:
    """One utterance of the corpus (metadata only; no audio is read)."""

    utt_id: str  # e.g. "an251-fash-b"
    speaker: str  # e.g. "fash"
    text: str  # normalised transcript, e.g. "YES"
    audio: Path  # the .wav/.sph file

    @property
    def gender(self) -> Optional[str]:
        return {"f": "F", "m": "M"}.get(self.speaker[:1].lower())


def normalize_transcript(line: str) -> Tuple[str, Optional[str]]:
    """Split an AN4 transcription line into ``(TEXT, utt_id)``.

    ``"<s> u m n y h six </s> (an255-fash-b)"`` -> ``("U M N Y H SIX", "an255-fash-b")``.
    Sentence markers and fillers (``<...>`` tokens) are dropped; words are upper-cased. The id is
    None when the line has no trailing ``(id)``.
    """
    line = line.strip()
    utt_id = None
    m = re.search(r"\(([^()\s]+)\)\s*$", line)
    if m:
        utt_id = m.group(1)
        line = line[: m.start()]
    words = [w.upper() for w in line.split() if not (w.startswith("<") and w.endswith(">"))]
    return " ".join(words), utt_id


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"AN4: expected {what} at {path}, but it does not exist. {_DOWNLOAD_HINT}"
        )
    return path


def _find_audio(stem: Path) -> Optional[Path]:
    for ext in AUDIO_EXTENSIONS:
        p = stem.with_name(stem.name + ext)
        if p.is_file():
            return p
    return None


def load_an4_part(corpus_dir: PathLike, part: str = "train") -> List[An4Utterance]:
    """Read the transcription (and fileids, if present) of one AN4 part; no audio is read.

    Args:
      corpus_dir: the AN4 root (holding ``etc/`` and ``wav/``).
      part: ``"train"`` (``an4_clstk``) or ``"test"`` (``an4test_clstk``).

    Returns:
      Utterances in transcription order.

    Raises:
      FileNotFoundError: naming the missing directory/file (transcription, audio directory, or
        audio files; the message counts missing audio and shows the first few).
      ValueError: on a malformed transcription line or duplicate utterance ids.
    """
    if part not in _PARTS:
        raise ValueError(f"part must be one of {sorted(_PARTS)}, got {part!r}")
    corpus_dir = Path(corpus_dir)
    sub = _PARTS[part]
    trans = _require(corpus_dir / "etc" / f"an4_{part}.transcription", f"the {part} transcription")
    wav_dir = _require(
        corpus_dir / "wav" / sub, f"the {part} audio directory (wav/{sub}/<speaker>/)"
    )
    fileids: Dict[str, str] = {}
    fileids_path = corpus_dir / "etc" / f"an4_{part}.fileids"
    if fileids_path.is_file():
        for line in fileids_path.read_text(encoding="utf-8").split():
            fileids[Path(line).name] = line  # an4_clstk/fash/an251-fash-b
    utts: List[An4Utterance] = []
    seen = set()
    missing: List[str] = []
    for lineno, line in enumerate(trans.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        text, utt_id = normalize_transcript(line)
        if utt_id is None:
            raise ValueError(
                f"{trans}:{lineno}: expected '<s> WORDS </s> (utt-id)', got {line.strip()!r}"
            )
        if utt_id in seen:
            raise ValueError(f"{trans}:{lineno}: duplicate utterance id {utt_id!r}")
        seen.add(utt_id)
        if utt_id in fileids:
            rel = fileids[utt_id]
            speaker = Path(rel).parent.name
            stem = corpus_dir / "wav" / rel
        else:
            # an251-fash-b: the speaker is the middle field.
            fields = utt_id.split("-")
            if len(fields) < 3:
                raise ValueError(
                    f"{trans}:{lineno}: utterance id {utt_id!r} is not in {fileids_path.name} and "
                    "does not look like 'prompt-speaker-b'"
                )
            speaker = fields[1]
            stem = wav_dir / speaker / utt_id
        audio = _find_audio(stem)
        if audio is None:
            missing.append(str(stem) + ".{wav,sph}")
            continue
        utts.append(An4Utterance(utt_id=utt_id, speaker=speaker, text=text, audio=audio))
    if missing:
        raise FileNotFoundError(
            f"AN4 {part}: {len(missing)} of {len(missing) + len(utts)} audio files listed in "
            f"{trans} are missing, e.g. {missing[:3]}. Expected .wav or .sph files (the .raw "
            f"variant is not supported). {_DOWNLOAD_HINT}"
        )
    return utts


def choose_dev_speakers(speakers: Sequence[str], num_dev_speakers: int, seed: int = 0) -> List[str]:
    """Pick ``num_dev_speakers`` speakers for dev, deterministically and gender-balanced.

    When every speaker id starts with ``f`` or ``m`` (AN4's gender code), dev gets
    ``num_dev_speakers // 2`` female and ``num_dev_speakers - num_dev_speakers // 2`` male speakers,
    but at most ``n_gender - 1`` of a gender (the shortfall moves to the other gender); each group
    is sampled with ``random.Random(seed)`` from its sorted list. Otherwise speakers are sampled
    uniformly. Returns the sorted dev speakers.
    """
    speakers = sorted(set(speakers))
    if num_dev_speakers < 0 or num_dev_speakers >= len(speakers):
        raise ValueError(
            f"num_dev_speakers must be in [0, {len(speakers) - 1}] (there are {len(speakers)} "
            f"training speakers and train needs at least one), got {num_dev_speakers}"
        )
    rng = random.Random(seed)
    groups = {g: [s for s in speakers if s[:1].lower() == g] for g in "fm"}
    if sum(len(v) for v in groups.values()) != len(speakers) or not all(groups.values()):
        return sorted(rng.sample(speakers, num_dev_speakers))
    want = {"f": num_dev_speakers // 2, "m": num_dev_speakers - num_dev_speakers // 2}
    cap = {g: len(groups[g]) - 1 for g in "fm"}
    for g, other in (("f", "m"), ("m", "f")):
        if want[g] > cap[g]:
            want[other] += want[g] - cap[g]
            want[g] = cap[g]
    if want["f"] > cap["f"] or want["m"] > cap["m"]:  # only if nearly all speakers go to dev
        return sorted(rng.sample(speakers, num_dev_speakers))
    dev = rng.sample(groups["f"], want["f"]) + rng.sample(groups["m"], want["m"])
    return sorted(dev)


def split_an4(
    corpus_dir: PathLike, *, num_dev_speakers: int = 8, num_dev2_speakers: int = 0, seed: int = 0
) -> "OrderedDict[str, List[An4Utterance]]":
    """Read AN4's metadata and split it into train/dev(/dev2)(/test); no audio is read.

    Returns an ordered dict ``split -> utterances`` with keys ``train``, ``dev`` (if
    ``num_dev_speakers > 0``), ``dev2`` (if ``num_dev2_speakers > 0``) and ``test`` (if the
    official test part is present). ``dev`` does not depend on ``num_dev2_speakers``.
    """
    corpus_dir = Path(corpus_dir)
    if not corpus_dir.is_dir():
        raise FileNotFoundError(
            f"AN4 corpus directory {corpus_dir} does not exist. {_DOWNLOAD_HINT}"
        )
    train_all = load_an4_part(corpus_dir, "train")
    dev_speakers = set(choose_dev_speakers([u.speaker for u in train_all], num_dev_speakers, seed))
    rest = [u.speaker for u in train_all if u.speaker not in dev_speakers]
    if num_dev2_speakers < 0 or num_dev2_speakers >= len(set(rest)):
        raise ValueError(
            f"num_dev2_speakers must be in [0, {len(set(rest)) - 1}] ({len(set(rest))} training "
            f"speakers are left after dev and train needs at least one), got {num_dev2_speakers}")
    dev2_speakers = set(choose_dev_speakers(rest, num_dev2_speakers, seed + 1))
    held_out = dev_speakers | dev2_speakers
    splits: "OrderedDict[str, List[An4Utterance]]" = OrderedDict()
    splits["train"] = [u for u in train_all if u.speaker not in held_out]
    if num_dev_speakers > 0:
        splits["dev"] = [u for u in train_all if u.speaker in dev_speakers]
    if num_dev2_speakers > 0:
        splits["dev2"] = [u for u in train_all if u.speaker in dev2_speakers]
    test_dir = corpus_dir / "wav" / _PARTS["test"]
    test_trans = corpus_dir / "etc" / "an4_test.transcription"
    if test_dir.is_dir() and test_trans.is_file():
        splits["test"] = load_an4_part(corpus_dir, "test")
    else:
        log.warning(
            "AN4: no official test part (need %s and %s); writing train/dev only",
            test_trans,
            test_dir,
        )
    return splits


def convert_an4_dictionary(corpus_dir: PathLike) -> Lexicon:
    """``etc/an4.dic`` (+ ``etc/an4.filler``) as a Kaldi lexicon.

    Alternates ``WORD(2)`` become extra lines for ``WORD``; duplicate pronunciations are dropped.
    Appends ``<sil> SIL`` (AN4's silence filler) and ``<UNK> SPN``; the sentence markers
    ``<s>``/``</s>`` of ``an4.filler`` are not words of the lexicon. Phones are checked against
    ``etc/an4.phone`` when it exists (else against :data:`AN4_PHONES`).
    """
    corpus_dir = Path(corpus_dir)
    dic = _require(corpus_dir / "etc" / "an4.dic", "the pronunciation dictionary")
    phone_file = corpus_dir / "etc" / "an4.phone"
    phones = set(phone_file.read_text().split()) if phone_file.is_file() else set(AN4_PHONES)
    lexicon: Lexicon = []
    seen = set()
    for lineno, line in enumerate(dic.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 2:
            raise ValueError(f"{dic}:{lineno}: expected 'WORD PHONE ...', got {line.strip()!r}")
        word = re.sub(r"\(\d+\)$", "", fields[0]).upper()
        pron = fields[1:]
        bad = [p for p in pron if p not in phones]
        if bad:
            raise ValueError(
                f"{dic}:{lineno}: phones {bad} of {fields[0]} are not in the phone set "
                f"{sorted(phones)} ({phone_file})"
            )
        if (word, tuple(pron)) not in seen:
            seen.add((word, tuple(pron)))
            lexicon.append((word, pron))
    lexicon.append((SIL_WORD, [SIL_PHONE]))
    lexicon.append((UNK_WORD, [UNK_PHONE]))
    return lexicon


def _as_wav(sph: Path, corpus_dir: Path, output_dir: Path) -> Path:
    """Convert a NIST SPHERE file to ``output_dir/wav/<path under corpus_dir/wav>.wav`` once.

    lhotse reads ``.sph`` only through the external ``sph2pipe`` binary; AN4's SPHERE files are
    uncompressed PCM, which libsndfile reads, so they are converted to WAV during preparation.
    """
    sf = optional_import("soundfile")
    try:
        rel = sph.resolve().relative_to((corpus_dir / "wav").resolve())
    except ValueError:
        rel = Path(sph.name)
    wav = (output_dir / "wav" / rel).with_suffix(".wav")
    if wav.is_file():
        return wav
    try:
        samples, sr = sf.read(str(sph), dtype="int16")
    except RuntimeError as e:  # soundfile.LibsndfileError derives from RuntimeError
        raise ValueError(
            f"cannot read {sph} with libsndfile ({e}); shorten-compressed SPHERE is not supported: "
            f"convert the corpus to .wav (e.g. sph2pipe -f wav) and retry"
        ) from e
    with atomic_open(wav, "wb") as f:
        sf.write(f, samples, sr, format="WAV", subtype="PCM_16")
    return wav


def prepare_an4(
    corpus_dir: PathLike,
    output_dir: PathLike,
    *,
    num_dev_speakers: int = 8,
    num_dev2_speakers: int = 0,
    seed: int = 0,
) -> Dict[str, Dict[str, object]]:
    """Write AN4 lhotse manifests and lexicon into ``output_dir``.

    Files: ``an4_recordings_{split}.jsonl.gz``, ``an4_supervisions_{split}.jsonl.gz`` for each
    split (see the module docstring), ``an4_lexicon.txt``, and the marker ``.an4.done``. A second
    call with the same arguments only loads the manifests (no-op).

    Returns:
      ``{split: {"recordings": RecordingSet, "supervisions": SupervisionSet}}``.
    """
    lhotse = optional_import("lhotse")
    corpus_dir, output_dir = Path(corpus_dir), Path(output_dir)
    config = {
        "corpus_dir": str(corpus_dir.resolve()),
        "num_dev_speakers": num_dev_speakers,
        "num_dev2_speakers": num_dev2_speakers,
        "seed": seed,
    }
    done = output_dir / ".an4.done"
    marker = read_done(done)
    if marker is not None and marker.get("config") == config:
        splits = marker["splits"]
        paths = [recordings_path(output_dir, "an4", s) for s in splits]
        paths += [supervisions_path(output_dir, "an4", s) for s in splits]
        if all(p.is_file() for p in paths) and lexicon_path(output_dir, "an4").is_file():
            log.info("AN4 manifests in %s are up to date (%s); skipping", output_dir, done)
            return {
                s: {
                    "recordings": lhotse.load_manifest(recordings_path(output_dir, "an4", s)),
                    "supervisions": lhotse.load_manifest(supervisions_path(output_dir, "an4", s)),
                }
                for s in splits
            }

    splits = split_an4(corpus_dir, num_dev_speakers=num_dev_speakers,
                       num_dev2_speakers=num_dev2_speakers, seed=seed)
    lexicon = convert_an4_dictionary(corpus_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    manifests: Dict[str, Dict[str, object]] = {}
    for split, utts in splits.items():
        recordings, supervisions = [], []
        for u in utts:
            audio = (
                _as_wav(u.audio, corpus_dir, output_dir)
                if u.audio.suffix.lower() == ".sph"
                else u.audio
            )
            rec = lhotse.Recording.from_file(audio.resolve(), recording_id=u.utt_id)
            if rec.sampling_rate != SAMPLING_RATE or rec.num_channels != 1:
                raise ValueError(
                    f"AN4: {audio} is {rec.sampling_rate} Hz with {rec.num_channels} channel(s), "
                    f"but the AN4 corpus is {SAMPLING_RATE} Hz mono; is --corpus-dir the CMU "
                    "AN4 distribution (wav/ of an4_sphere.tar.gz or an4_raw converted to WAV)?"
                )
            recordings.append(rec)
            supervisions.append(
                lhotse.SupervisionSegment(
                    id=u.utt_id,
                    recording_id=u.utt_id,
                    start=0.0,
                    duration=rec.duration,
                    channel=0,
                    text=u.text,
                    language="English",
                    speaker=u.speaker,
                    gender=u.gender,
                )
            )
        rec_set = lhotse.RecordingSet.from_recordings(recordings)
        sup_set = lhotse.SupervisionSet.from_segments(supervisions)
        save_manifest(rec_set, recordings_path(output_dir, "an4", split))
        save_manifest(sup_set, supervisions_path(output_dir, "an4", split))
        manifests[split] = {"recordings": rec_set, "supervisions": sup_set}
        spk = Counter(u.speaker for u in utts)
        hours = sum(r.duration for r in recordings) / 3600
        log.info(
            "AN4 %s: %d utterances, %d speakers (%d f / %d m), %.3f h",
            split,
            len(utts),
            len(spk),
            sum(1 for s in spk if s.startswith("f")),
            sum(1 for s in spk if s.startswith("m")),
            hours,
        )
    for stale in ("train", "dev", "dev2", "test"):  # e.g. dev of an earlier run with num_dev_speakers > 0
        if stale not in splits:
            for path in (
                recordings_path(output_dir, "an4", stale),
                supervisions_path(output_dir, "an4", stale),
            ):
                if path.is_file():
                    log.info("removing %s (no %s split in this configuration)", path, stale)
                    path.unlink()
    write_lexicon(lexicon_path(output_dir, "an4"), lexicon)
    write_done(done, {"config": config, "splits": list(splits)})
    return manifests


def download_an4(target_dir: PathLike, *, url: str = AN4_URL, force: bool = False) -> Path:
    """Download and extract AN4 (NIST SPHERE audio) so that ``target_dir`` is the corpus root.

    Only called on explicit request (``k2quant prepare-an4 --download``). Skips the download when
    ``target_dir/etc/an4_train.transcription`` already exists (unless ``force``). The archive is
    kept next to ``target_dir`` as ``an4_sphere.tar.gz`` and reused if present.

    Returns:
      ``target_dir``.
    """
    target_dir = Path(target_dir)
    if not force and (target_dir / "etc" / "an4_train.transcription").is_file():
        log.info("AN4 already present in %s; not downloading", target_dir)
        return target_dir
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    archive = target_dir.parent / Path(url).name
    if force or not archive.is_file():
        log.info("downloading %s -> %s", url, archive)
        tmp = archive.with_name(f".tmp-{archive.name}")
        with urllib.request.urlopen(url) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f, length=1 << 20)
        tmp.replace(archive)
    extract_dir = target_dir.parent / f".tmp-extract-{target_dir.name}"
    shutil.rmtree(extract_dir, ignore_errors=True)
    extract_dir.mkdir()
    with tarfile.open(archive) as tar:
        root = extract_dir.resolve()
        for member in tar.getmembers():
            dest = (extract_dir / member.name).resolve()
            outside = root not in dest.parents and dest != root
            if outside or member.issym() or member.islnk():
                raise ValueError(f"refusing to extract unsafe member {member.name!r} of {archive}")
        tar.extractall(extract_dir)
    found = [p.parent.parent for p in extract_dir.glob("**/etc/an4_train.transcription")]
    if len(found) != 1:
        raise ValueError(
            f"{archive} does not look like AN4: no single etc/an4_train.transcription inside"
        )
    if target_dir.exists():
        if any(target_dir.iterdir()):
            raise FileExistsError(
                f"cannot extract AN4 to {target_dir}: the directory exists and is not empty (and "
                f"holds no etc/an4_train.transcription). Remove it or choose another --corpus-dir; "
                f"the extracted corpus is in {found[0]}"
            )
        target_dir.rmdir()
    found[0].rename(target_dir)
    shutil.rmtree(extract_dir, ignore_errors=True)
    log.info("AN4 extracted to %s", target_dir)
    return target_dir
