"""egs/swbd/ASR/run.sh end to end on a fake LDC tree (tests/fake_ldc.py), stages 0-12, on CPU.

The tree has the real layouts (LDC97S62 two-channel 8 kHz SPHERE, MS-98 transcripts and
lexicon, eval2000 audio + transcripts + stm + glm, Fisher transcripts); the model is tiny and
trains for 2 epochs, so WERs are meaningless: the test checks that every stage runs and leaves
its outputs, that the recipe is a no-op when rerun, and that stage 1 fails clearly (and is not
marked done) when the SPHERE reader is missing. About 2-3 minutes on 2 cores.

Stage 5's 4-gram lattice rescoring runs when the installed k2quant has ``rescore-ngram``; the
sclite parts of stages 6 and 12 run when NIST SCTK is installed (``.ci/run`` installs it).
"""
import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("k2")
lhotse = pytest.importorskip("lhotse")
pytest.importorskip("soundfile")

from fake_ldc import make_fake_ldc  # noqa: E402
from k2quant.sctk import have_sctk  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "egs" / "swbd" / "ASR" / "run.sh"
TINY_MODEL = '{"hidden_dim": 64, "bottleneck_dims": 16, "prefinal_bottleneck": 32}'


def _env():
    env = dict(os.environ)
    k2quant = Path(sys.executable).parent / "k2quant"
    if k2quant.is_file():
        env["K2QUANT"] = str(k2quant)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _args(ldc, data, exp, sclite):
    return [
        "--swbd-audio-dir", str(ldc["audio"]), "--swbd-trans-dir", str(ldc["trans"]),
        "--eval2000-dir", str(ldc["eval2000"]),
        "--fisher-dirs", f"{ldc['fisher1']} {ldc['fisher2']}",
        "--audio-reader", "libsndfile", "--num-dev-utts", "8", "--max-dup-utts", "0",
        "--world-size", "1", "--device", "cpu", "--num-threads", "1",
        "--model-preset", "small", "--model-config", TINY_MODEL, "--num-epochs", "2",
        "--avg", "1", "--max-duration", "30", "--lr", "0.004", "--warmup-steps", "5",
        "--den-lm-order", "2", "--lm-scales", "0.8,1.0",
        "--compress-runs", "uniform2 hessian-u2size", "--system-am", "hessian-u2size",
        "--compress-qat-epochs", "1", "--compress-sens-utts", "10",
        "--compress-sens-samples", "2", "--lm-epochs", "1", "--lm-preset", "small",
        "--lm-qat-epochs", "1", "--rescore-num-paths", "10", "--rescore-lm-scales", "0.5,1.0",
        "--use-sclite", "true" if sclite else "false",
        "--data-dir", str(data), "--exp-dir", str(exp),
    ]


def _run(args, timeout=900):
    return subprocess.run(["bash", str(RECIPE), *args], capture_output=True, text=True,
                          env=_env(), timeout=timeout)


def _num_lines_gz(path):
    with gzip.open(path, "rt") as f:
        return sum(1 for _ in f)


@pytest.fixture(scope="module")
def ldc(tmp_path_factory):
    return make_fake_ldc(tmp_path_factory.mktemp("ldc"))


@pytest.mark.slow
def test_swbd_recipe_stages_0_to_12(ldc, tmp_path):
    sclite = have_sctk()
    data, exp = tmp_path / "data", tmp_path / "exp"
    t0 = time.time()
    p = _run(_args(ldc, data, exp, sclite))
    elapsed = time.time() - t0
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"recipe failed (rc {p.returncode}):\n{out[-5000:]}"
    for s in range(13):
        assert f"Stage {s}:" in out, f"stage {s} not logged"
    m, fb, lang, lm, dec = (data / "manifests", data / "fbank", data / "lang", data / "lm",
                            exp / "decode")
    # 0: manifests (Kaldi train_dev: 8 utterances), scoring files, Fisher text, lexicon
    for split in ("train", "dev", "eval2000"):
        assert (m / f"swbd_supervisions_{split}.jsonl.gz").is_file()
    assert _num_lines_gz(m / "swbd_supervisions_dev.jsonl.gz") == 8
    assert (m / "swbd_eval2000.stm").read_text().count("en_4156 A en_4156_A") == 3
    assert "[LAUGHTER]" in (m / "swbd_fisher_text.txt").read_text()
    # 1: 8 kHz, 40 bins, train tripled by speed perturbation
    assert json.loads((fb / "fbank.json").read_text()) == {
        "sampling_rate": 8000, "num_mel_bins": 40, "low_freq": 20.0, "high_freq": 3700.0}
    n_train = _num_lines_gz(m / "swbd_supervisions_train.jsonl.gz")
    cuts = lhotse.load_manifest(fb / "cuts_train.jsonl.gz")
    assert len(cuts) == 3 * n_train
    assert {c.id.rsplit("_sp", 1)[1] for c in cuts if "_sp" in c.id} == {"0.9", "1.1"}
    assert cuts[0].load_features().shape[1] == 40
    ev = lhotse.load_manifest(fb / "cuts_eval2000.jsonl.gz")
    assert {c.recording_id for c in ev} == {"sw_4390", "en_4156"} and ev[0].sampling_rate == 8000
    # 2, 3: lang, den phone LM, sw1 3-gram + HLG, sw1_fsh 4-gram on Switchboard + Fisher text
    assert (lang / "P_2gram.arpa").is_file() and (lang / "HLG.pt").is_file()
    assert "\\3-grams:" in (lm / "G_3_gram.arpa").read_text()
    assert "\\4-grams:" in (lm / "G_4_gram.arpa").read_text()
    sw1 = (lm / "sw1.txt").read_text().splitlines()
    sw1_fsh = (lm / "sw1_fsh.txt").read_text().splitlines()
    assert len(sw1) == n_train and len(sw1_fsh) == n_train + 120  # 6 Fisher files x 20 lines
    # 4: checkpoints
    assert (exp / "epoch-2.pt").is_file()
    # 5: dev at every LM scale, the best applied to eval2000; lattices for rescoring
    assert (dec / "best_lm_scale").read_text().strip() in ("0.8", "1.0")
    assert f"best LM scale on dev: {(dec / 'best_lm_scale').read_text().strip()}" in out
    assert (dec / "hyps-eval2000-epoch-2-avg-1.txt").is_file()
    assert any((dec / "lattices-eval2000-epoch-2-avg-1").iterdir())
    # 6: WER of dev and eval2000; sclite per subset
    assert "%WER" in (dec / "WER-eval2000-epoch-2-avg-1.txt").read_text()
    if sclite:
        tg = json.loads((dec / "sclite" / "sclite-tg.json").read_text())
        assert set(tg["subsets"]) == {"total", "swbd", "callhome"}
        sub = tg["subsets"]
        assert sub["total"]["ref_words"] == sub["swbd"]["ref_words"] + sub["callhome"]["ref_words"]
    # 7, 8: compression runs and their report
    for name in ("uniform2", "hessian-u2size"):
        assert (exp / "compress" / name / "model.k2q").is_file()
    assert "uniform2" in (exp / "compress" / "report.md").read_text()
    # 9, 10: Transformer LM on Fisher + Switchboard text, and its compression
    assert (exp / "lm" / "train.txt").read_text().splitlines() == sw1_fsh
    assert (exp / "lm" / "epoch-1.pt").is_file()
    assert (exp / "lm-compress" / "kl-r12" / "lm.k2q").is_file()
    # 11, 12: n-best rescoring of the fp32 and the compressed AM, the AM+LM table
    for name in ("fp32am-fp32lm", "fp32am-kl-r12lm", "hessian-u2sizeam-fp32lm",
                 "hessian-u2sizeam-kl-r12lm"):
        assert (exp / "rescore" / name / "rescore-summary.json").is_file(), name
    assert "hessian-u2sizeam-kl-r12lm" in (exp / "rescore" / "systems.md").read_text()
    if sclite:
        table = (exp / "compress" / "sclite" / "eval2000-subsets.md").read_text()
        assert "| fp32 |" in table and "| hessian-u2size |" in table
        assert "callhome p vs fp32" in table
    print(f"swbd recipe stages 0-12 on the fake LDC tree: {elapsed:.0f} s")

    # a rerun of the marked stages is a no-op
    p2 = _run(_args(ldc, data, exp, sclite) + ["--stop-stage", "4"], timeout=120)
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert p2.stderr.count("already done") == 5, p2.stderr[-3000:]


@pytest.mark.skipif(shutil.which("sph2pipe") is not None,
                    reason="sph2pipe is installed here: its absence cannot be simulated")
def test_stage1_without_sph2pipe_fails_and_is_not_marked_done(ldc, tmp_path):
    data, exp = tmp_path / "data", tmp_path / "exp"
    args = [a if a != "libsndfile" else "auto" for a in _args(ldc, data, exp, False)]
    p = _run(args + ["--stop-stage", "1"], timeout=300)
    assert p.returncode != 0
    assert "needs the sph2pipe binary, which is not on PATH" in p.stderr, p.stderr[-3000:]
    assert (data / "manifests" / ".stage0.done").is_file()
    assert not (data / "fbank" / ".stage1.done").exists()
    assert not list(data.glob("fbank/cuts_*.jsonl.gz"))


def test_missing_ldc_part_is_named(ldc, tmp_path):
    p = _run(["--swbd-audio-dir", str(ldc["audio"]), "--swbd-trans-dir", str(ldc["trans"]),
              "--eval2000-dir", str(tmp_path), "--data-dir", str(tmp_path / "d"),
              "--exp-dir", str(tmp_path / "e"), "--stop-stage", "0"], timeout=120)
    assert p.returncode != 0
    assert "LDC2002S09/hub5e_00/english" in p.stderr and "LDC2002T43/reference" in p.stderr
    assert not (tmp_path / "d" / "manifests" / ".stage0.done").exists()
