"""Integer-only engine: BN folding, dyadic multipliers, bit-exactness with the simulated
reference, closeness to fp32, streaming, bad inputs, persistence."""
import math
import random
from fractions import Fraction

import pytest
import torch

from k2quant.infer import IntTdnnF, dyadic_multiplier, fold_tdnnf, rounding_shift
from k2quant.infer.calibrate import collect_activation_ranges
from k2quant.infer.int_engine import BACKENDS, have_fbgemm, have_int_mm
from k2quant.infer.qtensor import have_qtensor
from k2quant.infer.streaming import chunked_forward
from k2quant.models.tdnnf import TdnnF, get_preset

from helpers import fbank_like

FEAT = 40


pytestmark = pytest.mark.usefixtures("one_thread")


def speech_like(n, t, seed):
    """Stationary, temporally smooth, fbank-like random features (N, T, FEAT)."""
    return fbank_like(n, t, seed, FEAT)


def make_model(seed=0, hidden=96, strides=None, **kw):
    torch.manual_seed(seed)
    cfg = get_preset("small", FEAT, 60, hidden_dim=hidden, bottleneck_dims=24,
                     prefinal_bottleneck=32, **({"strides": strides} if strides else {}), **kw)
    m = TdnnF(cfg)
    m.train()
    m.set_dropout_proportion(0.0)
    with torch.no_grad():  # realistic BatchNorm statistics
        for i in range(10):
            m(speech_like(4, 150, 100 + i))
    return m.eval()


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return make_model()


@pytest.fixture(scope="module")
def ranges(model):
    return collect_activation_ranges(model, [speech_like(4, 200, 7)])


def available_backends():
    """The dyadic back ends available here (they all compute the same integers)."""
    out = ["float64"]
    if have_int_mm():
        out.append("int_mm")
    if have_fbgemm():
        out.append("fbgemm")
    return out


# ------------------------------------------------------------------------------- folding
def test_bn_folding_exact_float(model):
    x = speech_like(2, 120, 1)
    folded = fold_tdnnf(model)
    with torch.no_grad():
        ref = model(x)
    got = folded.forward(x)
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=1e-5, rtol=0), float((got - ref).abs().max())


def test_bn_folding_affine_batchnorm_negative_gamma():
    m = make_model(seed=3)
    with torch.no_grad():  # give one BN affine params with negative scales
        bn = torch.nn.BatchNorm1d(m.config.hidden_dim, affine=True)
        bn.running_mean.copy_(m.tdnnfs[1].batchnorm.running_mean)
        bn.running_var.copy_(m.tdnnfs[1].batchnorm.running_var)
        bn.weight.uniform_(-2, 2)
        bn.bias.uniform_(-1, 1)
        m.tdnnfs[1].batchnorm = bn.eval()
    x = speech_like(2, 100, 2)
    with torch.no_grad():
        ref = m(x)
    assert torch.allclose(fold_tdnnf(m).forward(x), ref, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------- dyadic
def test_dyadic_multiplier_error_bound():
    rng = random.Random(0)
    for _ in range(2000):
        s = math.ldexp(rng.uniform(0.5, 1.0), rng.randint(-40, 10)) * rng.choice([1, -1])
        m, e = dyadic_multiplier(s)
        assert 2 ** 30 <= abs(m) < 2 ** 31
        approx = m / 2.0 ** e
        assert abs(approx - s) / abs(s) <= 2.0 ** -31
    assert dyadic_multiplier(0.0) == (0, 0)
    with pytest.raises(ValueError, match="finite"):
        dyadic_multiplier(float("nan"))


def test_rounding_shift_is_round_half_up():
    x = torch.arange(-40, 41, dtype=torch.int64)
    got = rounding_shift(x, 3)
    want = torch.floor(x.double() / 8 + 0.5).to(torch.int64)
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------- bit exactness
@pytest.mark.parametrize("backend", ["int_mm", "fbgemm", "float64", "qtensor"])
def test_engine_equals_reference_bit_exact(model, ranges, backend):
    if backend == "qtensor" and not have_qtensor():
        pytest.skip("qtensor needs fbgemm with exact u8 x s8 GEMMs")
    elif backend != "qtensor" and backend not in available_backends():
        pytest.skip(f"backend {backend} not available on torch {torch.__version__}")
    eng = IntTdnnF.from_model(model, ranges, backend=backend)
    x = speech_like(3, 700, 11)  # > one requantisation row block
    y, codes = eng(x, return_codes=True)
    y_ref, codes_ref = eng.reference_forward(x, return_codes=True)
    assert set(codes) == set(codes_ref)
    for k in codes_ref:
        assert torch.equal(codes[k], codes_ref[k]), k
    assert torch.equal(y, y_ref)  # float log-probs too, bit for bit


def test_backends_agree_and_fake_quant_view(model, ranges):
    x = speech_like(2, 300, 12)
    outs = [IntTdnnF.from_model(model, ranges, backend=b)(x) for b in available_backends()]
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
    eng = IntTdnnF.from_model(model, ranges, backend="float64")
    # float (real-multiplier) view of the same model: the dyadic rounding changes nothing
    # beyond float noise here
    assert torch.allclose(eng.fake_quant_forward(x), outs[0], atol=1e-4)


def test_mixed_4_8_plan_weights_exact(model, ranges):
    import copy

    from k2quant.plan import LayerConfig, Plan, convert, quantize_

    q = quantize_(copy.deepcopy(model), Plan({"re:tdnnfs\\.[0-3]\\..*": LayerConfig(weight_bits=4)},
                                             default=LayerConfig(weight_bits=8)))
    convert(q)
    eng = IntTdnnF.from_model(q, ranges, point_bits={"tdnnfs.1.linear": 4})
    assert eng.backend != "qtensor"  # 4-bit activation points: auto picks a dyadic back end
    L = eng.layers["tdnnfs.2.linear"]
    assert L.weight_bits == 4 and L.weight_exact
    assert int(L.W.abs().max()) <= 8
    # integer weights reproduce the fake-quant weights exactly
    w = q.tdnnfs[2].linear.quant_weight("weight").double()
    assert torch.allclose(L.W.double() * L.w_scale[:, None, None], w, rtol=1e-6, atol=0)
    assert eng.acts["tdnnfs.1.linear"].bits == 4
    x = speech_like(2, 200, 13)
    y, c = eng(x, return_codes=True)
    y2, c2 = eng.reference_forward(x, return_codes=True)
    assert torch.equal(y, y2)
    assert int(c["tdnnfs.1.linear"].max()) <= 15


# ---------------------------------------------------------------------------- accuracy
def test_integer_close_to_fp32(model, ranges):
    x = speech_like(4, 400, 21)
    with torch.no_grad():
        ref = model(x)
    for b in ["float64"] + (["qtensor"] if have_qtensor() else []):
        y = IntTdnnF.from_model(model, ranges, backend=b)(x)
        _check_close(y, ref)


def _check_close(y, ref):
    agree = float((y.argmax(-1) == ref.argmax(-1)).float().mean())
    kl = float((ref.exp() * (ref - y)).sum(-1).mean())
    assert agree > 0.95, f"top-1 frame agreement {agree:.3f} <= 0.95"
    assert kl < 0.01, f"KL(fp32 || int8) = {kl:.4f} >= 0.01"


# ---------------------------------------------------------------------------- streaming
@pytest.mark.parametrize("chunk", [1, 7, 50])
@pytest.mark.parametrize("backend", ["auto", "float64"])
def test_streaming_equals_whole_utterance_int(model, ranges, chunk, backend):
    eng = IntTdnnF.from_model(model, ranges, backend=backend)
    x = speech_like(2, 311, 31)
    assert torch.equal(eng.streaming_forward(x, chunk), eng(x))


def test_streaming_equals_whole_utterance_fp32(model):
    x = speech_like(1, 500, 32)
    with torch.no_grad():
        whole = model(x)
        chunked = chunked_forward(model.forward, x, model.left_context, model.right_context,
                                  model.subsampling_factor, 13)
    assert chunked.shape == whole.shape
    assert torch.allclose(chunked, whole, atol=1e-5, rtol=0)


def test_short_utterance_and_stride_layout():
    # strides whose last layer is not a multiple of 3: subsampling after the last tdnnf
    m = make_model(seed=5, hidden=48, strides=[1, 0, 1])
    r = collect_activation_ranges(m, [speech_like(2, 100, 1)])
    for b in ["float64"] + (["qtensor"] if have_qtensor() else []):
        _short_utterances(IntTdnnF.from_model(m, r, backend=b))


def _short_utterances(eng):
    for T in (1, 2, 5, 40):
        x = speech_like(1, T, T)
        y = eng(x)
        assert y.shape == (1, (T + 2) // 3, 60)
        assert torch.equal(y, eng.reference_forward(x))
        assert torch.equal(eng.streaming_forward(x, 2), y)


# ---------------------------------------------------------------------------- bad inputs
def test_wrong_feature_dim(model, ranges):
    eng = IntTdnnF.from_model(model, ranges)
    with pytest.raises(ValueError, match=r"expected features \(N, T, 40\), got \(2, 50, 80\)"):
        eng(torch.randn(2, 50, 80))
    with pytest.raises(ValueError, match=r"expected features \(N, T, 40\)"):
        eng(torch.randn(50, 40))
    with pytest.raises(ValueError, match="need at least"):
        eng(torch.randn(1, 10, 40), pad=False)


def test_ranges_from_other_model_rejected(model, ranges):
    other = make_model(seed=1, hidden=64)
    with pytest.raises(ValueError, match="different model spec"):
        IntTdnnF.from_model(other, ranges)
    r = {k: v for k, v in ranges.items() if k != "spec"}
    r.pop("tdnnfs.3")
    with pytest.raises(ValueError, match=r"missing \['tdnnfs.3'\]"):
        IntTdnnF.from_model(model, r)


def test_save_load_and_wrong_export(model, ranges, tmp_path):
    eng = IntTdnnF.from_model(model, ranges)
    p = tmp_path / "int.pt"
    eng.save(p)
    back = IntTdnnF.load(p, expected_spec=model.model_spec())
    x = speech_like(1, 90, 3)
    assert torch.equal(back(x), eng(x))
    with pytest.raises(ValueError, match="different model spec"):
        IntTdnnF.load(p, expected_spec=make_model(seed=2, hidden=64).model_spec())
    st = torch.load(p)
    st["version"] = 99
    torch.save(st, tmp_path / "v99.pt")
    with pytest.raises(ValueError, match="format version 99"):
        IntTdnnF.load(tmp_path / "v99.pt")
    torch.save({"model": {}}, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="not a k2quant integer TDNN-F"):
        IntTdnnF.load(tmp_path / "ckpt.pt")


def test_from_packed_and_mismatched_packed(model, ranges, tmp_path):
    import copy

    from k2quant.export import save_packed
    from k2quant.plan import LayerConfig, Plan, convert, quantize_

    q = quantize_(copy.deepcopy(model), Plan(default=LayerConfig(weight_bits=8)))
    convert(q)
    path = tmp_path / "m.k2q"
    save_packed(q, path)
    eng = IntTdnnF.from_packed(path, ranges)
    direct = IntTdnnF.from_model(q, ranges)
    x = speech_like(1, 120, 4)
    assert torch.equal(eng(x), direct(x))
    # a packed file of another model version: ranges do not fit
    other = quantize_(make_model(seed=1, hidden=64), Plan(default=LayerConfig(weight_bits=8)))
    convert(other)
    save_packed(other, tmp_path / "other.k2q")
    with pytest.raises(ValueError, match="different model spec"):
        IntTdnnF.from_packed(tmp_path / "other.k2q", ranges)


def test_memory_ratio(model, ranges):
    from k2quant.infer.int_engine import fp32_reference_bytes

    eng = IntTdnnF.from_model(model, ranges)
    mem, ref = eng.memory_report(), fp32_reference_bytes(model)
    # int8 weight matrices vs fp32 ones (biases and requantisation constants are reported
    # separately by the benchmark; relative to the weights they matter only for tiny widths)
    assert ref["weight_bytes"] / mem["weight_bytes"] >= 3.9
    assert mem["engine_bytes"] < ref["total_bytes"] / 3


def test_unknown_backend(model, ranges):
    with pytest.raises(ValueError, match="unknown integer backend"):
        IntTdnnF.from_model(model, ranges, backend="cuda")
    assert "auto" in BACKENDS


@pytest.mark.slow
def test_compiled_requant_bit_exact(model, ranges):
    if not have_int_mm() or not hasattr(torch, "compile"):
        pytest.skip("needs torch >= 2 with torch._int_mm")
    eng = IntTdnnF.from_model(model, ranges, backend="int_mm")
    x = speech_like(2, 400, 41)
    eager = eng(x)
    eng.set_backend("int_mm", compile=True)  # compiles (about a minute the first time)
    assert torch.equal(eng(x), eager)
    assert torch.equal(eng.streaming_forward(x, 9), eager)


def test_fbgemm_chunks_keep_accumulators_exact():
    if not have_fbgemm():
        pytest.skip("no fbgemm")
    from k2quant.infer.int_engine import IntLayer, _fbgemm_chunks, _Prepared

    g = torch.Generator().manual_seed(0)
    W = torch.randint(100, 128, (8, 1500, 2), generator=g).to(torch.int8)  # huge |acc|
    W[::2] = -W[::2]
    L = IntLayer(name="big", W=W, w_scale=torch.ones(8, dtype=torch.float64), dilation=1,
                 relu=False, z_in=0, bits_in=8, out_scale=torch.ones(8),
                 out_bias=torch.zeros(8))
    P = _Prepared(L, "fbgemm")
    assert len(P.chunks) > 1
    Wm = W.permute(0, 2, 1).reshape(8, -1)  # tap-major, as the engine stacks the taps
    for k0, k1 in _fbgemm_chunks(Wm):
        assert int(Wm[:, k0:k1].abs().to(torch.int64).sum(1).max()) * 255 < 2 ** 24
    a = torch.randint(200, 256, (37, 3000), generator=g).to(torch.uint8)
    want = a.to(torch.int64) @ Wm.to(torch.int64).t()
    assert int(want.abs().max()) > 2 ** 24
    assert torch.equal(P.mm(a), want)


# ---------------------------------------------------------------------------- qtensor
needs_qtensor = pytest.mark.skipif(not have_qtensor(),
                                   reason="qtensor needs fbgemm with exact u8 x s8 GEMMs")


@needs_qtensor
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n,t", [(3, 701), (4, 59), (2, 2), (1, 1), (1, 130)])
def test_qtensor_equals_its_reference(model, ranges, threads, n, t):
    # N > 1 with T not a multiple of 3 exercises the phase padding of the flat layout; 2
    # threads split fbgemm's and quantized::add's loops differently
    torch.set_num_threads(threads)
    eng = IntTdnnF.from_model(model, ranges, backend="qtensor")
    x = speech_like(n, t, 50 + t)
    y, codes = eng(x, return_codes=True)
    y_ref, codes_ref = eng.reference_forward(x, return_codes=True)
    assert set(codes) == set(codes_ref)
    for k in codes_ref:
        assert torch.equal(codes[k], codes_ref[k]), k
    assert torch.equal(y, y_ref)


@needs_qtensor
def test_qtensor_same_model_as_dyadic(model, ranges):
    """Same weights and (linear points) grids as the dyadic engine; the activations it
    represents stay within a few grid steps of the dyadic ones and the outputs agree."""
    q = IntTdnnF.from_model(model, ranges, backend="qtensor")
    d = IntTdnnF.from_model(model, ranges, backend="float64")
    x = speech_like(2, 300, 61)
    yq, cq = q(x, return_codes=True)
    yd, cd = d(x, return_codes=True)
    assert torch.equal(cq["input"], cd["input"])
    for p in ("tdnn1", "tdnnfs.0.linear", "tdnnfs.9", "prefinal_chain.batchnorm2"):
        a = d.acts[p]
        hq = q._qt.real_values(p, cq[p])
        hd = (cd[p].double() - a.zero_point) * a.scale
        assert float((hq - hd).abs().mean()) < 2.0 * a.scale, p
    # (this small random-weight model has near-ties: dyadic vs fp32 agree on ~95% of frames)
    assert float((yq.argmax(-1) == yd.argmax(-1)).float().mean()) > 0.9
    kl = float((yd.exp() * (yd - yq)).sum(-1).mean())
    assert kl < 1e-3


@needs_qtensor
def test_qtensor_auto_default_and_fallbacks(model, ranges):
    assert IntTdnnF.from_model(model, ranges).backend == "qtensor"
    # 4-bit activation point: qtensor refuses, auto falls back to a dyadic back end
    with pytest.raises(ValueError, match="8-bit activations only"):
        IntTdnnF.from_model(model, ranges, point_bits={"tdnnfs.1.linear": 4}, backend="qtensor")
    # negative BatchNorm scale after a ReLU
    m = make_model(seed=3)
    with torch.no_grad():
        bn = torch.nn.BatchNorm1d(m.config.hidden_dim, affine=True)
        bn.running_mean.copy_(m.tdnnfs[1].batchnorm.running_mean)
        bn.running_var.copy_(m.tdnnfs[1].batchnorm.running_var)
        bn.weight.uniform_(-2, 2)
        m.tdnnfs[1].batchnorm = bn.eval()
    r = collect_activation_ranges(m, [speech_like(2, 150, 3)])
    with pytest.raises(ValueError, match="non-negative BatchNorm scales"):
        IntTdnnF.from_model(m, r, backend="qtensor")
    eng = IntTdnnF.from_model(m, r)
    assert eng.backend != "qtensor"
    x = speech_like(1, 80, 4)
    assert torch.equal(eng(x), eng.reference_forward(x))


@needs_qtensor
def test_qtensor_save_load_and_memory(model, ranges, tmp_path):
    from k2quant.infer.int_engine import fp32_reference_bytes

    eng = IntTdnnF.from_model(model, ranges, backend="qtensor")
    eng.save(tmp_path / "q.pt")
    back = IntTdnnF.load(tmp_path / "q.pt", backend="qtensor")
    x = speech_like(2, 90, 5)
    assert torch.equal(back(x), eng(x))
    mem, ref = eng.memory_report(), fp32_reference_bytes(model)
    assert ref["weight_bytes"] / mem["weight_bytes"] >= 3.9
    assert mem["engine_bytes"] < ref["total_bytes"] / 3


def _q(codes, scale, zp):
    return torch._make_per_tensor_quantized_tensor(codes, scale, zp)


@needs_qtensor
@pytest.mark.parametrize("relu", [False, True])
def test_qtensor_linear_formula_matches_fbgemm(relu):
    """The simulated requantisation (ref_linear) vs quantized::linear[_relu] on random
    shapes, scales, zero points and biases, including |acc| > 2**24 (float32 rounding of
    the accumulator)."""
    from k2quant.infer.qtensor import QLayer, _quiet_fbgemm, ref_linear

    g = torch.Generator().manual_seed(1 + relu)
    with _quiet_fbgemm():
        for trial in range(40):
            M, K, N = [int(torch.randint(1, hi, (), generator=g)) for hi in (90, 1200, 70)]
            zp_in = int(torch.randint(0, 256, (), generator=g))
            mu_in = float(torch.rand((), generator=g)) * 0.1 + 1e-3
            codes = torch.randint(0, 256, (M, K), generator=g, dtype=torch.uint8)
            W = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
            ws = (torch.rand(N, generator=g, dtype=torch.float64) + 0.01) * 0.02
            bias = torch.randn(N, generator=g) * 3
            acc = (codes.long() - zp_in) @ W.long().t()
            mu_out = float((acc.double() * mu_in * ws).abs().max()) / 100 + 1e-6
            zp_out = int(torch.randint(0, 256, (), generator=g))
            qw = torch._make_per_channel_quantized_tensor(
                W, ws, torch.zeros(N, dtype=torch.int64), 0)
            pk = torch.ops.quantized.linear_prepack(qw, bias)
            op = torch.ops.quantized.linear_relu if relu else torch.ops.quantized.linear
            got = op(_q(codes, mu_in, zp_in), pk, mu_out, zp_out).int_repr().long()
            QL = QLayer("t", W[:, :, None], ws, bias, 1, relu, mu_in, zp_in, mu_out, zp_out)
            want = ref_linear(QL, codes.long().t()[None])[0].t()
            assert torch.equal(got, want), trial
        # a product beyond 2**24 (float32 rounds the accumulator)
        codes = torch.full((3, 1000), 255, dtype=torch.uint8)
        W = torch.full((4, 1000), 127, dtype=torch.int8)
        ws = torch.full((4,), 1e-3, dtype=torch.float64)
        bias = torch.tensor([0.0, 0.1, -0.3, 7.0])
        pk = torch.ops.quantized.linear_prepack(
            torch._make_per_channel_quantized_tensor(W, ws, torch.zeros(4, dtype=torch.int64), 0),
            bias)
        got = torch.ops.quantized.linear(_q(codes, 0.01, 0), pk, 1.0, 0).int_repr().long()
        QL = QLayer("t", W[:, :, None], ws, bias, 1, False, 0.01, 0, 1.0, 0)
        assert torch.equal(got, ref_linear(QL, codes.long().t()[None])[0].t())


@needs_qtensor
def test_qtensor_add_formula_matches_quantized_add():
    from k2quant.infer.qtensor import _quiet_fbgemm, ref_add

    g = torch.Generator().manual_seed(2)
    with _quiet_fbgemm():
        for trial in range(40):
            n = int(torch.randint(1, 5000, (), generator=g))  # vector body + scalar tail
            sa, sb, so = (float(torch.rand((), generator=g)) * 0.1 + 1e-3 for _ in range(3))
            ca = torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8)
            cb = torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8)
            got = torch.ops.quantized.add(_q(ca, sa, 0), _q(cb, sb, 0), so, 0).int_repr().long()
            assert torch.equal(got, ref_add(ca.long(), sa, cb.long(), sb, so)), trial


def _exact_f32_round(fr):
    """Correctly rounded (half to even) float32 of a Fraction."""
    import numpy as np

    f = np.float32(float(fr))
    best = None
    for c in (np.nextafter(f, np.float32(-np.inf)), f, np.nextafter(f, np.float32(np.inf))):
        d = abs(Fraction(float(c)) - fr)
        key = (d, int(np.array(c).view(np.int32)) & 1)
        if best is None or key < best[0]:
            best = (key, c)
    return float(best[1])


def test_round_to_odd_fma_is_correctly_rounded():
    from k2quant.infer.qtensor import _round_to_odd_fma

    g = torch.Generator().manual_seed(3)
    c = 1.0 + torch.rand(4000, generator=g)
    a = (1.0 + torch.rand(4000, generator=g))
    ulp = torch.full_like(c, 2.0 ** -23)
    b = (ulp / 2 / a)  # a * b ~ half an ulp of c: the sum lands near a float32 midpoint
    c, a, b = c.float(), a.float(), b.float()
    got = _round_to_odd_fma(a, b, c)
    naive = (a.double() * b.double() + c.double()).float()
    want = torch.tensor([_exact_f32_round(Fraction(x) * Fraction(y) + Fraction(z))
                         for x, y, z in zip(a.tolist(), b.tolist(), c.tolist())],
                        dtype=torch.float32)
    assert torch.equal(got, want)
    assert int((naive != want).sum()) > 0  # the cases where plain double rounding fails


@needs_qtensor
def test_qtensor_dynamic_output_layer_formula():
    """linear_dynamic with the calibration rows returns fma(f32(acc), ws, bias)."""
    from k2quant.infer.qtensor import _quiet_fbgemm, _round_to_odd_fma

    g = torch.Generator().manual_seed(4)
    with _quiet_fbgemm():
        for trial in range(20):
            M, K, N = [int(torch.randint(1, hi, (), generator=g)) for hi in (60, 300, 700)]
            zp = int(torch.randint(0, 256, (), generator=g))
            codes = torch.randint(0, 256, (M, K), generator=g, dtype=torch.uint8)
            W = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
            ws = (torch.rand(N, generator=g, dtype=torch.float64) + 0.01) * 0.02
            bias = torch.randn(N, generator=g) * 3
            pk = torch.ops.quantized.linear_prepack(torch._make_per_channel_quantized_tensor(
                W, ws, torch.zeros(N, dtype=torch.int64), 0), bias)
            calib = torch.tensor([[-zp] * K, [255 - zp] * K], dtype=torch.float32)
            a = torch.cat([codes.float() - zp, calib])
            got = torch.ops.quantized.linear_dynamic(a, pk, False)[:M]
            acc = ((codes.long() - zp) @ W.long().t()).float()
            want = _round_to_odd_fma(acc, ws.float().expand_as(acc), bias.expand_as(acc))
            assert torch.equal(got, want), trial
