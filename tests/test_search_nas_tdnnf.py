"""Mixed-precision NAS on a tiny TDNN-F: KL-to-fp32 surrogate loss, bottleneck-dim search, and
(with k2) the real LF-MMI loss as ``loss_fn``."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from k2quant.models.tdnnf import TdnnF, get_preset, refactor_bottleneck
from k2quant.plan import convert, model_size_bytes, quantizable_layers
from k2quant.search.nas import MixedPrecisionSupernet, search_mixed_precision

from test_search_nas import _fd_check, _quantized_size, metadata_bytes  # noqa: F401


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_tdnnf(num_classes: int = 12, seed: int = 0) -> TdnnF:
    torch.manual_seed(seed)
    cfg = get_preset("small", 10, num_classes, hidden_dim=24, bottleneck_dims=8,
                     prefinal_bottleneck=12, strides=[1, 0, 3, 3])
    return TdnnF(cfg).eval()


def kl_task(model: TdnnF):
    """Batches of random features and ``loss_fn`` = KL(fp32 model || searched model)."""
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 30, model.feat_dim, generator=g) for _ in range(2)]
    with torch.no_grad():
        refs = [model(x) for x in xs]
    batches = list(zip(xs, refs))

    def loss_fn(m, batch):
        x, ref = batch
        return F.kl_div(m(x), ref, log_target=True, reduction="batchmean")

    return batches, loss_fn


def test_tdnnf_search_with_kl_surrogate():
    model = tiny_tdnnf()
    before = copy.deepcopy(model.state_dict())
    batches, loss_fn = kl_task(model)
    r = search_mixed_precision(model, loss_fn, batches, avg_bits=4, steps=12, lr_weights=1e-3,
                               candidate_bits=(2, 4, 8), keep_model=True)
    assert set(r.bits) == set(quantizable_layers(model))  # every Conv1d/Linear leaf
    assert r.dims == {}
    assert r.avg_bits <= 4 + 1e-9
    assert _quantized_size(model, r) == pytest.approx(r.size_bytes, rel=1e-12)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # original untouched
    assert type(r.searched_model) is TdnnF
    assert r.searched_model.state_dict().keys() == before.keys()
    # the plan quantizes the model; its outputs stay log-probabilities close to the fp32 ones
    q = r.apply(copy.deepcopy(model)).eval()
    x, ref = batches[0]
    with torch.no_grad():
        out = q(x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    kl = F.kl_div(out, ref, log_target=True, reduction="batchmean")
    assert kl < 0.5, f"KL to fp32 after the searched 4-bit plan: {float(kl):.3f}"
    assert len(r.history) == 12 and all(math.isfinite(h["loss"]) for h in r.history)


def test_tdnnf_dims_search_meets_a_size_budget():
    model = tiny_tdnnf()
    batches, loss_fn = kl_task(model)
    sn = MixedPrecisionSupernet(model, (4, 8), dims=[4, 8])
    all4_full = sn.size_bytes({n: 4 for n in sn.layer_names})
    budget = 0.97 * all4_full  # unreachable without shrinking some bottleneck
    r = search_mixed_precision(model, loss_fn, batches, size_bytes=budget, steps=10,
                               candidate_bits=(4, 8), dims=[4, 8], lr_weights=1e-3)
    assert set(r.dims) == {"tdnnfs.0", "tdnnfs.1", "tdnnfs.2", "tdnnfs.3"}
    assert set(r.dims.values()) <= {4, 8} and min(r.dims.values()) == 4
    assert r.size_bytes <= budget
    assert r.candidate_dims == {k: [4, 8] for k in r.dims}
    # applying the dims (re-factorisation) and the plan gives exactly the predicted size
    q = r.apply(copy.deepcopy(model))
    for name, d in r.dims.items():
        assert q.get_submodule(f"{name}.linear").weight.shape[0] == d
        assert q.config.bottleneck_dims[int(name.split(".")[1])] == d
    real = model_size_bytes(q) + metadata_bytes(convert(q))
    assert real == pytest.approx(r.size_bytes, rel=1e-12)
    with torch.no_grad():
        assert torch.isfinite(q(batches[0][0])).all()
    assert model.config.bottleneck_dims == [8, 8, 8, 8]  # original untouched


def test_dims_fractions_and_per_layer_mapping():
    model = tiny_tdnnf()
    sn = MixedPrecisionSupernet(model, (4, 8), dims=[0.25, 0.5, 1.0])
    assert {k: c.dims for k, c in sn.choices.items()} == {f"tdnnfs.{i}": (2, 4, 8)
                                                           for i in range(4)}
    sn = MixedPrecisionSupernet(model, (4, 8), dims={"tdnnfs.2": [3, 8]})
    assert list(sn.choices) == ["tdnnfs.2"] and sn.choices["tdnnfs.2"].dims == (3, 8)
    with pytest.raises(ValueError, match="outside 1..8"):
        MixedPrecisionSupernet(model, (4, 8), dims=[9])
    with pytest.raises(ValueError, match="unknown TDNN-F layers"):
        MixedPrecisionSupernet(model, (4, 8), dims={"tdnnfs.9": [4]})
    with pytest.raises(ValueError, match="are not searched"):
        MixedPrecisionSupernet(model, (4, 8), layers=["tdnnfs.1.linear"],
                               dims={"tdnnfs.1": [4]})


def test_dim_mask_is_the_refactored_truncation():
    """One-hot dim d: the masked supernet equals the float model re-factorised to d (with
    8-bit weights, up to quantization error), and rows >= d of .linear are zero."""
    model = tiny_tdnnf()
    x = torch.randn(2, 30, model.feat_dim)
    sn = MixedPrecisionSupernet(model, (8,), dims=[4, 8], quantizer="uniform")
    with torch.no_grad():
        for c in sn.choices.values():
            c.alpha.copy_(torch.tensor([0.0, -1e4]))  # all mass on d = 4
    lin = sn.layers["tdnnfs.1.linear"].mixed_weight().detach()
    assert lin[4:].abs().max() == 0 and lin[:4].abs().min() >= 0 and lin[:4].abs().max() > 0
    ref = copy.deepcopy(model)
    for i in range(4):
        refactor_bottleneck(ref, i, 4)
    sn.model.eval()
    with torch.no_grad():
        got, want, full = sn.model(x), ref(x), model(x)
    err = (got - want).abs().max()
    assert err < 0.02 * want.abs().max(), float(err)
    assert err < 0.2 * (full - want).abs().max()  # far closer than the untruncated model


def test_expected_size_gradient_with_dims():
    model = tiny_tdnnf()
    for overhead in (False, True):
        sn = MixedPrecisionSupernet(model, (2, 4, 8), dims=[2, 4, 8], tau=0.8,
                                    count_overhead=overhead)
        torch.manual_seed(0)
        with torch.no_grad():
            for p in sn.arch_parameters():
                p.copy_(torch.randn(p.shape))
        _fd_check(sn.expected_size_bytes, sn.arch_parameters())
        _fd_check(sn.expected_avg_bits, sn.arch_parameters())
        # one-hot alphas: the expectation equals the discrete size
        with torch.no_grad():
            for p in sn.arch_parameters():
                p.fill_(-1e4)
                p[-1] = 0.0
        top = sn.size_bytes({n: 8 for n in sn.layer_names})
        assert float(sn.expected_size_bytes().detach()) == pytest.approx(top, rel=1e-12)


# --------------------------------------------------------------------------- LF-MMI (k2)
def test_lfmmi_loss_as_loss_fn(tmp_path):
    pytest.importorskip("k2")
    pytest.importorskip("kaldilm")
    from k2quant.lang import prepare_lang
    from k2quant.training.graph_compiler import MmiGraphCompiler
    from k2quant.training.mmi import LFMMILoss

    lexicon = [("X", ["A"]), ("Y", ["B"]), ("Z", ["A", "B"])]
    texts = ["X Y", "Z", "X X Y", "Y Z X"]
    prepare_lang(lexicon, tmp_path, topo="chain")
    compiler = MmiGraphCompiler(tmp_path, train_texts=texts, den_lm_order=2,
                                phone_lm=tmp_path / "P.arpa")
    mmi = LFMMILoss(compiler, den_output_beam=math.inf)
    model = tiny_tdnnf(num_classes=compiler.lang.num_pdfs)
    g = torch.Generator().manual_seed(0)
    batches = []
    for k in range(2):
        x = torch.randn(2, 30, model.feat_dim, generator=g)
        segs = torch.tensor([[0, 0, 10], [1, 0, 9]], dtype=torch.int32)
        batches.append((x, segs, texts[2 * k: 2 * k + 2]))

    def loss_fn(m, batch):
        x, segs, txt = batch
        loss, info = mmi(m(x), segs, txt)
        return loss / info["num_frames"]  # float64, per frame

    r = search_mixed_precision(model, loss_fn, batches, avg_bits=4, steps=4,
                               candidate_bits=(2, 4, 8), lr_weights=1e-3)
    assert r.avg_bits <= 4 and all(math.isfinite(h["task_loss"]) for h in r.history)
    assert _quantized_size(model, r) == pytest.approx(r.size_bytes, rel=1e-12)
