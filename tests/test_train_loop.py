"""Training loop mechanics on a synthetic feature corpus (no k2 needed, lhotse needed).

A toy model (BatchNorm + dropout + subsampling) and a CTC loss over letters stand in for TDNN-F
and LF-MMI, so these tests check the loop itself: bit-exact resume, checkpoint contents and
averaging, the LR schedule, logging outputs, bad inputs.
"""
import json
import random

import numpy as np
import pytest
import torch
import torch.nn as nn

lhotse = pytest.importorskip("lhotse")

from k2quant.training import checkpoint as ck  # noqa: E402
from k2quant.training.dataset import AsrDataset, NonFiniteFeaturesError, supervision_segments  # noqa: E402
from k2quant.training.train import LrSchedule, TrainConfig, train  # noqa: E402

LETTERS = "abcdefgh"


def make_feature_corpus(tmp_path, n=24, feat_dim=8, seed=0, nan_cut=None):
    """Cuts whose features encode their text: each letter is 12 frames of a letter pattern."""
    from lhotse import CutSet, MonoCut, SupervisionSegment
    from lhotse.features.io import NumpyFilesWriter
    from lhotse.features.base import Features

    rng = np.random.RandomState(seed)
    patterns = rng.randn(len(LETTERS), feat_dim).astype(np.float32) * 2
    cuts = []
    with NumpyFilesWriter(tmp_path / "feats") as w:
        for i in range(n):
            text = "".join(rng.choice(list(LETTERS), size=rng.randint(2, 6)))
            frames = np.concatenate([np.repeat(patterns[None, LETTERS.index(c)], 12, 0) for c in text])
            frames = frames + 0.3 * rng.randn(*frames.shape).astype(np.float32)
            if nan_cut is not None and i == nan_cut:
                frames[3, 2] = np.nan
            key = w.write(f"utt{i}", frames)
            num_frames = frames.shape[0]
            dur = num_frames * 0.01
            feats = Features(type="toy", num_frames=num_frames, num_features=feat_dim,
                             frame_shift=0.01, sampling_rate=16000, start=0, duration=dur,
                             storage_type=w.name, storage_path=str(w.storage_path), storage_key=key)
            sup = SupervisionSegment(id=f"utt{i}", recording_id=f"rec{i}", start=0, duration=dur,
                                     text=" ".join(text.upper()))
            cuts.append(MonoCut(id=f"utt{i}", start=0, duration=dur, channel=0,
                                supervisions=[sup], features=feats))
    cs = CutSet.from_cuts(cuts)
    path = tmp_path / "cuts_train.jsonl.gz"
    cs.to_file(path)
    return path


class ToyModel(nn.Module):
    subsampling_factor = 3

    def __init__(self, feat_dim=8, num_classes=len(LETTERS) + 1):
        super().__init__()
        self.inp = nn.Linear(feat_dim * 3, 32)
        self.bn = nn.BatchNorm1d(32)
        self.drop = nn.Dropout(0.1)
        self.out = nn.Linear(32, num_classes)
        self.progress_seen = []
        self.constrained = 0

    def forward(self, x):
        n, t, c = x.shape
        t3 = t // 3
        x = x[:, : t3 * 3].reshape(n, t3, 3 * c)
        h = torch.relu(self.inp(x))
        h = self.bn(h.transpose(1, 2)).transpose(1, 2)
        return torch.log_softmax(self.out(self.drop(h)), dim=-1)

    def set_training_progress(self, p):
        self.progress_seen.append(p)

    def constrain_orthonormal(self):
        self.constrained += 1

    def model_spec(self):
        return {"arch": "toy", "config": {}}


def ctc_objective(cfg, device):
    def fn(model, batch):
        x = batch["inputs"].to(device)
        lp = model(x)
        seg, texts, _ = supervision_segments(batch["supervisions"], 3)
        targets = [torch.tensor([LETTERS.index(w.lower()) + 1 for w in t.split()]) for t in texts]
        lens = seg[:, 2].long()
        lp_sel = lp[seg[:, 0].long()].transpose(0, 1)
        loss = nn.functional.ctc_loss(lp_sel, torch.cat(targets), lens,
                                      torch.tensor([len(t) for t in targets]), reduction="sum",
                                      zero_infinity=True)
        return loss, {"loss": float(loss.detach()), "frames": float(lens.sum())}
    return fn


def _cfg(tmp_path, cuts, **kw):
    lang = tmp_path / "lang"
    lang.mkdir(exist_ok=True)
    d = dict(exp_dir=str(tmp_path / "exp"), lang_dir=str(lang), train_cuts=str(cuts),
             valid_cuts=str(cuts), num_epochs=2, max_duration=2.0, seed=7, lr=3e-3,
             final_lr=1e-3, warmup_steps=3, progress_bar=False, tensorboard=True,
             orthonormal_every=2, num_buckets=2)
    d.update(kw)
    return TrainConfig(**d)


def _params(path):
    return torch.load(path, map_location="cpu")["model"]


def test_resume_is_bit_identical(tmp_path):
    cuts = make_feature_corpus(tmp_path)
    a = tmp_path / "a"
    a.mkdir()
    hist = train(_cfg(a, cuts, spec_augment=True), model_factory=lambda c: ToyModel(),
                 loss_factory=ctc_objective)
    assert len(hist) == 2 and hist[1]["train_loss_per_frame"] < hist[0]["train_loss_per_frame"] * 1.5

    b = tmp_path / "b"
    b.mkdir()
    # same run, killed in the first batch of epoch 2 (after epoch-1.pt was written) ...
    n1 = hist[0]["train_batches"] + hist[0]["skipped_batches"]
    calls = {"n": 0}

    def crashing_objective(cfg, device):
        inner = ctc_objective(cfg, device)

        def fn(model, batch):
            if model.training:
                calls["n"] += 1
                if calls["n"] > n1:
                    raise KeyboardInterrupt("simulated crash")
            return inner(model, batch)
        return fn

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(b, cuts, spec_augment=True), model_factory=lambda c: ToyModel(),
              loss_factory=crashing_objective)
    assert (b / "exp" / "epoch-1.pt").is_file() and not (b / "exp" / "epoch-2.pt").exists()
    # ... then resumed with --start-epoch 2 in a fresh process state
    # the interrupted process's RNG state must not matter
    random.seed(123), np.random.seed(123), torch.manual_seed(123)
    train(_cfg(b, cuts, num_epochs=2, start_epoch=2, spec_augment=True),
          model_factory=lambda c: ToyModel(), loss_factory=ctc_objective)

    pa, pb = _params(a / "exp" / "epoch-2.pt"), _params(b / "exp" / "epoch-2.pt")
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), f"{k} differs after resume"
    # and the run did change the parameters
    p1 = _params(a / "exp" / "epoch-1.pt")
    assert not torch.equal(p1["out.weight"], pa["out.weight"])


def test_checkpoint_contents_and_logs(tmp_path):
    cuts = make_feature_corpus(tmp_path)
    cfg = _cfg(tmp_path, cuts, num_epochs=1)
    train(cfg, model_factory=lambda c: ToyModel(), loss_factory=ctc_objective)
    exp = tmp_path / "exp"
    c = torch.load(exp / "epoch-1.pt")
    for key in ("model", "model_spec", "optimizer", "scheduler", "sampler", "rng", "epoch",
                "step", "config"):
        assert key in c, key
    assert set(c["rng"]) >= {"python", "numpy", "torch"}
    assert c["config"]["seed"] == 7 and c["epoch"] == 1 and c["step"] > 0
    hist = json.loads((exp / "train-history.json").read_text())
    assert hist[0]["input_frames_per_second"] > 0
    assert any(k.startswith("peak_mem_mb_") for k in hist[0])
    assert "valid_loss_per_frame" in hist[0]
    assert list((exp / "tensorboard").iterdir()), "no tensorboard event file"
    logs = list((exp / "log").glob("log-train-*.txt"))
    assert logs and "training configuration" in logs[0].read_text()
    assert not list(exp.glob(".tmp-*")), "temporary checkpoint file left behind"


def test_average_checkpoints(tmp_path):
    m = ToyModel()
    sds = []
    for e in (1, 2, 3):
        with torch.no_grad():
            for p in m.parameters():
                p.fill_(float(e))
        ck.save_checkpoint(ck.checkpoint_path(tmp_path, e), m, epoch=e)
        sds.append({k: v.clone() for k, v in m.state_dict().items()})
    paths = ck.checkpoints_to_average(tmp_path, epoch=3, avg=2)
    assert [p.name for p in paths] == ["epoch-2.pt", "epoch-3.pt"]
    avg = ck.average_checkpoints(paths)
    assert torch.allclose(avg["model"]["out.weight"], torch.full_like(m.out.weight, 2.5))
    assert avg["model"]["bn.num_batches_tracked"].dtype == torch.int64
    with pytest.raises(FileNotFoundError, match="missing checkpoint"):
        ck.checkpoints_to_average(tmp_path, epoch=5, avg=2)
    with pytest.raises(ValueError, match="--avg <= 3"):
        ck.checkpoints_to_average(tmp_path, epoch=3, avg=4)


def test_lr_schedule_warmup_and_decay():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    s = LrSchedule(opt, lr=1e-3, final_lr=1e-4, warmup_steps=10, kind="exp")
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)  # 1/10 of warm-up
    for i in range(9):
        s.step(0.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    s.step(1.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)
    s.step(0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.1 ** 0.5)
    s2 = LrSchedule(opt, lr=1e-3, final_lr=1e-4, warmup_steps=10, kind="exp")
    s2.load_state_dict(s.state_dict())
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.1 ** 0.5)


def test_nan_features_name_the_cut(tmp_path):
    cuts_path = make_feature_corpus(tmp_path, n=4, nan_cut=2)
    cuts = lhotse.CutSet.from_file(cuts_path)
    with pytest.raises(NonFiniteFeaturesError, match="cut utt2: features contain NaN"):
        AsrDataset()[cuts]


def test_batch_layout_sorted_by_duration(tmp_path):
    cuts = lhotse.CutSet.from_file(make_feature_corpus(tmp_path, n=6))
    b = AsrDataset()[cuts]
    n = b["supervisions"]["num_frames"]
    assert b["inputs"].shape == (6, int(n.max()), 8)
    assert torch.all(n[:-1] >= n[1:])
    seg, texts, order = supervision_segments(b["supervisions"], 3)
    assert seg.dtype == torch.int32 and seg.shape == (6, 3)
    assert torch.equal(seg[:, 2], n[order] // 3)


def test_bad_config_errors(tmp_path):
    cuts = make_feature_corpus(tmp_path, n=2)
    with pytest.raises(FileNotFoundError, match="prepare-lang"):
        _cfg(tmp_path, cuts, lang_dir=str(tmp_path / "nope")).validate()
    with pytest.raises(ValueError, match="--start-epoch"):
        _cfg(tmp_path, cuts, start_epoch=5).validate()
    with pytest.raises(FileNotFoundError, match="epoch-1.pt not found"):
        train(_cfg(tmp_path, cuts, start_epoch=2), model_factory=lambda c: ToyModel(),
              loss_factory=ctc_objective)


def test_augmentations_keep_batch_consistent(tmp_path):
    from k2quant.training.dataset import SpecAugment

    cuts = lhotse.CutSet.from_file(make_feature_corpus(tmp_path, n=6))
    plain = AsrDataset()[cuts]
    torch.manual_seed(0)
    aug = AsrDataset(spec_augment=SpecAugment(max_freq_width=3), max_frame_shift=2)[cuts]
    d = plain["supervisions"]["num_frames"] - aug["supervisions"]["num_frames"]
    assert torch.all((d >= 0) & (d <= 2)) and d.sum() > 0
    assert aug["inputs"].shape[1] == int(aug["supervisions"]["num_frames"].max())
    assert (aug["inputs"] == 0).any()
    assert torch.all(aug["supervisions"]["start_frame"] == 0)
