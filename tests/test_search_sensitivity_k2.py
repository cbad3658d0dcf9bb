"""Sensitivity with the real LF-MMI loss (k2): does k2's double backward match FD?"""
import math

import pytest
import torch

k2 = pytest.importorskip("k2")
pytest.importorskip("kaldilm")

from k2quant.lang import prepare_lang  # noqa: E402
from k2quant.models.tdnnf import TdnnF, TdnnFConfig  # noqa: E402
from k2quant.search.allocate import allocate  # noqa: E402
from k2quant.search.sensitivity import check_hvp, compute_sensitivity  # noqa: E402
from k2quant.training.graph_compiler import MmiGraphCompiler  # noqa: E402
from k2quant.training.mmi import LFMMILoss  # noqa: E402

LEXICON = [("X", ["A"]), ("Y", ["B"]), ("Z", ["A", "B"]), ("W", ["A"]), ("W", ["B"])]
TRAIN = ["X Y", "Z", "X X Y", "Y Z X", "W"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("lang_sens")
    prepare_lang(LEXICON, d / "lang", topo="chain")
    gc = MmiGraphCompiler(d / "lang", train_texts=TRAIN, den_lm_order=2, phone_lm=d / "P.arpa")
    mmi = LFMMILoss(gc, den_output_beam=math.inf)
    torch.manual_seed(0)
    cfg = TdnnFConfig(feat_dim=8, num_classes=gc.lang.num_pdfs, hidden_dim=16,
                      bottleneck_dims=6, strides=[1, 0, 3], prefinal_bottleneck=8,
                      dropout_schedule=None)
    model = TdnnF(cfg).eval()
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(2):
        x = torch.randn(3, 30, 8, generator=g)
        segs = torch.tensor([[i, 0, 10] for i in range(3)], dtype=torch.int32)
        batches.append((x, segs, ["X Y", "Z X", "W Y"]))

    def loss_fn(m, b):
        loss, info = mmi(m(b[0]), b[1], b[2])
        return loss / info["num_frames"]

    return model, loss_fn, batches


def test_lfmmi_hvp_check_runs_and_auto_chooses(setup):
    model, loss_fn, batches = setup
    checks = [check_hvp(model, loss_fn, batches[0], layer, n_vectors=2)
              for layer in ("tdnn1.affine", "tdnnfs.1.linear", "output")]
    for c in checks:
        assert math.isfinite(c.vhv_fd) and math.isfinite(c.norm_fd) and c.norm_fd > 0
        assert c.autograd_error is not None or math.isfinite(c.rel_err)
    table = compute_sensitivity(model, loss_fn, batches[:1], bits=(2, 8), metrics=("hawq",),
                                n_samples=2)
    if all(c.ok for c in checks):
        assert table.method["hvp"] in ("autograd", "fd")
    else:
        # k2 (1.23.4) drops the second derivative of get_tot_scores: the autograd HVP is ~0
        assert table.method["hvp"] == "fd"
    for n, info in table.layers.items():
        assert math.isfinite(info.trace), n


def test_lfmmi_sensitivity_and_allocation(setup, tmp_path):
    model, loss_fn, batches = setup
    table = compute_sensitivity(model, loss_fn, batches, bits=(2, 4, 8), dims=[3],
                                metrics=("hawq", "kl", "loss"), n_samples=2, hvp="fd",
                                cache_path=tmp_path / "sens.json")
    assert table.get("tdnnfs.0", 32, 3).kl > 0
    for n in table.layers:
        assert table.get(n, 2).kl > table.get(n, 8).kl >= 0
    a = allocate(table, avg_bits=4, dims=True, metric="kl", min_bits={"output": 8})
    assert a.avg_bits <= 4 + 1e-9 and a.bits["output"] == 8
