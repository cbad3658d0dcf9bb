"""LF-MMI graph compiler and loss against brute-force path enumeration."""
import logging
import math
from collections import defaultdict

import pytest
import torch

k2 = pytest.importorskip("k2")
pytest.importorskip("kaldilm")

from k2quant.lang import prepare_lang  # noqa: E402
from k2quant.lm.ngram import ArpaLM  # noqa: E402
from k2quant.training.graph_compiler import MmiGraphCompiler  # noqa: E402
from k2quant.training.mmi import LFMMILoss, add_leaky_arcs, den_initial_probs  # noqa: E402

# phones: A B (+ SPN for <UNK>); X=A, Y=B, Z=A B, W=A or B (alternates)
LEXICON = [("X", ["A"]), ("Y", ["B"]), ("Z", ["A", "B"]), ("W", ["A"]), ("W", ["B"])]
TRAIN = ["X Y", "Z", "X X Y", "Y Z X", "W"]
EXACT = dict(den_output_beam=math.inf)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    d = tmp_path_factory.mktemp("lang_chain")
    prepare_lang(LEXICON, d, topo="chain")
    return MmiGraphCompiler(d, train_texts=TRAIN, den_lm_order=2, phone_lm=d / "P.arpa")


@pytest.fixture(scope="module")
def chain_uni(tmp_path_factory):
    d = tmp_path_factory.mktemp("lang_chain_uni")
    prepare_lang(LEXICON, d, topo="chain")
    return MmiGraphCompiler(d, train_texts=TRAIN, den_lm_order=1, phone_lm=d / "P1.arpa")


@pytest.fixture(scope="module")
def ctc(tmp_path_factory):
    d = tmp_path_factory.mktemp("lang_ctc")
    prepare_lang(LEXICON, d, topo="ctc")
    return MmiGraphCompiler(d, train_texts=TRAIN, den_lm_order=2)


# ----------------------------------------------------------------------------- brute force
def enumerate_paths(fsa, T):
    """All (labels, graph_score, phones) of paths reading exactly T labels then a final arc."""
    arcs = fsa.arcs.values()[:, :3].tolist()
    scores = fsa.scores.detach().double().tolist()
    aux = fsa.aux_labels.tolist()
    by_src = defaultdict(list)
    for i, (s, _, _) in enumerate(arcs):
        by_src[s].append(i)
    out = []

    def dfs(state, labels, score, phones):
        for i in by_src[state]:
            _, dst, lab = arcs[i]
            if lab == -1:
                if len(labels) == T:
                    out.append((tuple(labels), score + scores[i], tuple(phones)))
            elif len(labels) < T:
                ph = phones + ([aux[i]] if aux[i] > 0 else [])
                dfs(dst, labels + [lab], score + scores[i], ph)

    dfs(0, [], 0.0, [])
    return out


def brute_tot_and_post(paths, lp, keep=lambda phones: True):
    """log-sum-exp of path scores and occupation posteriors (T, C) for lp (T, C) float64."""
    lp = lp.double()
    rows = lp.tolist()
    tots = []
    labs = []
    for labels, g, phones in paths:
        if keep(phones):
            tots.append(g + sum(rows[t][l] for t, l in enumerate(labels)))
            labs.append(labels)
    if not tots:
        return -math.inf, torch.zeros_like(lp)
    tots_t = torch.tensor(tots, dtype=torch.float64)
    tot = torch.logsumexp(tots_t, 0)
    w = torch.exp(tots_t - tot).tolist()
    post = [[0.0] * lp.shape[1] for _ in range(lp.shape[0])]
    for wi, labels in zip(w, labs):
        for t, l in enumerate(labels):
            post[t][l] += wi
    return float(tot), torch.tensor(post, dtype=torch.float64)


def allowed_phone_seqs(lang, text):
    """Phone-id sequences of a transcript from the lexicon (alternates expanded)."""
    seqs = [()]
    for w in text.split():
        prons = lang.lexicon.get(w, lang.lexicon[lang.oov])
        seqs = [s + tuple(lang.phones[p] for p in pr) for s in seqs for pr in prons]
    return set(seqs)


def segs_for(lengths):
    return torch.tensor([[i, 0, n] for i, n in enumerate(lengths)], dtype=torch.int32)


# ----------------------------------------------------------------------------- compiler
def test_den_graph_structure(chain):
    den = chain.den_graph
    lang = chain.lang
    assert lang.num_pdfs == 7  # A, B, SPN -> 2*3 + 1
    emit = den.labels[den.labels != -1]
    assert int(emit.min()) >= 1 and int(emit.max()) <= 2 * lang.num_phones
    assert den.properties & k2.fsa_properties.EPSILON_FREE
    assert den.properties & k2.fsa_properties.ARC_SORTED
    # the aux label (phone) sits exactly on the first-frame pdf arcs
    for lab, ph in zip(den.labels.tolist(), den.aux_labels.tolist()):
        if lab > 0:
            assert ph == ((lab + 1) // 2 if lab % 2 == 1 else 0)


def test_num_graph_phone_sequences(chain):
    lang = chain.lang
    num, den = chain.compile(["Z W", "X"])
    assert num.shape[0] == 2 and den.shape[0] == 2
    for i, text in enumerate(["Z W", "X"]):
        got = {ph for _, _, ph in enumerate_paths(num[i], 4)}
        want = {s for s in allowed_phone_seqs(lang, text) if len(s) <= 4}
        assert got == want, text
    # num is a subset of den with identical scores (lexicon weights dropped): per label
    # sequence, the summed path probability is the same (den may have several back-off paths)
    def per_labels(paths):
        out = defaultdict(float)
        for lab, g, _ in paths:
            out[lab] += math.exp(g)
        return out

    den_p = per_labels(enumerate_paths(chain.den_graph, 3))
    num_p = per_labels(enumerate_paths(num[0], 3))
    assert num_p
    for lab, p in num_p.items():
        assert p == pytest.approx(den_p[lab], rel=1e-5)


def test_oov_maps_to_unk_and_is_counted(chain, caplog):
    before = chain.num_oov_words
    with caplog.at_level(logging.WARNING):
        num = chain.compile_num(["X FOO", "BAR"])
    assert chain.last_num_oov_words == 2 and chain.num_oov_words == before + 2
    assert "OOV" in caplog.text and "<UNK>" in caplog.text
    spn = chain.lang.phones["SPN"]
    assert {ph for _, _, ph in enumerate_paths(num[1], 2)} == {(spn,)}


def test_den_graph_save_load(chain, tmp_path):
    path = tmp_path / "den.pt"
    chain.save_den_graph(path)
    c2 = MmiGraphCompiler(chain.lang.lang_dir, den_graph=path)
    assert k2.to_str_simple(c2.den_graph) == k2.to_str_simple(chain.den_graph)
    with pytest.raises(ValueError, match="needs a denominator phone LM"):
        MmiGraphCompiler(chain.lang.lang_dir, den_graph=tmp_path / "missing.pt")


# ----------------------------------------------------------------------------- loss
@pytest.mark.parametrize("T", [3, 4, 5])
def test_tot_scores_match_brute_force(chain, T):
    torch.manual_seed(T)
    texts = ["Z", "W X", "Y"]
    lp = torch.randn(len(texts), T, chain.lang.num_pdfs).log_softmax(-1)
    loss_fn = LFMMILoss(chain, **EXACT)
    den_paths = enumerate_paths(chain.den_graph, T)
    for i, text in enumerate(texts):
        lp_i = lp[i:i + 1].clone().requires_grad_(True)
        loss, info = loss_fn(lp_i, segs_for([T]), [text])
        allowed = allowed_phone_seqs(chain.lang, text)
        num_bf, num_post = brute_tot_and_post(den_paths, lp_i[0].detach(), lambda p: p in allowed)
        den_bf, den_post = brute_tot_and_post(den_paths, lp_i[0].detach())
        assert info["num_tot"] == pytest.approx(num_bf, abs=1e-5)
        assert info["den_tot"] == pytest.approx(den_bf, abs=1e-5)
        assert info["num_tot"] <= info["den_tot"] + 1e-9
        assert float(loss) == pytest.approx(-(num_bf - den_bf), abs=1e-5)
        # gradient of -loss = num posteriors - den posteriors
        (g,) = torch.autograd.grad(loss, lp_i)
        assert torch.allclose(-g[0].double(), num_post - den_post, atol=1e-5)


def test_unigram_den_matches_lm_probabilities(chain_uni):
    """Fully independent check: with a 1-gram phone LM the den score of a pdf string is
    sum log_probs + sum ln P(phone) + ln P(</s>), phones parsed by the chain topology."""
    import itertools

    lang = chain_uni.lang
    lm = ArpaLM(lang.lang_dir / "P1.arpa")
    T, C = 4, lang.num_pdfs
    torch.manual_seed(0)
    lp = torch.randn(1, T, C)
    tots = []
    for seq in itertools.product(range(1, C), repeat=T):
        phones = []
        ok = True
        for lab in seq:
            if lab % 2 == 1:
                phones.append((lab + 1) // 2)
            elif not phones or phones[-1] != lab // 2:
                ok = False
                break
        if not ok:
            continue
        s = sum(float(lp[0, t, l]) for t, l in enumerate(seq))
        s += sum(lm.logprob(lang.phones[p]) for p in phones) + lm.logprob("</s>")
        tots.append(s)
    den_bf = float(torch.logsumexp(torch.tensor(tots, dtype=torch.float64), 0))
    _, info = LFMMILoss(chain_uni, **EXACT)(lp, segs_for([T]), ["Z"])
    assert info["den_tot"] == pytest.approx(den_bf, abs=1e-4)


def test_batch_unsorted_segments_and_frames(chain):
    torch.manual_seed(1)
    lengths = [3, 5, 4]
    texts = ["X", "Z Y", "W"]
    lp = torch.randn(3, 6, chain.lang.num_pdfs).log_softmax(-1)
    loss_fn = LFMMILoss(chain, **EXACT)
    loss, info = loss_fn(lp, segs_for(lengths), texts)
    assert info["num_frames"] == sum(lengths) and info["num_segments"] == 3
    # equals the sum of the per-segment losses
    parts = [loss_fn(lp[i:i + 1], segs_for([n]), [t])[0] for i, (n, t) in
             enumerate(zip(lengths, texts))]
    assert float(loss) == pytest.approx(float(sum(parts)), abs=1e-4)


def test_gradient_finite_differences(chain):
    torch.manual_seed(2)
    lp = torch.randn(2, 4, chain.lang.num_pdfs)
    segs = segs_for([4, 3])
    texts = ["Z", "W"]
    loss_fn = LFMMILoss(chain, **EXACT)
    x = lp.clone().requires_grad_(True)
    loss, _ = loss_fn(x, segs, texts)
    (g,) = torch.autograd.grad(loss, x)
    eps = 1e-2
    for idx in [(0, 0, 1), (0, 2, 2), (0, 3, 5), (1, 1, 3), (1, 2, 6), (1, 3, 1), (0, 1, 0)]:
        xp, xm = lp.clone(), lp.clone()
        xp[idx] += eps
        xm[idx] -= eps
        fd = (float(loss_fn(xp, segs, texts)[0]) - float(loss_fn(xm, segs, texts)[0])) / (2 * eps)
        assert fd == pytest.approx(float(g[idx]), abs=2e-3), idx
    assert float(g[1, 3].abs().sum()) == 0.0  # frame outside segment 1
    assert float(g[0, :, 0].abs().sum()) == 0.0  # chain: column 0 is never read


@pytest.mark.parametrize("den_scale", [1.0, 0.5])
def test_per_frame_gradient_sums(chain, den_scale):
    torch.manual_seed(3)
    logits = torch.randn(2, 5, chain.lang.num_pdfs, requires_grad=True)
    lp = logits.log_softmax(-1)
    lp.retain_grad()
    segs = segs_for([5, 3])
    loss, info = LFMMILoss(chain, den_scale=den_scale, **EXACT)(lp, segs, ["Z X", "Y"])
    loss.backward()
    sums = lp.grad.sum(-1)  # d loss / d log_probs summed over pdfs, per frame
    # -(gamma_num - den_scale * gamma_den): each posterior sums to 1 on a segment's frames
    expected = torch.tensor([[-(1 - den_scale)] * 5, [-(1 - den_scale)] * 3 + [0.0, 0.0]])
    assert torch.allclose(sums, expected, atol=1e-5)
    # w.r.t. the pre-softmax logits the per-frame sums are 0 whatever den_scale is
    assert torch.allclose(logits.grad.sum(-1), torch.zeros(2, 5), atol=1e-5)


def test_pruned_matches_exact(chain):
    torch.manual_seed(4)
    lp = torch.randn(3, 5, chain.lang.num_pdfs).log_softmax(-1)
    segs = segs_for([5, 5, 4])
    texts = ["Z X", "Y", "W"]
    _, exact = LFMMILoss(chain, **EXACT)(lp, segs, texts)
    _, pruned = LFMMILoss(chain, use_pruned_intersect=True, search_beam=1e3,
                          den_output_beam=1e3, min_active_states=0,
                          max_active_states=100000)(lp, segs, texts)
    assert pruned["den_tot"] == pytest.approx(exact["den_tot"], abs=1e-4)
    assert pruned["num_tot"] == pytest.approx(exact["num_tot"], abs=1e-4)


def test_too_short_sequence_dropped(chain, caplog):
    torch.manual_seed(5)
    x = torch.randn(3, 4, chain.lang.num_pdfs).requires_grad_(True)
    lp = x.log_softmax(-1)
    segs = segs_for([4, 2, 3])
    texts = ["X", "Z Z Z", "Y"]  # "Z Z Z" needs 6 frames
    loss_fn = LFMMILoss(chain, **EXACT)
    with caplog.at_level(logging.WARNING):
        loss, info = loss_fn(lp, segs, texts)
    assert info["num_dropped"] == 1 and info["dropped"] == [1] and info["num_segments"] == 2
    assert info["num_frames"] == 7 and "dropping 1/3" in caplog.text
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert float(x.grad[1].abs().sum()) == 0.0
    ref, _ = loss_fn(lp[[0, 2]].detach(), segs_for([4, 3]), ["X", "Y"])
    assert float(loss) == pytest.approx(float(ref), abs=1e-5)
    # nothing left: zero loss, still differentiable
    loss, info = loss_fn(x.log_softmax(-1)[1:2], segs_for([2]), ["Z Z Z"])
    assert float(loss) == 0.0 and info["num_dropped"] == 1 and info["num_frames"] == 0
    loss.backward()


def test_oov_in_loss(chain):
    lp = torch.randn(1, 3, chain.lang.num_pdfs).log_softmax(-1)
    loss, info = LFMMILoss(chain, **EXACT)(lp, segs_for([3]), ["FOO"])
    assert info["num_oov_words"] == 1 and math.isfinite(float(loss))


def test_leaky_hmm(chain):
    den = chain.den_graph
    init = den_initial_probs(den)
    assert float(init.sum()) == pytest.approx(1.0) and float(init[-1]) == 0.0
    leaky = add_leaky_arcs(den, 0.1)
    assert leaky.shape[0] == den.shape[0] + 1
    T = 3
    torch.manual_seed(6)
    lp = torch.randn(1, T, chain.lang.num_pdfs).log_softmax(-1)
    _, plain = LFMMILoss(chain, **EXACT)(lp, segs_for([T]), ["Z"])
    _, info = LFMMILoss(chain, leaky_hmm=0.1, **EXACT)(lp, segs_for([T]), ["Z"])
    # exact intersection with the leaky graph == brute force over its paths
    den_bf, _ = brute_tot_and_post(enumerate_paths(leaky, T), lp[0])
    assert info["den_tot"] == pytest.approx(den_bf, abs=1e-5)
    assert info["den_tot"] > plain["den_tot"]  # leaking only adds paths
    assert info["num_tot"] == pytest.approx(plain["num_tot"], abs=1e-6)  # num is not leaky
    # Kaldi semantics: alpha_{t+1} += leak * sum(alpha_{t+1}) * init, written as the HMM recursion
    a = den.arcs.values().long()
    src, dst, lab = a[:, 0], a[:, 1], a[:, 2]
    w = den.scores.detach().double()
    emit = lab != -1
    alpha = torch.zeros(den.shape[0], dtype=torch.float64)
    alpha[0] = 1.0
    for t in range(T):
        contrib = alpha[src[emit]] * torch.exp(w[emit] + lp[0, t, lab[emit]].double())
        nxt = torch.zeros_like(alpha).index_add_(0, dst[emit], contrib)
        alpha = nxt + 0.1 * nxt.sum() * init
    fin = float((alpha[src[~emit]] * torch.exp(w[~emit])).sum())
    assert info["den_tot"] == pytest.approx(math.log(fin), abs=1e-5)


def test_xent_regulariser(chain):
    torch.manual_seed(7)
    lp = torch.randn(1, 4, chain.lang.num_pdfs).log_softmax(-1).requires_grad_(True)
    xlp = torch.randn(1, 4, chain.lang.num_pdfs).log_softmax(-1).requires_grad_(True)
    base, b_info = LFMMILoss(chain, **EXACT)(lp, segs_for([4]), ["Z"])
    loss, info = LFMMILoss(chain, xent_regularize=0.1, **EXACT)(lp, segs_for([4]), ["Z"], xlp)
    allowed = allowed_phone_seqs(chain.lang, "Z")
    _, post = brute_tot_and_post(enumerate_paths(chain.den_graph, 4), lp[0].detach(),
                                 lambda p: p in allowed)
    xent = -float((post * xlp[0].detach().double()).sum())
    assert info["xent"] == pytest.approx(xent, abs=1e-5)
    assert float(loss) == pytest.approx(float(base) + 0.1 * xent, abs=1e-5)
    loss.backward()
    # the xent head gets -0.1 * gamma_num; targets are detached
    assert torch.allclose(xlp.grad[0].double(), -0.1 * post, atol=1e-6)
    # also without autograd on log_probs
    _, info2 = LFMMILoss(chain, xent_regularize=0.1, **EXACT)(lp.detach(), segs_for([4]), ["Z"],
                                                              xlp.detach())
    assert info2["xent"] == pytest.approx(xent, abs=1e-5)
    with torch.no_grad():  # e.g. validation: inputs that require grad, autograd disabled
        _, info3 = LFMMILoss(chain, xent_regularize=0.1, **EXACT)(lp, segs_for([4]), ["Z"], xlp)
    assert info3["xent"] == pytest.approx(xent, abs=1e-5)


def test_ctc_topology_brute_force(ctc):
    T = 4
    torch.manual_seed(8)
    lp = torch.randn(1, T, ctc.lang.num_pdfs).log_softmax(-1)
    assert ctc.lang.num_pdfs == 4
    _, info = LFMMILoss(ctc, **EXACT)(lp, segs_for([T]), ["Z"])
    paths = enumerate_paths(ctc.den_graph, T)
    allowed = allowed_phone_seqs(ctc.lang, "Z")
    num_bf, _ = brute_tot_and_post(paths, lp[0], lambda p: p in allowed)
    den_bf, _ = brute_tot_and_post(paths, lp[0])
    assert info["num_tot"] == pytest.approx(num_bf, abs=1e-5)
    assert info["den_tot"] == pytest.approx(den_bf, abs=1e-5)


def test_input_errors(chain):
    loss_fn = LFMMILoss(chain)
    lp = torch.randn(1, 3, chain.lang.num_pdfs)
    with pytest.raises(ValueError, match="num_pdfs=7"):
        loss_fn(torch.randn(1, 3, 5), segs_for([3]), ["X"])
    with pytest.raises(ValueError, match="torch.int32 CPU"):
        loss_fn(lp, segs_for([3]).long(), ["X"])
    with pytest.raises(ValueError, match="one text per supervision segment"):
        loss_fn(lp, segs_for([3]), ["X", "Y"])
    with pytest.raises(ValueError, match="float32"):
        loss_fn(lp.double(), segs_for([3]), ["X"])
