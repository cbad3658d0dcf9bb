"""AN4 preparation on a tiny fake corpus (and metadata checks on the real one when present)."""

import os
from pathlib import Path

import numpy as np
import pytest

lhotse = pytest.importorskip("lhotse")
sf = pytest.importorskip("soundfile")

from k2quant.data.an4 import (  # noqa: E402
    choose_dev_speakers,
    convert_an4_dictionary,
    normalize_transcript,
    prepare_an4,
    split_an4,
)
from k2quant.data.lexicon import read_lexicon  # noqa: E402

# The real corpus, if present: $K2QUANT_AN4_DIR or shared/data/an4 beside the repository.
REAL_AN4 = Path(
    os.environ.get("K2QUANT_AN4_DIR")
    or Path(__file__).resolve().parents[2] / "shared" / "data" / "an4"
)

DIC = """A                    AH
A(2)                 EY
B                    B IY
GO                   G OW
TWENTY               T W EH N IY
TWENTY(2)            T W EH N T IY
YES                  Y EH S
"""
PHONES = "AA AE AH AO AW AY B CH D EH ER EY F G HH IH IY JH K L M N OW P R S SIL T TH UW V W Y Z"
TRAIN_SPEAKERS = ["fabc", "fdef", "fghi", "mabc", "mdef", "mghi", "mjkl"]
TEXTS = ["<s> yes </s>", "<s> A B TWENTY </s>", "<s> go <sil> </s>"]


def _wav(path: Path, seconds: float = 0.3, fmt: str = "WAV"):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(16000 * seconds))
    x = (3000 * np.sin(2 * np.pi * 220 * t / 16000)).astype(np.int16)
    sf.write(str(path), x, 16000, format=fmt, subtype="PCM_16")


def make_fake_an4(root: Path, with_test: bool = True) -> Path:
    etc = root / "etc"
    etc.mkdir(parents=True)
    (etc / "an4.dic").write_text(DIC)
    (etc / "an4.phone").write_text("\n".join(PHONES.split()) + "\n")
    (etc / "an4.filler").write_text("<s> SIL\n</s> SIL\n<sil> SIL\n")
    fileids, trans = [], []
    for si, spk in enumerate(TRAIN_SPEAKERS):
        for k in range(2):
            utt = f"an{10 * si + k}-{spk}-b"
            # one speaker's audio as NIST SPHERE, the rest as WAV
            ext, fmt = (".sph", "NIST") if spk == "mjkl" else (".wav", "WAV")
            _wav(root / "wav" / "an4_clstk" / spk / f"{utt}{ext}", fmt=fmt)
            fileids.append(f"an4_clstk/{spk}/{utt}")
            trans.append(f"{TEXTS[(si + k) % len(TEXTS)]} ({utt})")
    (etc / "an4_train.fileids").write_text("\n".join(fileids) + "\n")
    (etc / "an4_train.transcription").write_text("\n".join(trans) + "\n")
    if with_test:
        lines = []
        for spk in ("ftst", "mtst"):
            utt = f"cen1-{spk}-b"
            _wav(root / "wav" / "an4test_clstk" / spk / f"{utt}.wav", seconds=0.5)
            lines.append(f"<s> GO </s> ({utt})")
        # no an4_test.fileids: paths are derived from the utterance ids
        (etc / "an4_test.transcription").write_text("\n".join(lines) + "\n")
    return root


def test_normalize_transcript():
    assert normalize_transcript("<s> u m n y h six </s> (an255-fash-b)") == (
        "U M N Y H SIX",
        "an255-fash-b",
    )
    assert normalize_transcript("<s> GO <sil> </s> (x-y-b)") == ("GO", "x-y-b")
    assert normalize_transcript("YES") == ("YES", None)


def test_prepare_an4_fake_corpus(tmp_path):
    corpus = make_fake_an4(tmp_path / "an4")
    out = tmp_path / "manifests"
    m = prepare_an4(corpus, out, num_dev_speakers=2, seed=0)
    assert list(m) == ["train", "dev", "test"]

    spk = {s: {x.speaker for x in m[s]["supervisions"]} for s in m}
    assert len(spk["dev"]) == 2
    assert {x[0] for x in spk["dev"]} == {"f", "m"}, "dev must be gender-balanced"
    assert not spk["dev"] & spk["train"]
    assert spk["train"] | spk["dev"] == set(TRAIN_SPEAKERS)
    assert spk["test"] == {"ftst", "mtst"}
    assert len(m["train"]["recordings"]) + len(m["dev"]["recordings"]) == 2 * len(TRAIN_SPEAKERS)

    texts = {x.text for s in m for x in m[s]["supervisions"]}
    assert texts == {"YES", "A B TWENTY", "GO"}
    genders = {x.speaker: x.gender for s in m for x in m[s]["supervisions"]}
    assert genders["fabc"] == "F" and genders["mabc"] == "M"
    for s in m:
        for rec in m[s]["recordings"]:
            assert rec.sampling_rate == 16000
            assert abs(rec.duration - (0.5 if s == "test" else 0.3)) < 1e-6
    # the .sph speaker was converted to wav inside the output dir and loads through lhotse
    sph_recs = [r for s in m for r in m[s]["recordings"] if "mjkl" in r.id]
    assert len(sph_recs) == 2
    for r in sph_recs:
        src = Path(r.sources[0].source)
        assert src.suffix == ".wav" and out in src.parents
        assert r.load_audio().shape == (1, 4800)

    for s in m:
        for kind in ("recordings", "supervisions"):
            path = out / f"an4_{kind}_{s}.jsonl.gz"
            assert len(lhotse.load_manifest(path)) == len(m[s][kind])

    lex = read_lexicon(out / "an4_lexicon.txt")
    assert ("A", ["AH"]) in lex and ("A", ["EY"]) in lex
    assert ("TWENTY", ["T", "W", "EH", "N", "T", "IY"]) in lex
    assert not any("(" in w for w, _ in lex)
    assert ("<sil>", ["SIL"]) in lex and ("<UNK>", ["SPN"]) in lex
    assert not any(w in ("<s>", "</s>") for w, _ in lex)

    # finished step: a second call does not rewrite anything
    stamp = {p: p.stat().st_mtime_ns for p in out.glob("an4_*")}
    m2 = prepare_an4(corpus, out, num_dev_speakers=2, seed=0)
    assert {p: p.stat().st_mtime_ns for p in out.glob("an4_*")} == stamp
    assert {x.id for x in m2["dev"]["supervisions"]} == {x.id for x in m["dev"]["supervisions"]}


def test_prepare_an4_without_test_part(tmp_path, caplog):
    corpus = make_fake_an4(tmp_path / "an4", with_test=False)
    m = prepare_an4(corpus, tmp_path / "out", num_dev_speakers=4, seed=3)
    assert list(m) == ["train", "dev"]
    assert "no official test part" in caplog.text
    dev = {x.speaker for x in m["dev"]["supervisions"]}
    assert len(dev) == 4 and sum(s.startswith("f") for s in dev) == 2
    assert not (tmp_path / "out" / "an4_recordings_test.jsonl.gz").exists()
    # a new configuration without dev removes the dev manifests of the previous one
    m = prepare_an4(corpus, tmp_path / "out", num_dev_speakers=0)
    assert list(m) == ["train"] and len(m["train"]["recordings"]) == 2 * len(TRAIN_SPEAKERS)
    assert not (tmp_path / "out" / "an4_supervisions_dev.jsonl.gz").exists()


def test_choose_dev_speakers_deterministic_and_balanced():
    spk = [f"f{i:02d}" for i in range(21)] + [f"m{i:02d}" for i in range(53)]
    a = choose_dev_speakers(spk, 8, seed=0)
    assert a == choose_dev_speakers(list(reversed(spk)), 8, seed=0)
    assert len(a) == 8 and sum(s.startswith("f") for s in a) == 4
    assert choose_dev_speakers(spk, 8, seed=1) != a
    assert sum(s.startswith("f") for s in choose_dev_speakers(spk, 7, seed=0)) == 3
    # a gender group never goes entirely to dev
    few = ["f1", "f2", "m1", "m2", "m3", "m4", "m5"]
    d = choose_dev_speakers(few, 4, seed=0)
    assert sum(s.startswith("f") for s in d) == 1 and len(d) == 4
    # no gender code: plain sampling
    assert len(choose_dev_speakers(["a", "b", "c", "d"], 2)) == 2
    with pytest.raises(ValueError, match="num_dev_speakers must be in"):
        choose_dev_speakers(["f1", "m1"], 2)


def test_missing_corpus_dir_is_a_clear_error(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"AN4 corpus directory .*nope does not exist.*--download"
    ):
        prepare_an4(tmp_path / "nope", tmp_path / "out")


def test_missing_files_are_named(tmp_path):
    corpus = make_fake_an4(tmp_path / "an4")
    (corpus / "etc" / "an4_train.transcription").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"train transcription at .*an4_train\.transcription"
    ):
        prepare_an4(corpus, tmp_path / "out")

    corpus = make_fake_an4(tmp_path / "an4b")
    (corpus / "wav" / "an4_clstk" / "fabc" / "an0-fabc-b.wav").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 14 audio files .*missing.*an0-fabc-b"):
        prepare_an4(corpus, tmp_path / "out")

    corpus = make_fake_an4(tmp_path / "an4c")
    (corpus / "etc" / "an4.dic").write_text("A  AH\nB  B XX\n")
    with pytest.raises(ValueError, match=r"phones \['XX'\] of B are not in the phone set"):
        convert_an4_dictionary(corpus)


def test_prepare_an4_cli(tmp_path):
    from click.testing import CliRunner

    from k2quant.bin.prepare_an4 import main

    corpus = make_fake_an4(tmp_path / "an4")
    r = CliRunner().invoke(
        main,
        [
            "--corpus-dir",
            str(corpus),
            "--output-dir",
            str(tmp_path / "o"),
            "--num-dev-speakers",
            "2",
        ],
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "o" / "an4_supervisions_dev.jsonl.gz").is_file()
    r = CliRunner().invoke(
        main, ["--corpus-dir", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "o")]
    )
    assert r.exit_code != 0 and "does not exist" in r.output and "--download" in r.output


def test_download_an4_from_a_local_archive(tmp_path):
    """download_an4 end to end with a file:// URL (no network): extract, place, skip, refuse."""
    import tarfile

    from k2quant.data.an4 import download_an4

    make_fake_an4(tmp_path / "src" / "an4")
    archive = tmp_path / "src" / "an4_sphere.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "an4", arcname="an4")
    target = tmp_path / "corpora" / "an4"
    assert download_an4(target, url=archive.as_uri()) == target
    assert (target / "etc" / "an4_train.transcription").is_file()
    assert not list((tmp_path / "corpora").glob(".tmp-*"))
    m = prepare_an4(target, tmp_path / "out", num_dev_speakers=2)
    assert len(m["test"]["recordings"]) == 2
    # present: no second download (the URL is not even opened)
    assert download_an4(target, url="file:///nonexistent.tar.gz") == target
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        download_an4(occupied, url=archive.as_uri())
    assert (occupied / "notes.txt").read_text() == "mine"


@pytest.mark.skipif(
    not (REAL_AN4 / "etc" / "an4_train.transcription").is_file(), reason="real AN4 not present"
)
def test_real_an4_metadata_split():
    splits = split_an4(REAL_AN4, num_dev_speakers=8, seed=0)
    train, dev = splits["train"], splits["dev"]
    assert len(train) + len(dev) == 948
    spk_train = {u.speaker for u in train}
    spk_dev = {u.speaker for u in dev}
    assert len(spk_train | spk_dev) == 74
    assert len(spk_dev) == 8 and not spk_train & spk_dev
    assert sum(s.startswith("f") for s in spk_dev) == 4
    assert all(u.text and u.text == u.text.upper() and "<" not in u.text for u in train + dev)
    has_test = (REAL_AN4 / "wav" / "an4test_clstk").is_dir()
    assert ("test" in splits) == has_test
    lex_words = {w for w, _ in convert_an4_dictionary(REAL_AN4)}
    assert all(w in lex_words for u in train + dev for w in u.text.split())


def test_prepare_an4_dev2_is_a_second_disjoint_split(tmp_path):
    corpus = make_fake_an4(tmp_path / "an4", with_test=False)
    base = prepare_an4(corpus, tmp_path / "a", num_dev_speakers=2, seed=0)
    m = prepare_an4(corpus, tmp_path / "b", num_dev_speakers=2, num_dev2_speakers=2, seed=0)
    assert list(m) == ["train", "dev", "dev2"]
    spk = {s: {x.speaker for x in m[s]["supervisions"]} for s in m}
    # dev is the same with or without dev2; dev2 is gender-balanced and disjoint from both
    assert spk["dev"] == {x.speaker for x in base["dev"]["supervisions"]}
    assert len(spk["dev2"]) == 2 and {x[0] for x in spk["dev2"]} == {"f", "m"}
    assert not spk["dev2"] & spk["dev"] and not spk["dev2"] & spk["train"]
    assert spk["train"] | spk["dev"] | spk["dev2"] == set(TRAIN_SPEAKERS)
    with pytest.raises(ValueError, match="num_dev2_speakers must be in"):
        prepare_an4(corpus, tmp_path / "c", num_dev_speakers=2,
                    num_dev2_speakers=len(TRAIN_SPEAKERS) - 2)
