"""Switchboard preparation on a tiny fake LDC-like tree (NIST SPHERE PCM + MS-98 transcripts)."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

lhotse = pytest.importorskip("lhotse")
sf = pytest.importorskip("soundfile")

from fake_ldc import GLM, STM_HEADER  # noqa: E402
from k2quant.data.lexicon import read_lexicon  # noqa: E402
from k2quant.data.swbd import (  # noqa: E402
    convert_ms98_dictionary,
    normalize_eval2000_text,
    normalize_fisher_text,
    normalize_swbd_text,
    prepare_swbd,
)

CONVS = ["2001", "2005", "2010"]
SIDE_A = [  # (start, end, MS-98 words); times within the 6 s audio
    (0.0, 0.5, "[silence]"),
    (0.5, 1.5, "hi [laughter] um"),
    (1.5, 2.5, "[laughter-yes] i [bocket/bucket]"),
    (2.5, 3.5, "hel[lo]- -ing {weirdest}"),
    (3.5, 4.0, "[noise] <b_aside> [vocalized-noise] <e_aside>"),
    (4.0, 4.5, "<b_aside> [silence] <e_aside>"),
]
SIDE_B = [(0.0, 1.0, "uh-huh"), (1.0, 2.0, "uh-huh"), (2.0, 3.0, "yeah right")]
DICT = """# sw-ms98-dict.text (fake)
#
[laughter]  lau
[noise]  nsn
[silence]  sil
[vocalized-noise]  spn
bucket  b ah k ih t
hi  hh ay
i  ay
right  r ay t
uh-huh  ah hh ah
um  ah m
yeah  y ae
yeah  y eh
yes  y eh s
"""
EVAL_TXT = """#Language: eng
#File id: 4156
# 121 131 #BEGIN

1.00 2.50 A: <contraction e_form="[we=>we]['re=>are]">we're starting, %um, ((okay)) (( )) {breath} \
th-
2.60 3.50 B: what do you mean?
3.60 4.00 B: {laugh}
"""


EVAL_STM = """en_4156 A en_4156_A 1.00 2.50 <O,en,F,en-F> we're starting (%HESITATION) okay (TH-)
en_4156 B en_4156_B 2.60 3.50 <O,en,M,en-M> what do you mean
"""


def _sph(path: Path, channels: int, seconds: float = 6.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    x = (1000 * rng.standard_normal((int(8000 * seconds), channels))).astype(np.int16)
    sf.write(str(path), x, 8000, format="NIST", subtype="PCM_16")


def make_fake_swbd(root: Path, with_eval: bool = True):
    audio, trans = root / "LDC97S62", root / "trans"
    ms98 = trans / "swb_ms98_transcriptions"
    for conv in CONVS:
        _sph(audio / "swb1" / f"sw0{conv}.sph", channels=2)
        for side, lines in (("A", SIDE_A), ("B", SIDE_B)):
            f = ms98 / conv[:2] / conv / f"sw{conv}{side}-ms98-a-trans.text"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(
                "".join(
                    f"sw{conv}{side}-ms98-a-{i + 1:04d} {s:.6f} {e:.6f} {w}\n"
                    for i, (s, e, w) in enumerate(lines)
                )
            )
    (ms98 / "sw-ms98-dict.text").write_text(DICT)
    eval_dir = root / "eval2000"
    if with_eval:
        _sph(eval_dir / "LDC2002S09" / "hub5e_00" / "english" / "en_4156.sph", channels=2)
        t = eval_dir / "LDC2002T43" / "reference" / "english" / "en_4156.txt"
        t.parent.mkdir(parents=True)
        t.write_text(EVAL_TXT)
        (t.parent.parent / "hub5e00.english.000405.stm").write_text(STM_HEADER + EVAL_STM)
        (t.parent.parent / "en20000405_hub5.glm").write_text(GLM)
    return audio, trans, eval_dir


def test_normalize_swbd_text():
    assert normalize_swbd_text("hi [laughter] um") == "HI [LAUGHTER] UM"
    assert normalize_swbd_text("[laughter-yes] i [bocket/bucket]") == "YES I BUCKET"
    assert normalize_swbd_text("hel[lo]- -ing [th]at th- {weirdest}") == (
        "<UNK> <UNK> <UNK> <UNK> WEIRDEST"
    )
    assert normalize_swbd_text("[noise] <b_aside> [vocalized-noise] <e_aside>") == (
        "[NOISE] [VOCALIZED-NOISE]"
    )
    assert normalize_swbd_text("<B_ASIDE> [SILENCE] <E_ASIDE>") == ""
    assert normalize_swbd_text("uh-huh it's") == "UH-HUH IT'S"


def test_normalize_eval2000_text():
    line = EVAL_TXT.splitlines()[4].split(None, 3)[3]
    assert normalize_eval2000_text(line) == "WE'RE STARTING UM OKAY <UNK>"
    assert normalize_eval2000_text("what do you mean?") == "WHAT DO YOU MEAN"
    assert normalize_eval2000_text("{laugh}") == ""


def test_convert_ms98_dictionary(tmp_path):
    p = tmp_path / "dict.text"
    p.write_text(DICT)
    lex = convert_ms98_dictionary(p)
    assert ("BUCKET", ["B", "AH", "K", "IH", "T"]) in lex
    assert ("YEAH", ["Y", "AE"]) in lex and ("YEAH", ["Y", "EH"]) in lex
    assert ("UH-HUH", ["AH", "HH", "AH"]) in lex
    assert lex[-5:] == [
        ("[NOISE]", ["NSN"]),
        ("[LAUGHTER]", ["LAU"]),
        ("[VOCALIZED-NOISE]", ["SPN"]),
        ("<sil>", ["SIL"]),
        ("<UNK>", ["SPN"]),
    ]
    assert not any(w.startswith("#") or w == "[SILENCE]" for w, _ in lex)
    p.write_text("# only a comment\nword\n")
    with pytest.raises(ValueError, match=r"dict.text:2: expected 'word phone"):
        convert_ms98_dictionary(p)


def test_prepare_swbd_splits_and_files(tmp_path):
    audio, trans, eval_dir = make_fake_swbd(tmp_path / "ldc")
    out = tmp_path / "manifests"
    m = prepare_swbd(audio, trans, out, eval2000_dir=eval_dir, num_dev_utts=3, max_dup_utts=1)
    for split in ("train", "dev", "eval2000"):
        assert (out / f"swbd_recordings_{split}.jsonl.gz").is_file()
        assert (out / f"swbd_supervisions_{split}.jsonl.gz").is_file()
    sups = {k: list(v["supervisions"]) for k, v in m.items()}
    # side A: 4 non-empty utterances ([silence]-only and aside-only lines dropped), side B: 3
    # dev = Kaldi's first 3 utterances: sw02001 side A, in time order
    assert [s.text for s in sups["dev"]] == [
        "HI [LAUGHTER] UM",
        "YES I BUCKET",
        "<UNK> <UNK> WEIRDEST",
    ]
    assert {s.speaker for s in sups["dev"]} == {"sw02001-A"}
    assert {s.recording_id for s in sups["dev"]} == {"sw02001"}
    # train: the rest, with at most one copy of each transcript (max_dup_utts=1)
    texts = [s.text for s in sups["train"]]
    assert texts.count("UH-HUH") == 1 and len(texts) == len(set(texts))
    assert "[NOISE] [VOCALIZED-NOISE]" in texts
    # 1 + 3 of sw02001 (A, B) and 4 + 3 of each other conversation, minus duplicates
    assert len(texts) == 6
    assert {s.speaker for s in sups["train"]} == {"sw02001-A", "sw02001-B", "sw02005-A"}
    assert not {s.id for s in sups["train"]} & {s.id for s in sups["dev"]}
    rec = m["train"]["recordings"]["sw02005"]
    assert rec.sampling_rate == 8000 and rec.num_channels == 2
    assert rec.duration == pytest.approx(6.0)
    ev = sups["eval2000"]
    assert [s.text for s in ev] == ["WE'RE STARTING UM OKAY <UNK>", "WHAT DO YOU MEAN"]
    assert [s.speaker for s in ev] == ["en_4156-A", "en_4156-B"]
    assert not list(out.glob("eval2000_*"))  # lhotse's unnormalised manifests stay out
    assert (out / "swbd_eval2000.stm").read_text() == STM_HEADER + EVAL_STM
    assert (out / "swbd_eval2000.glm").read_text() == GLM
    lex = read_lexicon(out / "swbd_lexicon.txt")
    assert ("<UNK>", ["SPN"]) in lex and ("<sil>", ["SIL"]) in lex
    assert ("YES", ["Y", "EH", "S"]) in lex
    # a second call is a no-op returning the same manifests
    m2 = prepare_swbd(audio, trans, out, eval2000_dir=eval_dir, num_dev_utts=3, max_dup_utts=1)
    assert [s.id for s in m2["dev"]["supervisions"]] == [s.id for s in sups["dev"]]


def test_prepare_swbd_conversation_dev_split(tmp_path):
    audio, trans, _ = make_fake_swbd(tmp_path / "ldc", with_eval=False)
    out = tmp_path / "m"
    m = prepare_swbd(audio, trans, out, num_dev_utts=5, dev_split="conversations", seed=3)
    dev_convs = {s.recording_id for s in m["dev"]["supervisions"]}
    train_convs = {s.recording_id for s in m["train"]["supervisions"]}
    assert len(dev_convs) == 1 and not dev_convs & train_convs  # one whole conversation (7 utts)
    assert len(m["dev"]["supervisions"]) == 7
    assert sorted(m) == ["dev", "train"]
    assert not (out / "swbd_recordings_eval2000.jsonl.gz").exists()


def test_prepare_swbd_errors(tmp_path):
    audio, trans, eval_dir = make_fake_swbd(tmp_path / "ldc")
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=r"LDC97S62.*swb1/sw0NNNN.sph"):
        prepare_swbd(tmp_path / "nope", trans, out)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"no .sph files under .*LDC97S62"):
        prepare_swbd(empty, trans, out)
    with pytest.raises(FileNotFoundError, match=r"no MS-98 transcripts .*swb_ms98_transcriptions"):
        prepare_swbd(audio, empty, out)
    (trans / "swb_ms98_transcriptions" / "20" / "2010" / "sw2010B-ms98-a-trans.text").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 3 conversations .*sw02010.sph"):
        prepare_swbd(audio, trans, out)
    _, trans2, _ = make_fake_swbd(tmp_path / "ldc2", with_eval=False)
    with pytest.raises(FileNotFoundError, match=r"MS-98 lexicon at .*missing.text.*--lexicon"):
        prepare_swbd(audio, trans2, out, lexicon=tmp_path / "missing.text")
    with pytest.raises(FileNotFoundError, match=r"LDC2002S09/hub5e_00/english"):
        prepare_swbd(audio, trans2, out, eval2000_dir=tmp_path / "ldc2" / "eval2000")
    (eval_dir / "LDC2002T43" / "reference" / "en20000405_hub5.glm").unlink()
    with pytest.raises(FileNotFoundError, match=r"scoring file .*reference/en20000405_hub5.glm "
                                                r"does not exist .*stm and glm of LDC2002T43"):
        prepare_swbd(audio, trans2, out, eval2000_dir=eval_dir)
    with pytest.raises(FileNotFoundError, match=r"Fisher: no transcripts data/trans/NNN/\*.txt "
                                                r"under .*LDC2004T19 or LDC2005T19"):
        prepare_swbd(audio, trans2, out, fisher_dirs=[empty])
    bad = tmp_path / "bad"
    (bad / "swb1").mkdir(parents=True)
    header = b"NIST_1A\n   1024\nsample_coding -s7 pcm,embedded-shorten-v2.00\nend_head\n"
    (bad / "swb1" / "sw02001.sph").write_bytes(header)
    if shutil.which("sph2pipe") is None:
        with pytest.raises(ValueError, match=r"cannot read SPHERE audio without sph2pipe"):
            prepare_swbd(bad, trans2, out, num_dev_utts=0)
        from lhotse.audio.backend import LibsndfileBackend, get_current_audio_backend

        assert not isinstance(get_current_audio_backend(), LibsndfileBackend)  # restored
    with pytest.raises(ValueError, match=r"num_dev_utts must be in \[0, 20\]"):
        prepare_swbd(audio, trans2, out, num_dev_utts=21)
    with pytest.raises(ValueError, match=r"dev_split must be one of"):
        prepare_swbd(audio, trans2, out, dev_split="random")


def test_cli(tmp_path):
    from k2quant.bin.cli import cli

    audio, trans, eval_dir = make_fake_swbd(tmp_path / "ldc")
    out = tmp_path / "cli"
    args = ["prepare-swbd", "--audio-dir", str(audio), "--transcripts-dir", str(trans),
            "--eval2000-dir", str(eval_dir), "--output-dir", str(out), "--num-dev-utts", "2"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert len(lhotse.load_manifest(out / "swbd_supervisions_dev.jsonl.gz")) == 2
    r = CliRunner().invoke(cli, args[:2] + [str(tmp_path / "none")] + args[3:])
    assert r.exit_code != 0 and "LDC97S62" in r.output


def test_fisher_text(tmp_path):
    assert normalize_fisher_text("(( yeah )) [laugh] i [lipsmack] th- know ((")  == (
        "YEAH [LAUGHTER] I [NOISE] <UNK> KNOW")
    audio, trans, _ = make_fake_swbd(tmp_path / "ldc", with_eval=False)
    d = tmp_path / "LDC2004T19" / "fe_03_p1_tran" / "data" / "trans" / "000"
    d.mkdir(parents=True)
    (d / "fe_03_00001.txt").write_text(
        "# fe_03_00001.sph\n\n0.36 1.75 A: and (( i )) [laughter] think so\n\n"
        "2.10 3.00 B: [noise]\n\n3.1 4.0 B: uh-huh\n")
    out = tmp_path / "m"
    prepare_swbd(audio, trans, out, num_dev_utts=0, fisher_dirs=[tmp_path / "LDC2004T19"])
    assert (out / "swbd_fisher_text.txt").read_text() == (
        "AND I [LAUGHTER] THINK SO\n[NOISE]\nUH-HUH\n")
    (d / "fe_03_00002.txt").write_text("0.1 0.5 no speaker field\n")
    with pytest.raises(ValueError, match=r"fe_03_00002.txt: expected 'START END A\|B: words'"):
        prepare_swbd(audio, trans, tmp_path / "m2", num_dev_utts=0,
                     fisher_dirs=[tmp_path / "LDC2004T19"])
