"""The fused exact dyadic engines (``IntTdnnF.set_backend(b, compile=True)``): ``int_mm``
compiled by torch.compile (torch >= 2) and ``fbgemm`` with TorchScript/NNC-fused
requantisations (torch 1.13 and later). Both must equal ``dyadic_reference_forward`` bit for
bit: log-probs, the codes of every activation point, streaming."""
import pytest
import torch

from k2quant.infer import IntTdnnF
from k2quant.infer.calibrate import collect_activation_ranges
from k2quant.infer.int_engine import (
    _fresh_function,
    fused_backend,
    have_fbgemm,
    have_int_mm,
    have_nnc,
)

from test_infer_engine import make_model, speech_like

pytestmark = pytest.mark.usefixtures("one_thread")


def _available(backend):
    if backend == "int_mm":
        return have_int_mm() and hasattr(torch, "compile")
    return have_fbgemm() and have_nnc()


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return make_model(seed=3)


@pytest.fixture(scope="module")
def ranges(model):
    return collect_activation_ranges(model, [speech_like(4, 200, 7)])


@pytest.fixture(scope="module", params=["int_mm", "fbgemm"])
def fused(request, model, ranges):
    if not _available(request.param):
        pytest.skip(f"no fused {request.param} engine on torch {torch.__version__}")
    return IntTdnnF.from_model(model, ranges, backend=request.param).set_backend(
        request.param, compile=True)


@pytest.mark.slow
@pytest.mark.parametrize("n,t", [(2, 400), (3, 101), (4, 31), (1, 77), (1, 50)])
def test_fused_equals_dyadic_reference(fused, n, t):
    """Batches with T % 3 != 0 (per-utterance phase padding), one utterance, short ones;
    the codes of every point equal the reference's."""
    x = speech_like(n, t, 40 + t)
    ref, ref_codes = fused.dyadic_reference_forward(x, return_codes=True)
    assert torch.equal(fused(x), ref)
    y, codes = fused(x, return_codes=True)
    assert torch.equal(y, ref)
    assert set(codes) == set(ref_codes)
    for p, c in ref_codes.items():
        assert torch.equal(codes[p], c), p


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [7, 21])
def test_fused_streaming_equals_reference(fused, chunk):
    x = speech_like(1, 350, 77)
    assert torch.equal(fused.streaming_forward(x, chunk), fused.dyadic_reference_forward(x))


@pytest.mark.slow
def test_fused_two_threads(fused):
    x = speech_like(2, 200, 5)
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y = fused(x)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(y, fused.dyadic_reference_forward(x))


def test_fused_needs_a_fused_backend(model, ranges):
    with pytest.raises(ValueError, match="compile=True needs"):
        IntTdnnF.from_model(model, ranges, backend="float64").set_backend("float64",
                                                                          compile=True)
    fb = fused_backend()
    assert fb in (None, "int_mm", "fbgemm")
    if fb is not None:
        assert _available(fb)


def test_fbgemm_fused_rejects_int32_overflow(model, ranges):
    if not _available("fbgemm"):
        pytest.skip("no fbgemm + NNC")
    eng = IntTdnnF.from_model(model, ranges, backend="fbgemm")
    eng.layers["tdnnfs.0.linear"].W = eng.layers["tdnnfs.0.linear"].W.repeat(1, 1, 600)
    eng.layers["tdnnfs.0.linear"].W[:] = 127
    with pytest.raises(ValueError, match="2\\*\\*31"):
        eng.set_backend("fbgemm", compile=True)


def test_fresh_function_has_its_own_code_object():
    def f(a, b=2):
        return a + b

    g, h = _fresh_function(f), _fresh_function(f)
    assert g.__code__ is not f.__code__ and g.__code__ is not h.__code__
    assert g(1) == h(1, 2) == 3


def test_fbgemm_fused_several_k_chunks_exact():
    """A layer whose accumulators need several fbgemm K chunks (|acc| >= 2**24 possible):
    the chunks' float32 results are summed in int32, still equal to the reference."""
    if not _available("fbgemm"):
        pytest.skip("no fbgemm + NNC")
    m = make_model(seed=4, hidden=300)
    r = collect_activation_ranges(m, [speech_like(2, 120, 3)])
    eng = IntTdnnF.from_model(m, r, backend="fbgemm")
    L = eng.layers["tdnnfs.1.linear"]  # K = 2 * 300
    L.W = torch.where(L.W >= 0, torch.full_like(L.W, 127), torch.full_like(L.W, -127))
    eng.set_backend("fbgemm", compile=True)
    assert len(eng._prep["tdnnfs.1.linear"].chunks) > 1
    x = speech_like(2, 150, 9)
    assert torch.equal(eng(x), eng.dyadic_reference_forward(x))
    assert torch.equal(eng.streaming_forward(x[:1], 11), eng.dyadic_reference_forward(x[:1]))
