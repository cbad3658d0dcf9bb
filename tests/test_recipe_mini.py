"""End-to-end smoke test: egs/mini/ASR/run.sh on a 150 + 30 utterance corpus (about a minute).

Runs every stage (synthesis, fbank, lang + den phone LM, word LM + HLG, LF-MMI training of a
reduced TDNN-F for 8 epochs, decoding, scoring) through the recipe itself, checks that each
stage leaves its files behind, that a WER line is printed, that the .done markers make a rerun a
no-op, and that bad options fail clearly.
"""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("k2")
pytest.importorskip("lhotse")
pytest.importorskip("espeakng_loader")

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "egs" / "mini" / "ASR" / "run.sh"
# A reduced model so that the smoke test stays well under 3 minutes on 2 CPU cores.
TINY_MODEL = '{"hidden_dim": 128, "bottleneck_dims": 32, "prefinal_bottleneck": 64}'


def _env():
    env = dict(os.environ)
    k2quant = Path(sys.executable).parent / "k2quant"
    if k2quant.is_file():
        env["K2QUANT"] = str(k2quant)
    return env


def _run(args, **kw):
    return subprocess.run(["bash", str(RECIPE), *args], capture_output=True, text=True,
                          env=_env(), **kw)


@pytest.mark.slow
def test_mini_recipe_smoke(tmp_path):
    data, exp = tmp_path / "data", tmp_path / "exp"
    args = ["--num-train", "150", "--num-test", "30", "--data-dir", str(data),
            "--exp-dir", str(exp), "--num-epochs", "8", "--max-duration", "40",
            "--model-config", TINY_MODEL, "--lr", "0.004", "--warmup-steps", "10",
            "--den-lm-order", "2"]
    t0 = time.time()
    p = _run(args, timeout=600)
    elapsed = time.time() - t0
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"recipe failed (rc {p.returncode}):\n{out[-4000:]}"

    # every stage left its files
    assert (data / "manifests" / "mini_lexicon.txt").is_file()
    assert (data / "fbank" / "cuts_train.jsonl.gz").is_file()
    assert (data / "fbank" / "cuts_test.jsonl.gz").is_file()
    assert (data / "lang" / "lang.json").is_file() and (data / "lang" / "P_2gram.arpa").is_file()
    assert (data / "lm" / "G_3_gram.arpa").is_file() and (data / "lang" / "HLG.pt").is_file()
    assert (exp / "epoch-1.pt").is_file() and (exp / "epoch-8.pt").is_file()
    assert list((exp / "tensorboard").iterdir())
    tag = "test-epoch-8-avg-1"
    for name in (f"hyps-{tag}.txt", f"ref-{tag}.txt", f"per_utt-{tag}.tsv",
                 f"errs-{tag}.txt", f"wer-{tag}.json"):
        assert (exp / "decode" / name).is_file(), name
    for s in range(7):
        assert f"Stage {s}:" in out, f"stage {s} not logged"

    m = re.search(r"%WER ([0-9.]+) \[", out)
    assert m, f"no WER printed:\n{out[-2000:]}"
    wer = float(m.group(1))
    # 150 training utterances (0.1 h), 8 epochs of a 0.2M-parameter model, 30 test utterances
    # of unseen voices: measured 20-26%; an untrained or broken system is at ~100%.
    assert wer < 50.0, f"WER {wer}% on the smoke corpus: the system did not learn"
    print(f"smoke recipe: WER {wer}% in {elapsed:.0f} s")

    # rerun: every stage with a .done marker is skipped
    p2 = _run(args + ["--stop-stage", "5"], timeout=120)
    assert p2.returncode == 0, p2.stderr[-2000:]
    assert p2.stderr.count("already done") >= 5, p2.stderr[-2000:]


def test_recipe_rejects_unknown_option():
    p = _run(["--no-such-option", "1"], timeout=60)
    assert p.returncode == 2
    assert "unknown option '--no-such-option'" in p.stderr


def test_an4_recipe_missing_corpus_is_a_clear_error(tmp_path):
    recipe = REPO / "egs" / "an4" / "ASR" / "run.sh"
    p = subprocess.run(
        ["bash", str(recipe), "--corpus-dir", str(tmp_path / "nope"), "--data-dir",
         str(tmp_path / "data"), "--exp-dir", str(tmp_path / "exp"), "--stop-stage", "0"],
        capture_output=True, text=True, env=_env(), timeout=60,
    )
    assert p.returncode != 0
    assert "AN4 corpus not found" in p.stderr and "--download true" in p.stderr
