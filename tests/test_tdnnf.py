"""TDNN-F acoustic model: shapes, context, Kaldi layer semantics, constraint, dropout, spec,
re-factorisation (CPU, small shapes; the 7q test only counts parameters)."""
import copy
import json
import math

import pytest
import torch
import torch.nn as nn

from k2quant.models import build_model
from k2quant.models.dropout import ContinuousDropout, DropoutSchedule
from k2quant.models.orthonormal import (
    constrain_orthonormal_,
    semi_orthogonal_init_,
    semi_orthogonality_error,
)
from k2quant.models.tdnnf import (
    KALDI_7Q_STRIDES,
    TdnnF,
    TdnnFConfig,
    TdnnfLayer,
    build_tdnnf,
    count_parameters,
    get_preset,
    refactor_bottleneck,
)

FEAT = 80
NCLS = 40


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small_eval() -> TdnnF:
    """A shared small model in eval mode; tests must not modify it."""
    return small_model().eval()


def small_model(**overrides) -> TdnnF:
    torch.manual_seed(0)
    return TdnnF(get_preset("small", FEAT, NCLS, **overrides))


def tiny_config(**overrides) -> TdnnFConfig:
    base = dict(
        feat_dim=8,
        num_classes=11,
        hidden_dim=24,
        bottleneck_dims=[6, 5, 4, 6, 5],
        strides=[1, 1, 0, 3, 3],
        prefinal_bottleneck=12,
    )
    base.update(overrides)
    return TdnnFConfig(**base)


def randomize_bn_stats(model: nn.Module, seed: int = 1) -> None:
    """Give every BatchNorm non-trivial running statistics (eval mode then is a real affine)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 6, 7, 50, 101])
def test_output_length_is_ceil_T_over_3(T, small_eval):
    model = small_eval
    x = torch.randn(2, T, FEAT)
    with torch.no_grad():
        y = model(x)
    assert model.subsampling_factor == 3
    assert y.shape == (2, math.ceil(T / 3), NCLS)
    assert model.output_lengths(T) == math.ceil(T / 3)
    assert y.dtype == torch.float32


def test_output_lengths_tensor_and_supervision_bound(small_eval):
    model = small_eval
    lens = torch.tensor([1, 2, 3, 100, 101, 102])
    assert model.output_lengths(lens).tolist() == [1, 1, 1, 34, 34, 34]
    # icefall divides start and duration by 3: the segment always fits in T'
    for T in range(1, 40):
        for start in range(T):
            for num in range(1, T - start + 1):
                assert start // 3 + num // 3 <= model.output_lengths(T)


def test_log_probs_normalised_train_and_eval():
    model = small_model()
    x = torch.randn(3, 40, FEAT)
    for mode in (True, False):
        model.train(mode)
        with torch.no_grad():
            y = model(x)
        assert torch.isfinite(y).all()
        assert torch.allclose(y.exp().sum(-1), torch.ones(3, 14), atol=1e-5)


def test_wrong_input_raises_clear_errors(small_eval):
    model = small_eval
    with pytest.raises(ValueError, match=r"expected features \(N, T, 80\), got \(2, 10, 40\)"):
        model(torch.randn(2, 10, 40))
    with pytest.raises(ValueError, match=r"expected features \(N, T, 80\), got \(10, 80\)"):
        model(torch.randn(10, 80))
    with pytest.raises(ValueError, match="expected float32 features"):
        model(torch.ones(1, 10, FEAT, dtype=torch.long))
    with pytest.raises(ValueError, match="no xent branch"):
        model(torch.randn(1, 10, FEAT), return_xent=True)
    with pytest.raises(ValueError, match=r"pad=False.*at least .* = 45 frames"):
        model(torch.randn(1, 44, FEAT), pad=False)


def test_xent_branch():
    model = small_model(xent=True).eval()
    x = torch.randn(2, 31, FEAT)
    with torch.no_grad():
        chain, xent = model(x, return_xent=True)
        chain_only = model(x)
    assert chain.shape == xent.shape == (2, 11, NCLS)
    assert torch.equal(chain, chain_only)
    assert torch.allclose(xent.exp().sum(-1), torch.ones(2, 11), atol=1e-5)
    assert not torch.allclose(chain, xent)
    assert "prefinal_xent.linear" in model.semi_orthogonal_layer_names()


def test_training_step_reaches_every_parameter():
    model = small_model(xent=True).train()
    model.set_dropout_proportion(0.3)
    chain, xent = model(torch.randn(2, 30, FEAT), return_xent=True)
    (chain.mean() + xent.mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


# ----------------------------------------------------------------------- parameter counts


def test_kaldi_7q_parameter_count():
    cfg = get_preset("kaldi_7q", 40, 6034)
    assert cfg.strides == [1, 1, 1, 0, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3] == list(KALDI_7Q_STRIDES)
    assert cfg.hidden_dim == 1536 and cfg.bottleneck_dims == [160] * 14
    model = TdnnF(cfg)
    chain = model.num_parameters(include_xent=False)
    assert chain == count_parameters(cfg, include_xent=False)
    assert model.num_parameters() == count_parameters(cfg)
    # tdnn1 (40*3 -> 1536) + 13 spliced tdnnf + 1 stride-0 tdnnf + prefinal_l
    # + prefinal_chain + output
    expected = (
        (120 * 1536 + 1536)
        + 13 * (3072 * 160 + 320 * 1536 + 1536)
        + (1536 * 160 + 160 * 1536 + 1536)
        + 1536 * 256
        + (256 * 1536 + 1536 + 1536 * 256)
        + (256 * 6034 + 6034)
    )
    assert chain == expected == 16_210_322
    assert abs(chain / 16.4e6 - 1) < 0.03, f"chain branch has {chain} params, GUIDE says 16.4M"
    assert abs(model.num_parameters() / 18.7e6 - 1) < 0.03
    # With Kaldi's 220-dim LDA(Append(-1,0,1), ivector) input the counts are exact:
    # 16.4M / 18.7M with bottleneck 160, and Kaldi's published 21,356,836 with 192.
    lda = get_preset("kaldi_7q", 220, 6034, input_context=0)
    assert count_parameters(lda, include_xent=False) == 16_363_922
    assert count_parameters(lda) == 18_702_628
    published = get_preset("kaldi_7q", 220, 6034, input_context=0, bottleneck_dims=192)
    assert count_parameters(published) == 21_356_836


def test_count_parameters_matches_model():
    for cfg in (tiny_config(), tiny_config(xent=True, input_context=2, strides=[0, 3, 0, 1, 2])):
        model = TdnnF(cfg)
        assert model.num_parameters() == count_parameters(cfg)
        assert model.num_parameters(False) == count_parameters(cfg.to_dict(), False)


def test_small_preset_size_and_context():
    model = TdnnF(get_preset("small", 80, 500))
    n = model.num_parameters()
    assert 2_000_000 <= n <= 4_000_000, n
    assert model.left_context == model.right_context == 1 + 3 + 6 * 3
    assert len(model.tdnnf_layer_names()) == 10
    with pytest.raises(ValueError, match="unknown TDNN-F preset 'big'"):
        get_preset("big", 80, 500)


# ----------------------------------------------------------------------- layer semantics


def test_tdnnf_layer_hand_computed():
    """dim 2, bottleneck 1, stride 2: z_t = L0 x_{t-2} + L1 x_t; y_t = b + A0 z_t + A1 z_{t+2}."""
    layer = TdnnfLayer(dim=2, bottleneck_dim=1, stride=2, dilation=2, bypass_scale=0.66).eval()
    L0, L1 = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 3.0])
    A0, A1 = torch.tensor([1.0, -1.0]), torch.tensor([2.0, 0.25])
    b = torch.tensor([0.1, -0.2])
    with torch.no_grad():
        layer.linear.weight.copy_(torch.stack([L0, L1], dim=-1).unsqueeze(0))  # (1, 2, 2)
        layer.affine.weight.copy_(torch.stack([A0, A1], dim=-1).unsqueeze(1))  # (2, 1, 2)
        layer.affine.bias.copy_(b)
    assert layer.linear.bias is None
    x = torch.randn(1, 2, 9)
    with torch.no_grad():
        out = layer(x)
    assert out.shape == (1, 2, 5)
    eps = layer.batchnorm.eps
    for j in range(5):
        t = j + 2  # output index j is input time t = j + s
        z = lambda u: L0 @ x[0, :, u - 2] + L1 @ x[0, :, u]  # noqa: E731
        y = b + A0 * z(t) + A1 * z(t + 2)
        want = 0.66 * x[0, :, t] + torch.relu(y) / math.sqrt(1 + eps)
        assert torch.allclose(out[0, :, j], want, atol=1e-6)


def test_stride_zero_is_frame_local():
    layer = TdnnfLayer(dim=6, bottleneck_dim=3, stride=0, dilation=0, bypass_scale=0.66).eval()
    assert layer.linear.kernel_size == (1,) and layer.affine.kernel_size == (1,)
    x = torch.randn(2, 6, 10)
    with torch.no_grad():
        y = layer(x)
        x2 = x.clone()
        x2[:, :, 4] += 5.0
        y2 = layer(x2)
    assert y.shape == x.shape
    changed = (y2 - y).abs().amax(dim=(0, 1))
    assert changed[4] > 0 and torch.all(changed[torch.arange(10) != 4] == 0)


def test_kernel_and_dilation_of_each_stage():
    model = small_model()
    for i, s in enumerate(model.config.strides):
        layer = model.tdnnfs[i]
        k = 1 if s == 0 else 2
        assert layer.linear.kernel_size == (k,) and layer.affine.kernel_size == (k,)
        if s:  # full rate before the subsampling point (index 3), rate/3 after it
            assert layer.linear.dilation == (s if i < 3 else s // 3,)
    assert model.subsample_index == 3


def test_bypass_scale_with_zero_branches():
    """With every tdnnf branch zeroed, the stack is 0.66^n times the (cropped, subsampled)
    tdnn1 output."""
    model = small_model().eval()
    with torch.no_grad():
        for layer in model.tdnnfs:
            layer.linear.weight.zero_()
            layer.affine.weight.zero_()
            layer.affine.bias.zero_()
    seen = {}
    model.tdnn1.register_forward_hook(lambda m, i, o: seen.__setitem__("tdnn1", o))
    model.tdnnfs[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("last", o))
    T = 40
    with torch.no_grad():
        model(torch.randn(2, T, FEAT))
    t_out = math.ceil(T / 3)
    idx = 3 * torch.arange(t_out) + model.left_context - model.config.input_context
    want = 0.66 ** len(model.tdnnfs) * seen["tdnn1"][:, :, idx]
    assert seen["last"].shape == want.shape
    assert torch.allclose(seen["last"], want, atol=1e-6)


# --------------------------------------------------------------------- receptive field


def test_left_and_right_context_exact():
    # float64: the single path from the outermost frames through all 17 layers is attenuated
    # to ~1e-7 by the random weights, below float32 resolution of the log-probs
    model = small_model().double().eval()
    randomize_bn_stats(model)
    L, R = model.left_context, model.right_context
    x = torch.randn(1, 120, FEAT, dtype=torch.float64)
    k = 20
    t = 3 * k
    with torch.no_grad():
        base = model(x)[0, k]

        def out_after_perturbing(frame):
            x2 = x.clone()
            x2[0, frame] += 3.0 * torch.randn(FEAT, dtype=torch.float64)
            return model(x2)[0, k]

        for frame in (t - L, t, t + R):
            assert (out_after_perturbing(frame) - base).abs().max() > 1e-10, frame
        for frame in (t - L - 1, t + R + 1, 0, 119):
            assert torch.equal(out_after_perturbing(frame), base), frame


def test_chunked_pad_false_matches_full_utterance():
    """Streaming contract: output frame k only needs input frames 3k-L .. 3k+R."""
    model = TdnnF(tiny_config()).eval()
    randomize_bn_stats(model)
    L, R = model.left_context, model.right_context
    assert L == R == 1 + 1 + 1 + 0 + 3 + 3
    T = 47
    x = torch.randn(1, T, 8)
    with torch.no_grad():
        full = model(x)
        t_out = full.shape[1]
        # the edge padding forward() applies: repeat first/last frames
        right = 3 * (t_out - 1) + R - (T - 1)
        xp = torch.cat([x[:, :1].expand(1, L, 8), x, x[:, -1:].expand(1, right, 8)], dim=1)
        pieces = []
        for k0 in range(0, t_out, 4):
            k1 = min(k0 + 4, t_out)
            chunk = xp[:, 3 * k0 : 3 * (k1 - 1) + L + R + 1]
            pieces.append(model(chunk, pad=False))
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


@pytest.mark.parametrize(
    "strides,expected_index",
    [([1, 1, 0, 3, 3], 2), ([3, 3, 3], 0), ([1, 2, 1], 3), ([3, 1, 3], 2), ([0, 0], 0)],
)
def test_subsampling_point_is_exact_for_any_strides(strides, expected_index):
    """The subsampled network equals the full-rate network read at frames 0, 3, 6, ..."""
    cfg = tiny_config(strides=strides, bottleneck_dims=4)
    model = TdnnF(cfg).eval()
    randomize_bn_stats(model)
    assert model.subsample_index == expected_index
    full_rate = TdnnF(tiny_config(strides=strides, bottleneck_dims=4, subsampling_factor=1))
    full_rate.load_state_dict(model.state_dict())
    full_rate.eval()
    x = torch.randn(2, 23, 8)
    with torch.no_grad():
        assert torch.allclose(model(x), full_rate(x)[:, ::3], atol=1e-5)


def test_zero_context_model_trims_instead_of_padding():
    model = TdnnF(tiny_config(strides=[0, 0], bottleneck_dims=3, input_context=0)).eval()
    randomize_bn_stats(model)
    assert model.left_context == model.right_context == 0
    x = torch.randn(1, 5, 8)
    with torch.no_grad():
        y = model(x)
        frames = torch.cat([model(x[:, t : t + 1]) for t in (0, 3)], dim=1)
    assert y.shape == (1, 2, 11)
    assert torch.allclose(y, frames, atol=1e-6)


# ------------------------------------------------------------------ orthonormal constraint


@pytest.mark.parametrize("shape", [(48, 400), (400, 48), (32, 40, 2)])
def test_constrain_orthonormal_converges_to_scaled_semi_orthogonal(shape):
    torch.manual_seed(0)
    w = 0.05 * torch.randn(*shape)
    assert semi_orthogonality_error(w) > 0.1
    for _ in range(60):
        constrain_orthonormal_(w)
    M = w.reshape(shape[0], -1)
    P = M @ M.t() if M.shape[0] <= M.shape[1] else M.t() @ M
    a2 = P.diagonal().mean()
    assert torch.allclose(P, a2 * torch.eye(P.shape[0]), atol=1e-4 * float(a2))
    assert semi_orthogonality_error(w) < 1e-4


def test_constrain_orthonormal_fixed_scale_and_error_value():
    torch.manual_seed(0)
    w = torch.randn(20, 100) / 10
    for _ in range(60):
        err = constrain_orthonormal_(w, scale=2.0)
    assert err < 1e-5
    assert torch.allclose(w @ w.t(), 4.0 * torch.eye(20), atol=1e-4)
    zero = torch.zeros(3, 5)
    assert constrain_orthonormal_(zero) == 0.0 and torch.equal(zero, torch.zeros(3, 5))
    with pytest.raises(ValueError, match="positive"):
        constrain_orthonormal_(w, scale=-1.0)


def test_model_constrain_orthonormal_and_on_step():
    model = TdnnF(tiny_config(xent=True, orthonormal_every=3))
    names = model.semi_orthogonal_layer_names()
    assert len(names) == 5 + 3
    # drift every constrained weight away from semi-orthogonality (like SGD would)
    torch.manual_seed(0)
    with torch.no_grad():
        for n in names:
            w = model.get_submodule(n).weight
            w.add_(0.2 * w.std() * torch.randn_like(w))
    before = max(semi_orthogonality_error(model.get_submodule(n).weight) for n in names)
    assert before > 0.05
    assert [model.on_step(s) for s in range(1, 7)] == [False, False, True, False, False, True]
    for _ in range(30):
        assert model.constrain_orthonormal() == len(names)
    after = max(semi_orthogonality_error(model.get_submodule(n).weight) for n in names)
    assert after < 1e-4, after
    assert TdnnF(tiny_config(orthonormal_every=0)).on_step(0) is False


def test_layers_start_semi_orthogonal():
    model = small_model()
    for n in model.semi_orthogonal_layer_names():
        assert semi_orthogonality_error(model.get_submodule(n).weight) < 1e-5, n
    w = torch.empty(7, 3, 2)
    semi_orthogonal_init_(w, scale=2.0)
    assert torch.allclose(w.reshape(7, 6) @ w.reshape(7, 6).t(), 4 * torch.eye(7), atol=1e-5) \
        or torch.allclose(w.reshape(7, 6).t() @ w.reshape(7, 6), 4 * torch.eye(6), atol=1e-5)


# ----------------------------------------------------------------------------- dropout


def test_dropout_schedule_values():
    s = DropoutSchedule("0,0@0.20,0.5@0.50,0")
    got = [s(f) for f in (0.0, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)]
    assert got == pytest.approx([0.0, 0.0, 0.0, 0.25, 0.5, 0.25, 0.0])
    assert DropoutSchedule("0.3")(0.7) == pytest.approx(0.3)
    assert DropoutSchedule(None)(0.5) == 0.0
    assert DropoutSchedule("0.1,0.4")(0.5) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="only the first and last item may omit @fraction"):
        DropoutSchedule("0,0.2,0")
    with pytest.raises(ValueError, match="fractions must not decrease"):
        DropoutSchedule("0,0.5@0.6,0.2@0.4,0")
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        DropoutSchedule("0,1.5@0.5,0")
    with pytest.raises(ValueError, match="per-component"):
        DropoutSchedule("tdnn*=0,0.5@0.5,0")
    with pytest.raises(ValueError, match="training progress"):
        s(1.5)


def test_continuous_dropout_mask_is_time_shared_and_bounded():
    torch.manual_seed(0)
    d = ContinuousDropout(0.25).train()
    y = d(torch.ones(4, 50, 7))
    assert torch.equal(y, y[:, :, :1].expand_as(y))  # constant over time
    assert y.min() >= 0.5 and y.max() <= 1.5 and y.std() > 0.05
    assert abs(float(y[:, :, 0].mean()) - 1.0) < 0.1
    assert torch.equal(d.eval()(torch.ones(2, 3, 4)), torch.ones(2, 3, 4))


def test_model_dropout_schedule_and_eval_mode():
    model = small_model()
    assert model.dropout_proportion == 0.0
    assert model.set_training_progress(0.35) == pytest.approx(0.25)
    ps = [m.p for m in model.modules() if isinstance(m, ContinuousDropout)]
    assert ps == pytest.approx([0.25] * 11)  # tdnn1 + 10 tdnnf layers
    x = torch.randn(2, 30, FEAT)
    model.eval()
    with torch.no_grad():
        y_drop = model(x)
        model.set_dropout_proportion(0.0)
        y_plain = model(x)
    assert torch.equal(y_drop, y_plain)  # eval mode: no dropout
    model.train()
    model.set_dropout_proportion(0.5)
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    b = model(x)
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        model.set_dropout_proportion(1.0)


# ---------------------------------------------------------------------------- config/spec


def test_config_validation_errors():
    with pytest.raises(ValueError, match="bottleneck_dims has 2 entries but strides has 5"):
        tiny_config(bottleneck_dims=[4, 4])
    with pytest.raises(ValueError, match="strides must be a list of ints >= 0"):
        tiny_config(strides=[1, -1])
    with pytest.raises(ValueError, match=r"bypass_scale must be a number with \|value\| <= 1"):
        tiny_config(bypass_scale=1.5)
    with pytest.raises(ValueError, match="hidden_dim must be an int >= 1"):
        tiny_config(hidden_dim=0)
    with pytest.raises(ValueError, match="cannot parse item"):
        tiny_config(dropout_schedule="0,x@0.5,0")
    with pytest.raises(ValueError, match=r"unknown keys \['hidden'\]"):
        TdnnFConfig.from_dict({"feat_dim": 8, "num_classes": 3, "hidden": 4})
    with pytest.raises(ValueError, match=r"missing required keys \['num_classes'\]"):
        TdnnFConfig.from_dict({"feat_dim": 8})
    with pytest.raises(ValueError, match="xent must be True or False"):
        tiny_config(xent=1)


def test_spec_round_trip_same_architecture_and_outputs():
    model = TdnnF(tiny_config(xent=True, bottleneck_dims=[6, 3, 4, 2, 5]))
    with torch.no_grad():  # change every parameter and BN statistic from its init
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    randomize_bn_stats(model)
    spec = model.model_spec()
    assert spec["arch"] == "tdnnf"
    spec = json.loads(json.dumps(spec))  # JSON-able
    assert TdnnFConfig.from_dict(spec["config"]) == model.config
    clone = build_model(spec)
    assert isinstance(clone, TdnnF)
    assert {k: v.shape for k, v in clone.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    assert str(clone) == str(model)
    clone.load_state_dict(model.state_dict())
    model.eval()
    clone.eval()
    x = torch.randn(2, 20, 8)
    with torch.no_grad():
        a, b = model(x, return_xent=True), clone(x, return_xent=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert isinstance(build_tdnnf(model.config), TdnnF)


def test_layer_names_are_stable_leaves():
    model = small_model()
    assert model.tdnnf_layer_names()[3] == "tdnnfs.3"
    assert model.factored_pairs()[3] == ("tdnnfs.3.linear", "tdnnfs.3.affine")
    leaves = {n: type(m) for n, m in model.named_modules() if type(m) in (nn.Conv1d, nn.Linear)}
    for lin, aff in model.factored_pairs():
        assert leaves[lin] is nn.Conv1d and leaves[aff] is nn.Conv1d
    assert set(leaves) == {
        "tdnn1.affine",
        "prefinal_l",
        "prefinal_chain.affine",
        "prefinal_chain.linear",
        "output",
        *[n for pair in model.factored_pairs() for n in pair],
    }


# ------------------------------------------------------------------------- refactoring


def _perturb_weights(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * p.std() * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("layer", ["tdnnfs.1", "tdnnfs.3", "tdnnfs.6"])
def test_refactor_bottleneck_exact_at_full_dim_and_monotone(layer):
    base = small_model()
    _perturb_weights(base)  # trained-like: linear no longer exactly semi-orthogonal
    randomize_bn_stats(base)
    base.eval()
    x = torch.randn(2, 60, FEAT)
    with torch.no_grad():
        ref = base(x)
    i = int(layer.split(".")[1])
    B = base.config.bottleneck_dims[i]
    errors, energies = [], []
    for r in (B, 48, 16, 4, 1):
        model = copy.deepcopy(base)
        info = refactor_bottleneck(model, layer, r)
        assert info["old_dim"] == B and info["new_dim"] == r
        lin = model.get_submodule(f"{layer}.linear")
        assert lin.weight.shape[0] == r and model.get_submodule(f"{layer}.affine").in_channels == r
        assert model.config.bottleneck_dims[i] == r
        assert semi_orthogonality_error(lin.weight) < 1e-4  # constraint kept
        with torch.no_grad():
            y = model(x)
        errors.append(float((y - ref).pow(2).mean().sqrt()))
        energies.append(info["retained_energy"])
        if r == B:
            assert info["retained_energy"] == pytest.approx(1.0)
            assert torch.allclose(y, ref, atol=2e-5), errors[-1]
        if r == 16:  # the refactored shape round-trips through the spec
            clone = build_model(model.model_spec())
            clone.load_state_dict(model.state_dict())
    assert all(a < b for a, b in zip(errors, errors[1:])), errors
    assert all(a > b for a, b in zip(energies, energies[1:])), energies


def test_refactor_bottleneck_scale_and_errors():
    model = small_model()
    lin = model.tdnnfs[5].linear
    scale_before = float(lin.weight.detach().reshape(lin.out_channels, -1).norm(dim=1).mean())
    model.refactor_bottleneck(5, 40)
    lin = model.tdnnfs[5].linear
    rows = lin.weight.reshape(40, -1).norm(dim=1)
    assert torch.allclose(rows, torch.full_like(rows, scale_before), rtol=1e-4)
    with pytest.raises(ValueError, match=r"new_dim for tdnnfs.5 must be an int in 1..40"):
        model.refactor_bottleneck("tdnnfs.5", 41)
    with pytest.raises(ValueError, match="unknown TDNN-F layer 'tdnnf5'"):
        model.refactor_bottleneck("tdnnf5", 10)
