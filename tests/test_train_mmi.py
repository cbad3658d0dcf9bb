"""LF-MMI training on the tiny synthesised corpus: bit-exact resume, DDP (gloo), averaging.

Needs k2, lhotse and espeakng_loader (skipped otherwise). About a minute on 2 CPU cores.
"""
import json
import random
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("k2")
pytest.importorskip("lhotse")
pytest.importorskip("espeakng_loader")

from k2quant.training.train import TrainConfig, train  # noqa: E402

TINY = '{"hidden_dim": 96, "bottleneck_dims": 32, "prefinal_bottleneck": 48}'


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from k2quant.data.features import compute_fbank
    from k2quant.data.mini import prepare_mini
    from k2quant.lang import prepare_lang

    d = tmp_path_factory.mktemp("mini")
    prepare_mini(d / "manifests", num_train=24, num_test=6)
    compute_fbank(d / "manifests", "mini", d / "fbank")
    prepare_lang(d / "manifests" / "mini_lexicon.txt", d / "lang", topo="chain", sil_phone="SIL")
    return d


def _cfg(corpus, exp, **kw):
    d = dict(exp_dir=str(exp), lang_dir=str(corpus / "lang"),
             train_cuts=str(corpus / "fbank" / "cuts_train.jsonl.gz"),
             valid_cuts=str(corpus / "fbank" / "cuts_test.jsonl.gz"),
             num_epochs=2, max_duration=20.0, model_config=TINY, den_lm_order=2, lr=3e-3,
             final_lr=1e-3, warmup_steps=4, seed=3, num_buckets=2, num_threads=1,
             orthonormal_every=2, device="cpu", log_interval=1000)
    d.update(kw)
    return TrainConfig(**d)


def test_lfmmi_resume_bit_identical(corpus, tmp_path):
    a = tmp_path / "a"
    hist = train(_cfg(corpus, a))
    assert [h["epoch"] for h in hist] == [1, 2]
    for h in hist:
        assert np.isfinite(h["train_loss_per_frame"]) and h["train_frames"] > 0
        assert np.isfinite(h["valid_loss_per_frame"])
    # "crash" after epoch 1: only epoch-1.pt survives; resume in a fresh RNG state
    b = tmp_path / "b"
    b.mkdir()
    shutil.copy(a / "epoch-1.pt", b / "epoch-1.pt")
    shutil.copy(corpus / "lang" / "P_2gram.arpa", tmp_path / "P.bak")
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    train(_cfg(corpus, b, start_epoch=2))
    pa = torch.load(a / "epoch-2.pt")["model"]
    pb = torch.load(b / "epoch-2.pt")["model"]
    diff = [k for k in pa if not torch.equal(pa[k], pb[k])]
    assert not diff, f"resumed run differs from the uninterrupted one in {diff[:5]}"
    # and training moved the parameters
    p1 = torch.load(a / "epoch-1.pt")["model"]
    assert any(not torch.equal(p1[k], pa[k]) for k in pa if p1[k].is_floating_point())
    # checkpoint carries what decoding needs
    ck = torch.load(a / "epoch-2.pt")
    assert ck["model_spec"]["arch"] == "tdnnf" and ck["config"]["utt_cmn"] is True


def test_average_checkpoints_cli(corpus, tmp_path):
    from click.testing import CliRunner

    from k2quant.bin.average_checkpoints import main

    exp = tmp_path / "exp"
    train(_cfg(corpus, exp, num_epochs=2, valid_cuts=None))
    r = CliRunner().invoke(main, ["--exp-dir", str(exp), "--epoch", "2", "--avg", "2"])
    assert r.exit_code == 0, r.output
    avg = torch.load(exp / "avg-epoch-2-avg-2.pt")
    e1, e2 = torch.load(exp / "epoch-1.pt")["model"], torch.load(exp / "epoch-2.pt")["model"]
    k = "output.weight"
    assert torch.allclose(avg["model"][k], (e1[k] + e2[k]) / 2, atol=1e-6)
    r = CliRunner().invoke(main, ["--exp-dir", str(exp), "--epoch", "3", "--avg", "2"])
    assert r.exit_code != 0 and "missing checkpoint" in r.output


@pytest.mark.slow
def test_ddp_world_size_2_gloo(corpus, tmp_path):
    exp = tmp_path / "ddp"
    hist = train(_cfg(corpus, exp, num_epochs=1, world_size=2, master_port=29517))
    assert hist and hist[0]["epoch"] == 1 and np.isfinite(hist[0]["train_loss_per_frame"])
    ck = torch.load(exp / "epoch-1.pt")
    assert len(ck["rng_per_rank"]) == 2
    assert ck["config"]["world_size"] == 2
    assert json.loads((exp / "train-history.json").read_text())[0]["train_batches"] > 0


def test_training_cuts_filter_counts_oov_and_empty(corpus, caplog):
    import logging

    from k2quant.training.dataset import load_cuts
    from k2quant.training.train import _filter_train_cuts

    cuts = load_cuts(corpus / "fbank" / "cuts_train.jsonl.gz").to_eager()
    first, second = cuts[0], cuts[1]
    first.supervisions[0].text = ""
    second.supervisions[0].text = "FROBNICATE " + second.supervisions[0].text
    with caplog.at_level(logging.WARNING, logger="k2quant.training.train"):
        kept, stats = _filter_train_cuts(cuts, str(corpus / "lang"), 3)
    assert stats.empty_text == 1 and stats.oov_tokens == 1 and len(kept) == len(cuts) - 1
    assert "1 of 24 dropped" in caplog.text and "1 OOV word tokens mapped to <UNK>" in caplog.text
    texts = {c.id: c.supervisions[0].text for c in kept}
    assert texts[second.id].startswith("<UNK> ")
