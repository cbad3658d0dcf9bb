"""QAT with the LF-MMI loss on a tiny TDNN-F, tiny lang and synthetic utterances (k2, lhotse).

The tiny setup (also used by ``test_compress.py``): words X Y Z W over phones A B (chain
topology, 7 pdfs), utterances whose features spell their phones (8-dim pattern per phone,
9 frames each, noise), a word unigram HLG, and a small float TDNN-F saved as a training
checkpoint ``exp/epoch-1.pt`` after a few LF-MMI steps.
"""
import math
from pathlib import Path

import numpy as np
import pytest
import torch

k2 = pytest.importorskip("k2")
pytest.importorskip("lhotse")
pytest.importorskip("kaldilm")

from k2quant.plan import LayerConfig, Plan  # noqa: E402

LEXICON = [("X", ["A"]), ("Y", ["B"]), ("Z", ["A", "B"]), ("W", ["B", "A"])]
WORDS = ["X", "Y", "Z", "W"]
PHONES = {"A": 0, "B": 1}
FEAT_DIM = 8
ARPA = """\\data\\
ngram 1=6

\\1-grams:
-0.60206 </s>
-99 <s>
-0.60206 X
-0.60206 Y
-0.60206 Z
-0.60206 W

\\end\\
"""
TINY_MODEL = dict(hidden_dim=24, bottleneck_dims=12, strides=[1, 0, 3],
                  prefinal_bottleneck=12, dropout_schedule=None)
TRAIN_CONFIG = dict(utt_cmn=True, den_lm_order=2, leaky_hmm=0.1, den_scale=1.0,
                    xent_regularize=0.0, den_output_beam=10.0, seed=1)


def _write_cuts(path: Path, feats_dir: Path, n: int, seed: int, prefix: str):
    from lhotse import CutSet, MonoCut, SupervisionSegment
    from lhotse.features.base import Features
    from lhotse.features.io import NumpyFilesWriter

    rng = np.random.RandomState(seed)
    patterns = np.random.RandomState(123).randn(len(PHONES) + 1, FEAT_DIM).astype(np.float32) * 2
    lex = dict(LEXICON)
    cuts = []
    with NumpyFilesWriter(feats_dir) as w:
        for i in range(n):
            words = [WORDS[j] for j in rng.randint(0, len(WORDS), size=rng.randint(1, 4))]
            phones = [p for wd in words for p in lex[wd]]
            blocks = [np.repeat(patterns[None, -1], 6, 0)]  # leading "silence"
            blocks += [np.repeat(patterns[None, PHONES[p]], 9, 0) for p in phones]
            blocks.append(np.repeat(patterns[None, -1], 6, 0))
            frames = np.concatenate(blocks) + 0.3 * rng.randn(sum(len(b) for b in blocks),
                                                               FEAT_DIM).astype(np.float32)
            uid = f"{prefix}{i}"
            key = w.write(uid, frames)
            dur = frames.shape[0] * 0.01
            f = Features(type="synthetic", num_frames=frames.shape[0], num_features=FEAT_DIM,
                         frame_shift=0.01, sampling_rate=16000, start=0, duration=dur,
                         storage_type=w.name, storage_path=str(w.storage_path), storage_key=key)
            sup = SupervisionSegment(id=uid, recording_id=uid, start=0, duration=dur,
                                     text=" ".join(words))
            cuts.append(MonoCut(id=uid, start=0, duration=dur, channel=0, supervisions=[sup],
                                features=f))
    CutSet.from_cuts(cuts).to_file(path)
    return path


def tiny_setup(root: Path, train_steps: int = 30):
    """Lang dir + HLG, train/dev cuts and a briefly trained fp32 checkpoint under ``root``."""
    from k2quant.decode.graph import compile_hlg
    from k2quant.lang import prepare_lang
    from k2quant.models.tdnnf import TdnnF, TdnnFConfig
    from k2quant.training.checkpoint import save_checkpoint
    from k2quant.training.dataset import (AsrDataset, load_cuts, make_dataloader,
                                          make_eval_sampler)
    from k2quant.training.train import MmiObjective, TrainConfig

    root = Path(root)
    lang = prepare_lang(LEXICON, root / "lang", topo="chain")
    (root / "lm.arpa").write_text(ARPA)
    compile_hlg(lang, root / "lm.arpa")
    train = _write_cuts(root / "cuts_train.jsonl.gz", root / "feats_train", 24, 0, "tr")
    dev = _write_cuts(root / "cuts_dev.jsonl.gz", root / "feats_dev", 8, 1, "dev")
    num_pdfs = 2 * 3 + 1  # A, B, SPN
    torch.manual_seed(0)
    model = TdnnF(TdnnFConfig(feat_dim=FEAT_DIM, num_classes=num_pdfs, **TINY_MODEL))
    cfg = dict(TRAIN_CONFIG, exp_dir=str(root / "exp"), lang_dir=str(lang),
               train_cuts=str(train))
    tcfg = TrainConfig.from_dict(cfg)
    texts = [s.text for c in load_cuts(train) for s in c.supervisions]
    obj = MmiObjective(str(lang), torch.device("cpu"), tcfg, train_texts=texts)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    dl = make_dataloader(AsrDataset(), make_eval_sampler(load_cuts(train), max_duration=2.0))
    step = 0
    model.train()
    while step < train_steps:
        for batch in dl:
            loss, _ = obj(model, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step >= train_steps:
                break
    model.eval()
    ckpt = root / "exp" / "epoch-1.pt"
    save_checkpoint(ckpt, model, epoch=1, config=tcfg.to_dict(), rng=False)
    return {"root": root, "lang": Path(lang), "train": train, "dev": dev, "model": ckpt,
            "num_pdfs": num_pdfs}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("qat_tiny"))


def _loss(model, lang, cuts, base):
    """Mean LF-MMI loss per frame of ``model`` (eval mode) over ``cuts``."""
    from k2quant.compress import _objective
    from k2quant.training.dataset import AsrDataset, load_cuts, make_dataloader, make_eval_sampler

    obj = _objective(lang, base, [s.text for c in load_cuts(cuts) for s in c.supervisions], 3,
                     torch.device("cpu"))
    model.eval()
    tot = frames = 0.0
    with torch.no_grad():
        for batch in make_dataloader(AsrDataset(), make_eval_sampler(load_cuts(cuts), 2.0)):
            _, st = obj(model, batch)
            tot += st["loss"]
            frames += st["frames"]
    return tot / frames


@pytest.mark.parametrize("kind", ["lsq", "general"])
def test_qat_lowers_loss_and_packed_equals_fake_quant(tiny, tmp_path, kind):
    from k2quant.export import load_packed
    from k2quant.qat import QatConfig, build_qat_model, export_packed, load_fp32_model, run_qat

    fp32, info = load_fp32_model(tiny["model"])
    plan = Plan({}, default=LayerConfig(weight_bits=2, weight_quantizer=kind))
    dims = {"tdnnfs.0": 8}
    before = _loss(build_qat_model(fp32, plan, dims), tiny["lang"], tiny["train"], info["config"])
    cfg = QatConfig(exp_dir=str(tmp_path / "qat"), lang_dir=str(tiny["lang"]),
                    train_cuts=str(tiny["train"]), num_epochs=3, lr=3e-3, final_lr=1e-3,
                    max_duration=2.0, num_buckets=2, log_interval=0)
    res = run_qat(fp32, plan, cfg, dims=dims, base_config=info["config"], source="tiny")
    after = _loss(res.model, tiny["lang"], tiny["train"], info["config"])
    assert math.isfinite(after) and after < before - 1e-3, (before, after)
    assert [h["epoch"] for h in res.history] == [1, 2, 3]
    assert [h["bn_frozen"] for h in res.history] == [False, True, True]
    assert res.model.tdnnfs[0].linear.weight.shape[0] == 8  # dims applied before quantize_
    assert (tmp_path / "qat" / "qat-epoch-3.pt").is_file()
    # packed model == fake-quant model (eval mode), bit for bit
    info_p = export_packed(res.model, tmp_path / "m.k2q")
    assert info_p["avg_bits"] == pytest.approx(2.0)
    packed = load_packed(tmp_path / "m.k2q")
    x = torch.randn(2, 40, FEAT_DIM, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(packed(x), res.model.eval()(x))
    # the fp32 model is untouched
    assert fp32.tdnnfs[0].linear.weight.shape[0] == TINY_MODEL["bottleneck_dims"]


def test_qat_resumes_and_skips_finished_epochs(tiny, tmp_path):
    from k2quant.qat import QatConfig, load_fp32_model, run_qat

    fp32, info = load_fp32_model(tiny["model"])
    plan = Plan({"output": LayerConfig(weight_bits=8, weight_quantizer="lsq")},
                default=LayerConfig(weight_bits=3, weight_quantizer="lsq"))
    kw = dict(exp_dir=str(tmp_path / "qat"), lang_dir=str(tiny["lang"]),
              train_cuts=str(tiny["train"]), lr=2e-3, final_lr=1e-3, max_duration=2.0,
              num_buckets=2, log_interval=0)
    full = run_qat(fp32, plan, QatConfig(num_epochs=2, **kw), base_config=info["config"],
                   source="s")
    assert full.resumed_from == 0 and len(full.history) == 2
    # an interrupted run (epoch 2 lost) resumes after epoch 1 and ends bit-identical
    (tmp_path / "qat" / "qat-epoch-2.pt").unlink()
    two = run_qat(fp32, plan, QatConfig(num_epochs=2, **kw), base_config=info["config"], source="s")
    assert two.resumed_from == 1 and len(two.history) == 2
    sa, sb = full.model.state_dict(), two.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), "resumed run differs from a full run"
    # a finished run is not redone
    again = run_qat(fp32, plan, QatConfig(num_epochs=2, **kw), base_config=info["config"],
                    source="s")
    assert again.resumed_from == 2
    sc = again.model.state_dict()
    assert all(torch.equal(sa[k], sc[k]) for k in sa)
    # another plan does not resume from these checkpoints
    other = Plan({}, default=LayerConfig(weight_bits=4, weight_quantizer="lsq"))
    r = run_qat(fp32, other, QatConfig(num_epochs=1, **kw), base_config=info["config"], source="s")
    assert r.resumed_from == 0


def test_orthonormal_constraint_only_on_float_layers(tiny):
    from k2quant.qat import build_qat_model, constrain_float_layers, load_fp32_model

    fp32, _ = load_fp32_model(tiny["model"])
    plan = Plan({"re:tdnnfs\\..*": LayerConfig(weight_bits=4, weight_quantizer="lsq")})
    m = build_qat_model(fp32, plan)
    q_before = m.tdnnfs[0].linear.weight.detach().clone()
    f_before = m.prefinal_l.weight.detach().clone()
    n = constrain_float_layers(m)
    assert n == 2  # prefinal_l, prefinal_chain.linear (float); tdnnfs.*.linear are quantized
    assert torch.equal(m.tdnnfs[0].linear.weight, q_before)
    assert not torch.equal(m.prefinal_l.weight, f_before)


def test_qat_plan_naming_missing_layer_is_an_error(tiny, tmp_path):
    from k2quant.qat import QatConfig, load_fp32_model, run_qat

    fp32, info = load_fp32_model(tiny["model"])
    plan = Plan({"tdnnfs.7.linear": LayerConfig(weight_bits=4)})
    cfg = QatConfig(exp_dir=str(tmp_path / "q"), lang_dir=str(tiny["lang"]),
                    train_cuts=str(tiny["train"]), num_epochs=1)
    with pytest.raises(ValueError, match="names layers the model lacks.*tdnnfs.7.linear"):
        run_qat(fp32, plan, cfg, base_config=info["config"])
