"""The synthesised mini corpus, fbank features and cut filtering on a tiny run of it."""

import random

import numpy as np
import pytest

lhotse = pytest.importorskip("lhotse")
sf = pytest.importorskip("soundfile")
pytest.importorskip("espeakng_loader")

from k2quant.data import mini  # noqa: E402
from k2quant.data.cuts import check_features, filter_cuts, map_oov, map_oov_cuts  # noqa: E402
from k2quant.data.features import compute_fbank  # noqa: E402
from k2quant.data.lexicon import read_lexicon  # noqa: E402

NUM_TRAIN, NUM_TEST = 24, 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("mini")
    return out, mini.prepare_mini(out, num_train=NUM_TRAIN, num_test=NUM_TEST, seed=0)


@pytest.fixture(scope="module")
def fbank(tiny):
    out, _ = tiny
    feat_dir = out / "fbank"
    return feat_dir, compute_fbank(out, "mini", feat_dir, num_mel_bins=80)


def test_number_words():
    assert " ".join(mini.cardinal(2552)) == "TWO THOUSAND FIVE HUNDRED AND FIFTY TWO"
    assert " ".join(mini.cardinal(60)) == "SIXTY"
    assert " ".join(mini.cardinal(1005)) == "ONE THOUSAND AND FIVE"
    assert " ".join(mini.paired(5632, random.Random(0))) == "FIFTY SIX THIRTY TWO"
    assert " ".join(mini.ordinal(23)) == "TWENTY THIRD"
    with pytest.raises(ValueError, match="10000"):
        mini.cardinal(10000)


def test_prompts_use_only_lexicon_words():
    words = {w for w, _ in mini.mini_lexicon()}
    rng = random.Random(1)
    prompts = [mini.generate_prompt(rng) for _ in range(2000)]
    assert all(p and set(p.split()) <= words for p in prompts)
    assert {"GO", "STOP", "ERASE", "RUBOUT", "REPEAT", "YES", "NO"} <= {
        w for p in prompts for w in p.split()
    }
    assert sum(len(p.split()) == 1 and p in mini.LETTERS for p in prompts) < 100  # not all trivial
    assert mini.espeak_text(["A", "B", "RUBOUT", "TWENTY"]) == "eigh B rub out twenty"


def test_tiny_corpus_files_and_manifests(tiny):
    out, m = tiny
    assert set(m) == {"train", "test"}
    assert len(m["train"]["recordings"]) == NUM_TRAIN and len(m["test"]["recordings"]) == NUM_TEST
    words = {w for w, _ in read_lexicon(out / "mini_lexicon.txt")}
    assert {"<sil>", "<UNK>", "A", "TWENTY", "RUBOUT"} <= words
    for split in m:
        for rec in m[split]["recordings"]:
            path = rec.sources[0].source
            info = sf.info(path)
            assert info.samplerate == 16000 and info.subtype == "PCM_16" and info.channels == 1
            assert info.frames == rec.num_samples
            assert 0.4 < rec.duration < 10.0
        for sup in m[split]["supervisions"]:
            assert set(sup.text.split()) <= words
            assert sup.speaker and sup.gender in ("F", "M")
        loaded = lhotse.load_manifest(out / f"mini_supervisions_{split}.jsonl.gz")
        assert [s.text for s in loaded] == [s.text for s in m[split]["supervisions"]]
    x, _ = sf.read(m["train"]["recordings"][0].sources[0].source)
    assert 0.02 < np.abs(x).max() < 1.0 and np.std(x) > 1e-3  # audible, not clipped, not silent


def test_voices_are_disjoint_between_train_and_test(tiny):
    _, m = tiny
    train = {s.speaker for s in m["train"]["supervisions"]}
    test = {s.speaker for s in m["test"]["supervisions"]}
    assert train and test and not train & test
    variants = lambda spk: {s.rsplit("_", 1)[1] for s in spk}  # noqa: E731
    assert not variants(train) & variants(test)
    assert len(test) == min(NUM_TEST, len(mini.TEST_LANGUAGES) * len(mini.TEST_VARIANTS))


def test_deterministic_and_idempotent(tiny, tmp_path):
    out, m = tiny
    # utterance i depends only on (seed, split, i): a smaller corpus reproduces its first files
    m2 = mini.prepare_mini(tmp_path, num_train=2, num_test=1, seed=0)
    for split in ("train", "test"):
        a = m[split]["recordings"][0].sources[0].source
        b = m2[split]["recordings"][0].sources[0].source
        assert open(a, "rb").read() == open(b, "rb").read()
    assert m2["train"]["supervisions"][0].text == m["train"]["supervisions"][0].text
    m3 = mini.prepare_mini(tmp_path / "s1", num_train=2, num_test=1, seed=1)
    assert [s.text for s in m3["train"]["supervisions"]] != [
        s.text for s in m2["train"]["supervisions"]
    ]
    # finished step: nothing rewritten
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*.wav")}
    mini.prepare_mini(out, num_train=NUM_TRAIN, num_test=NUM_TEST, seed=0)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.wav")} == stamp
    # a different configuration regenerates and removes stale wavs
    mini.prepare_mini(tmp_path, num_train=1, num_test=1, seed=0)
    assert len(list((tmp_path / "wav" / "train").glob("*.wav"))) == 1


def test_compute_fbank(fbank, tiny):
    out, m = tiny
    feat_dir, cuts = fbank
    assert set(cuts) == {"train", "test"}
    for split in cuts:
        loaded = lhotse.load_manifest(feat_dir / f"cuts_{split}.jsonl.gz")
        assert len(loaded) == len(m[split]["recordings"])
        assert {c.id for c in loaded} == {s.id for s in m[split]["supervisions"]}
        for cut in loaded:
            f = cut.load_features()
            assert f.ndim == 2 and f.shape[1] == 80 and f.dtype == np.float32
            assert abs(f.shape[0] - cut.duration * 100) <= 2
            assert np.isfinite(f).all()
            check_features(cut, f)
    # finished step: skipped on a second call
    stamp = (feat_dir / "cuts_train.jsonl.gz").stat().st_mtime_ns
    compute_fbank(out, "mini", feat_dir)
    assert (feat_dir / "cuts_train.jsonl.gz").stat().st_mtime_ns == stamp


def test_compute_fbank_speed_perturb_and_errors(tiny, tmp_path):
    out, m = tiny
    cuts = compute_fbank(
        out,
        "mini",
        tmp_path,
        splits=["train"],
        num_mel_bins=40,
        speed_perturb=True,
        storage="numpy",
    )
    c = cuts["train"]
    assert len(c) == 3 * NUM_TRAIN
    base = {s.id: s.duration for s in m["train"]["supervisions"]}
    sp = [x for x in c if x.id.endswith("_sp0.9")]
    assert len(sp) == NUM_TRAIN
    x = sp[0]
    assert abs(x.duration - base[x.id[: -len("_sp0.9")]] / 0.9) < 0.01
    assert x.load_features().shape[1] == 40
    with pytest.raises(
        FileNotFoundError, match=r"split\(s\) \['dev'\].*available: \['train', 'test'\]"
    ):
        compute_fbank(out, "mini", tmp_path / "x", splits=["dev"])
    with pytest.raises(FileNotFoundError, match="run 'k2quant prepare-an4' first"):
        compute_fbank(out, "an4", tmp_path / "x")
    with pytest.raises(ValueError, match="storage must be"):
        compute_fbank(out, "mini", tmp_path / "y", storage="hdf5")


def test_filter_cuts_counts(fbank, tiny):
    from lhotse.utils import fastcopy

    out, _ = tiny
    _, cuts = fbank
    lexicon = read_lexicon(out / "mini_lexicon.txt")
    cl = list(cuts["train"])
    sup = lambda c, text: fastcopy(
        c, supervisions=[fastcopy(c.supervisions[0], text=text)]
    )  # noqa: E731
    bad = [
        sup(cl[0], ""),  # empty transcript
        sup(cl[1], "SEVEN " * 12).truncate(duration=0.35),  # 0.35 s: 35 frames // 3 < 60 phones
        cl[2].truncate(duration=0.2),  # shorter than min_duration
        sup(cl[3], "HELLO GO WORLD"),  # two OOV words -> <UNK>, kept
    ]
    cutset = lhotse.CutSet.from_cuts(bad + cl[4:])
    kept, stats = filter_cuts(cutset, min_duration=0.3, max_duration=20.0, lexicon=lexicon)
    assert stats.total == len(cl)
    assert (stats.empty_text, stats.too_few_frames, stats.too_short, stats.too_long) == (1, 1, 1, 0)
    assert stats.kept == len(cl) - 3 == len(kept)
    assert stats.oov_tokens == 2
    assert stats.dropped_ids["empty_text"] == [cl[0].id]
    assert kept[cl[3].id].supervisions[0].text == "<UNK> GO <UNK>"
    assert stats.as_dict()["dropped"] == 3

    _, stats = filter_cuts(cutset, max_duration=1.0)  # no lexicon: one "phone" per word
    assert stats.too_long > 0 and stats.oov_tokens == 0


def test_map_oov():
    assert map_oov("A HELLO B", {"A", "B"}) == ("A <UNK> B", 1)
    assert map_oov("", {"A"}) == ("", 0)
    sup = lhotse.SupervisionSegment(
        id="u1", recording_id="r1", start=0, duration=1.0, text="X GO Y X"
    )
    rec = lhotse.Recording(
        id="r1",
        sources=[lhotse.AudioSource(type="file", channels=[0], source="/dev/null")],
        sampling_rate=16000,
        num_samples=16000,
        duration=1.0,
    )
    cuts = lhotse.CutSet.from_manifests(
        recordings=lhotse.RecordingSet.from_recordings([rec]),
        supervisions=lhotse.SupervisionSet.from_segments([sup]),
    )
    mapped, counts = map_oov_cuts(cuts, {"GO"}, oov="<unk>")
    assert counts == {"X": 2, "Y": 1}
    assert next(iter(mapped)).supervisions[0].text == "<unk> GO <unk> <unk>"


def test_check_features_names_the_cut():
    import torch

    f = np.zeros((10, 80), dtype=np.float32)
    check_features("utt-ok", f)
    f[3, 5] = np.nan
    with pytest.raises(ValueError, match=r"cut utt-7: features contain 1 NaN and 0 Inf .*\[3\]"):
        check_features("utt-7", f)
    t = torch.zeros(4, 80)
    t[1, 0] = float("inf")
    cut = lhotse.MonoCut(id="cut-inf", start=0, duration=0.04, channel=0)
    with pytest.raises(ValueError, match="cut cut-inf: features contain 0 NaN and 1 Inf"):
        check_features(cut, t)
    with pytest.raises(ValueError, match=r"cut x: expected features of shape \(T, C\)"):
        check_features("x", np.zeros(80))


def test_prepare_mini_cli(tmp_path):
    from click.testing import CliRunner

    from k2quant.bin.compute_fbank import main as fbank_main
    from k2quant.bin.prepare_mini import main as mini_main

    r = CliRunner().invoke(
        mini_main, ["--output-dir", str(tmp_path), "--num-train", "3", "--num-test", "2"]
    )
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "wav").rglob("*.wav"))) == 5
    r = CliRunner().invoke(
        fbank_main,
        [
            "--manifest-dir",
            str(tmp_path),
            "--prefix",
            "mini",
            "--output-dir",
            str(tmp_path / "fb"),
            "--splits",
            "test",
        ],
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "fb" / "cuts_test.jsonl.gz").is_file() and not (
        tmp_path / "fb" / "cuts_train.jsonl.gz"
    ).exists()
    r = CliRunner().invoke(
        fbank_main,
        [
            "--manifest-dir",
            str(tmp_path / "none"),
            "--prefix",
            "mini",
            "--output-dir",
            str(tmp_path / "fb"),
        ],
    )
    assert r.exit_code != 0 and "prepare-mini" in r.output
