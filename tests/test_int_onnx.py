"""ONNX export of the integer TDNN-F: onnxruntime reproduces the dyadic reference bit for bit
(codes at every activation point, output accumulators) and the log-probs to float32
rounding; bad models and arguments are rejected."""
import os

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from k2quant.infer.calibrate import collect_activation_ranges  # noqa: E402
from k2quant.infer.int_engine import IntLayer, IntTdnnF  # noqa: E402
from k2quant.infer.onnx_export import (  # noqa: E402
    _Builder,
    _layer,
    build_onnx_model,
    export_onnx,
    onnx_feed,
)

from test_infer_engine import make_model, model, ranges, speech_like  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("one_thread")

LOGPROB_TOL = 1e-5


def session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run(sess, feed):
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feed)))


@pytest.fixture(scope="module")
def eng(model, ranges):
    return IntTdnnF.from_model(model, ranges, backend="float64")


def compare(eng, sess, x, inputs, pad=True):
    ref, codes = eng.dyadic_reference_forward(x, pad=pad, return_codes=True)
    got = run(sess, onnx_feed(eng, x, pad=pad, inputs=inputs))
    # integer codes at every activation point: bit for bit
    for point, c in codes.items():
        g = got[f"codes/{point}"]
        assert g.dtype == np.uint8
        assert g.shape == tuple(c.shape), (point, g.shape, c.shape)
        assert np.array_equal(g.astype(np.int64), c.numpy()), point
    pre = codes["prefinal_chain.batchnorm2"].numpy()
    assert np.array_equal(got["prefinal_codes"].astype(np.int64), pre)
    L = eng.layers["output"]
    acc = eng._ref_layer(L, codes["prefinal_chain.batchnorm2"].transpose(1, 2)).transpose(1, 2)
    assert got["output_acc"].dtype == np.int32
    assert np.array_equal(got["output_acc"].astype(np.int64), acc.numpy())
    lp = got["log_probs"]
    assert lp.dtype == np.float32 and lp.shape == tuple(ref.shape)
    diff = float(np.abs(lp - ref.numpy()).max())
    print(f"T={x.shape[1]} inputs={inputs}: log-probs max |onnx - reference| = {diff:.3g}")
    assert diff <= LOGPROB_TOL, diff
    return diff


@pytest.mark.parametrize("inputs", ["features", "codes"])
def test_onnx_matches_dyadic_reference(eng, tmp_path, inputs):
    path = export_onnx(eng, tmp_path / "int.onnx", inputs=inputs, all_codes=True)
    assert path.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["int.onnx"]  # atomic: no temp left
    sess = session(path)
    for n, t, seed in ((3, 57, 1), (2, 113, 2), (4, 1, 3), (1, 240, 4)):
        compare(eng, sess, speech_like(n, t, seed), inputs)


def test_onnx_unpadded_and_minimal_outputs(eng, tmp_path):
    path = export_onnx(eng, tmp_path / "m.onnx", opset=13)
    sess = session(path)
    assert [o.name for o in sess.get_outputs()] == ["log_probs", "output_acc", "prefinal_codes"]
    x = speech_like(2, eng.left_context + eng.right_context + 30, 5)
    ref = eng.dyadic_reference_forward(x, pad=False)
    got = run(sess, onnx_feed(eng, x, pad=False))
    assert got["log_probs"].shape == tuple(ref.shape)
    assert float(np.abs(got["log_probs"] - ref.numpy()).max()) <= LOGPROB_TOL
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["left_context"] == str(eng.left_context)
    assert meta["subsampling_factor"] == str(eng.subsampling_factor)


def test_onnx_mixed_activation_bits(model, ranges, tmp_path):
    eng = IntTdnnF.from_model(model, ranges, backend="float64",
                              point_bits={"tdnnfs.1.linear": 4, "tdnnfs.2": 6,
                                          "prefinal_l": 5})
    sess = session(export_onnx(eng, tmp_path / "mixed.onnx", all_codes=True))
    for n, t, seed in ((2, 80, 6), (3, 33, 7)):
        compare(eng, sess, speech_like(n, t, seed), "features")


@pytest.mark.parametrize("strides", [[1, 0, 1], [1, 1, 3, 0, 3]])
def test_onnx_stride_layouts(strides, tmp_path):
    """Subsampling after the last tdnnf layer / in the middle, stride-0 (kernel-1) layers."""
    m = make_model(seed=5, hidden=48, strides=strides)
    r = collect_activation_ranges(m, [speech_like(2, 100, 1)])
    eng = IntTdnnF.from_model(m, r, backend="float64")
    sess = session(export_onnx(eng, tmp_path / "s.onnx", all_codes=True))
    for n, t, seed in ((2, 1, 8), (3, 5, 9), (2, 41, 10)):
        compare(eng, sess, speech_like(n, t, seed), "features")


def test_onnx_rounding_shift_floor_on_negative_numerators(tmp_path):
    """One linear (no ReLU) layer with signed multipliers and a bypass: many negative,
    non-multiple numerators, so a truncating division would differ from the floor."""
    g = torch.Generator().manual_seed(0)
    out, cin, k, e = 16, 12, 3, 18
    L = IntLayer(name="layer", W=torch.randint(-127, 128, (out, cin, k), generator=g,
                                               dtype=torch.int8),
                 w_scale=torch.ones(out, dtype=torch.float64), dilation=2, relu=False,
                 z_in=77, bits_in=8, B=torch.randint(-5000, 5000, (out,), generator=g),
                 m=torch.randint(-900, 900, (out,), generator=g), e=e,
                 C=torch.randint(-(1 << 20), 1 << 20, (out,), generator=g), z_out=131,
                 bits_out=8, mx=-150001, z_x=90, bypass_offset=2)
    from onnx import TensorProto, helper, numpy_helper

    b = _Builder(helper, numpy_helper, TensorProto)
    _layer(b, L, "c", "cx", out="q")
    graph = helper.make_graph(
        b.nodes, "one_layer",
        [helper.make_tensor_value_info("c", TensorProto.UINT8, ["N", cin, "T"]),
         helper.make_tensor_value_info("cx", TensorProto.UINT8, ["N", out, "T"])],
        [helper.make_tensor_value_info("q", TensorProto.UINT8, ["N", out, "T2"])],
        initializer=b.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = helper.find_min_ir_version_for(list(m.opset_import))
    onnx.checker.check_model(m)
    p = tmp_path / "layer.onnx"
    p.write_bytes(m.SerializeToString())
    c = torch.randint(0, 256, (3, cin, 50), generator=g)
    cx = torch.randint(0, 256, (3, out, 50), generator=g)
    ref = IntTdnnF._ref_layer(None, L, c, cx)
    # the numerators really are mostly negative and not multiples of 2**e
    x = (c - L.z_in).to(torch.float64)
    acc = torch.round(torch.nn.functional.conv1d(x, L.W.to(torch.float64), dilation=2))
    num = (acc.to(torch.int64) + L.B[:, None]) * L.m[:, None] + L.C[:, None]
    assert (num < 0).float().mean() > 0.3
    assert ((ref > 0) & (ref < 255)).float().mean() > 0.3  # not all clipped
    got = session(p).run(None, {"c": c.to(torch.uint8).numpy(),
                                "cx": cx.to(torch.uint8).numpy()})[0]
    assert np.array_equal(got.astype(np.int64), ref.numpy())


def test_onnx_export_rejects_bad_models_and_arguments(eng, tmp_path):
    with pytest.raises(ValueError, match="expected an IntTdnnF"):
        export_onnx(object(), tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="opset"):
        export_onnx(eng, tmp_path / "x.onnx", opset=9)
    with pytest.raises(ValueError, match="inputs must be"):
        export_onnx(eng, tmp_path / "x.onnx", inputs="wav")
    with pytest.raises(ValueError):  # wrong feature dimension
        onnx_feed(eng, torch.zeros(1, 20, eng.feat_dim + 1))
    # accumulators that could overflow int32: the message names the layer
    import copy

    bad = copy.copy(eng)
    bad.layers = dict(eng.layers)
    L = copy.copy(eng.layers["prefinal_l"])
    L.W = torch.full((L.out_features, 200000, 1), 127, dtype=torch.int8)
    bad.layers["prefinal_l"] = L
    with pytest.raises(ValueError, match="prefinal_l.*2\\*\\*31"):
        build_onnx_model(bad)
    assert not os.path.exists(tmp_path / "x.onnx")


def test_onnx_runtime_rejects_wrong_feature_dim(eng, tmp_path):
    sess = session(export_onnx(eng, tmp_path / "f.onnx"))
    with pytest.raises(Exception):
        sess.run(None, {"features": np.zeros((1, 40, eng.feat_dim + 3), np.float32)})
