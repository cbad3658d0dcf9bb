"""Sample-rate-aware fbank and audio-reader failures (8 kHz two-channel SPHERE, sph2pipe)."""

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from k2quant.data.features import TELEPHONE_MAX_RATE, fbank_settings

lhotse = pytest.importorskip("lhotse")
sf = pytest.importorskip("soundfile")

from k2quant.data.features import AudioReadError, compute_fbank  # noqa: E402
from k2quant.data.manifests import save_manifest  # noqa: E402


def test_fbank_settings_follow_the_band():
    tel = fbank_settings(8000)
    assert (tel.num_mel_bins, tel.low_freq, tel.high_freq) == (40, 20.0, 3700.0)
    wide = fbank_settings(16000)
    assert (wide.num_mel_bins, wide.low_freq, wide.high_freq) == (80, 20.0, 7600.0)
    assert TELEPHONE_MAX_RATE == 8000
    own = fbank_settings(8000, num_mel_bins=23, low_freq=100, high_freq=3400)
    assert own.lhotse_config().num_filters == 23 and own.lhotse_config().sampling_rate == 8000
    with pytest.raises(ValueError, match=r"high_freq <= 4000 Hz .*8000 Hz sample rate"):
        fbank_settings(8000, high_freq=7600)
    with pytest.raises(ValueError, match="num_mel_bins must be >= 1"):
        fbank_settings(16000, num_mel_bins=0)


def _write(path: Path, sr: int, channels: int, seconds: float, fmt: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(path.name))
    x = (2000 * rng.standard_normal((int(sr * seconds), channels))).astype(np.int16)
    sf.write(str(path), x, sr, format=fmt, subtype="PCM_16")
    return x.shape[0]


def _manifests(root: Path, files, split="train", prefix="tel"):
    """files: [(name, sr, channels, fmt)] -> one supervision per channel, 1.2 s each."""
    recs, sups = [], []
    for name, sr, ch, fmt in files:
        path = root / "audio" / name
        n = _write(path, sr, ch, 1.5, fmt)
        recs.append(lhotse.Recording(
            id=path.stem, sampling_rate=sr, num_samples=n, duration=n / sr,
            sources=[lhotse.AudioSource(type="file", channels=list(range(ch)),
                                        source=str(path))]))
        for c in range(ch):
            sups.append(lhotse.SupervisionSegment(
                id=f"{path.stem}-{c}", recording_id=path.stem, start=0.1, duration=1.2,
                channel=c, text="HELLO", speaker=f"{path.stem}-{'AB'[c]}"))
    m = root / "manifests"
    save_manifest(lhotse.RecordingSet.from_recordings(recs), m / f"{prefix}_recordings_{split}.jsonl.gz")
    save_manifest(lhotse.SupervisionSet.from_segments(sups), m / f"{prefix}_supervisions_{split}.jsonl.gz")
    return m


def test_8khz_two_channel_sphere(tmp_path):
    m = _manifests(tmp_path, [("sw02001.sph", 8000, 2, "NIST"), ("sw02005.sph", 8000, 2, "NIST")])
    out = tmp_path / "fbank"
    cuts = compute_fbank(m, "tel", out, audio_reader="libsndfile", storage="numpy")["train"]
    assert len(cuts) == 4
    for cut in cuts:
        feats = cut.load_features()
        assert feats.shape[1] == 40 and 115 <= feats.shape[0] <= 125
        assert cut.sampling_rate == 8000
    # the two channels are different audio, hence different features
    a, b = (c.load_features() for c in cuts if c.recording_id == "sw02001")
    assert np.abs(a - b).mean() > 0.1
    from lhotse.audio.backend import LibsndfileBackend, get_current_audio_backend

    assert not isinstance(get_current_audio_backend(), LibsndfileBackend)  # restored
    assert "LHOTSE_AUDIO_BACKEND" not in os.environ
    assert json.loads((out / "fbank.json").read_text()) == {
        "sampling_rate": 8000, "num_mel_bins": 40, "low_freq": 20.0, "high_freq": 3700.0}
    # the same directory with other settings is refused, naming both
    m2 = _manifests(tmp_path / "dev", [("sw03000.sph", 8000, 1, "NIST")], split="dev")
    with pytest.raises(ValueError, match=r"computed with .*'num_mel_bins': 40.*'num_mel_bins': 80"):
        compute_fbank(m2, "tel", out, num_mel_bins=80, audio_reader="libsndfile")
    assert not (out / "cuts_dev.jsonl.gz").exists()


def test_mixed_sample_rates_name_the_recording(tmp_path):
    m = _manifests(tmp_path, [("a.wav", 8000, 1, "WAV"), ("b.wav", 16000, 1, "WAV")])
    with pytest.raises(ValueError, match=r"mixes sample rates: 8000 Hz \(e.g. recording a\), "
                                         r"16000 Hz \(e.g. recording b\)"):
        compute_fbank(m, "tel", tmp_path / "fbank")
    assert not (tmp_path / "fbank").exists()


def _path_with(tmp_path: Path, script: str = None) -> str:
    """A PATH without any sph2pipe, plus ours when a script is given."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    if script is not None:
        p = bindir / "sph2pipe"
        p.write_text(script)
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    keep = [d for d in os.environ["PATH"].split(os.pathsep)
            if not (Path(d) / "sph2pipe").exists()]
    return os.pathsep.join([str(bindir)] + keep)


def test_missing_sph2pipe_stops_before_any_feature(tmp_path, monkeypatch):
    m = _manifests(tmp_path, [("sw02001.sph", 8000, 2, "NIST")])
    monkeypatch.setenv("PATH", _path_with(tmp_path))
    out = tmp_path / "fbank"
    with pytest.raises(AudioReadError, match=r"recording sw02001: reading .*sw02001.sph needs the "
                                             r"sph2pipe binary, which is not on PATH"):
        compute_fbank(m, "tel", out)
    assert not (out / "cuts_train.jsonl.gz").exists()
    assert not list(out.glob("feats_*")) if out.exists() else True


def test_failing_sph2pipe_reports_command_and_stderr(tmp_path, monkeypatch):
    m = _manifests(tmp_path, [("sw02001.sph", 8000, 2, "NIST")])
    script = "#!/bin/sh\necho \"ERROR: sw02001.sph: unknown sample coding\" >&2\nexit 3\n"
    monkeypatch.setenv("PATH", _path_with(tmp_path, script))
    out = tmp_path / "fbank"
    with pytest.raises(AudioReadError, match=r"`.*sph2pipe -f wav -p -t 0:0.1 .*sw02001.sph` "
                                             r"exited with 3 and wrote no audio; its stderr: "
                                             r"ERROR: sw02001.sph: unknown sample coding"):
        compute_fbank(m, "tel", out)
    assert not (out / "cuts_train.jsonl.gz").exists()


def test_failing_pipe_command_source(tmp_path):
    """A Kaldi-style wav.scp pipe (``sox ... |``) that fails is named with its stderr."""
    rec = lhotse.Recording(
        id="r1", sampling_rate=8000, num_samples=8000, duration=1.0,
        sources=[lhotse.AudioSource(type="command", channels=[0],
                                    source=f"sox {tmp_path}/missing.sph -t wav -")])
    m = tmp_path / "manifests"
    save_manifest(lhotse.RecordingSet.from_recordings([rec]), m / "tel_recordings_train.jsonl.gz")
    save_manifest(lhotse.SupervisionSet.from_segments([lhotse.SupervisionSegment(
        id="u1", recording_id="r1", start=0, duration=1.0, text="HI")]),
        m / "tel_supervisions_train.jsonl.gz")
    with pytest.raises(AudioReadError, match=r"recording r1: the audio reader failed: `sox .*"
                                             r"missing.sph -t wav -` exited with \d+"):
        compute_fbank(m, "tel", tmp_path / "fbank")


# sph2pipe's command line as lhotse calls it (-f wav -p -t START:[END] FILE), for uncompressed
# SPHERE, failing on files whose name contains "bad".
FAKE_SPH2PIPE = """#!{python}
import io, sys
import soundfile as sf
args = sys.argv[1:]
path = args[-1]
if "bad" in path:
    sys.stderr.write(path + ": premature end of shorten data\\n")
    sys.exit(1)
start, end = args[args.index("-t") + 1].split(":")
x, sr = sf.read(path, dtype="int16")
x = x[int(float(start) * sr): int(float(end) * sr) if end else None]
buf = io.BytesIO()
sf.write(buf, x, sr, format="WAV", subtype="PCM_16")
sys.stdout.buffer.write(buf.getvalue())
"""


def test_cuts_lost_by_lhotse_are_an_error(tmp_path, monkeypatch):
    """sph2pipe reads the first recording but fails on the second: lhotse skips its cuts with
    a warning; here that is an error and no cuts file is written (not 2 of 4 cuts)."""
    import sys

    m = _manifests(tmp_path, [("good.sph", 8000, 2, "NIST"), ("bad.sph", 8000, 2, "NIST")])
    monkeypatch.setenv("PATH", _path_with(tmp_path, FAKE_SPH2PIPE.format(python=sys.executable)))
    out = tmp_path / "fbank"
    with pytest.raises(AudioReadError, match=r"train: the audio of 2 of 4 cuts could not be read "
                                             r"\(lhotse skipped them\), e.g. cut bad-0 of recording "
                                             r"bad \(.*bad.sph\).*premature end of shorten data.*"
                                             r"Nothing was written for train"):
        compute_fbank(m, "tel", out, storage="numpy")
    assert not (out / "cuts_train.jsonl.gz").exists()
    assert not (out / "feats_train").exists()
    # with a working reader for both files the same call succeeds (8 kHz, two channels)
    (tmp_path / "audio" / "bad.sph").rename(tmp_path / "audio" / "fine.sph")
    m = _manifests(tmp_path, [("good.sph", 8000, 2, "NIST"), ("fine.sph", 8000, 2, "NIST")])
    cuts = compute_fbank(m, "tel", out, storage="numpy")["train"]
    assert len(cuts) == 4 and cuts[0].load_features().shape[1] == 40


def test_unreadable_file_mid_split_is_named(tmp_path):
    m = _manifests(tmp_path, [("a.wav", 8000, 1, "WAV"), ("b.wav", 8000, 1, "WAV")])
    (tmp_path / "audio" / "b.wav").write_bytes(b"RIFF but not audio" * 10)
    out = tmp_path / "fbank"
    with pytest.raises(AudioReadError, match=r"train: cannot read the audio of cut b-0 of "
                                             r"recording b \(.*b.wav\) with the libsndfile reader"):
        compute_fbank(m, "tel", out, storage="numpy", audio_reader="libsndfile")
    assert not (out / "cuts_train.jsonl.gz").exists() and not (out / "feats_train").exists()


def test_prepare_an4_rejects_8khz_audio(tmp_path):
    from tests.test_data_an4 import make_fake_an4
    from k2quant.data.an4 import prepare_an4

    corpus = make_fake_an4(tmp_path / "an4", with_test=False)
    wav = sorted((corpus / "wav").rglob("*.wav"))[3]
    x, _ = sf.read(str(wav), dtype="int16")
    sf.write(str(wav), x[::2], 8000, subtype="PCM_16")
    with pytest.raises(ValueError, match=rf"AN4: .*{wav.name} is 8000 Hz with 1 channel\(s\), "
                                         r"but the AN4 corpus is 16000 Hz mono"):
        prepare_an4(corpus, tmp_path / "m", num_dev_speakers=0)
    assert not (tmp_path / "m" / ".an4.done").exists()
