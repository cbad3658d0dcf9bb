"""Transformer LM, LM text handling, training with perplexity and resume (no k2 needed)."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from k2quant.lm.text import (
    UNK_ID,
    build_vocab,
    make_batches,
    pad_batch,
    read_sentences,
    tokenizer_from_dict,
)
from k2quant.models import build_model
from k2quant.models.transformer_lm import (
    TransformerLM,
    TransformerLMConfig,
    load_lm,
)

from helpers import counting_text


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("lmtext")
    (d / "train.txt").write_text(counting_text(300, 1))
    (d / "valid.txt").write_text(counting_text(50, 2))
    return d / "train.txt", d / "valid.txt"


def tiny_lm(vocab_size=13, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(d_model=32, num_heads=4, num_layers=2, dim_feedforward=64, dropout=0.0)
    cfg.update(kw)
    return TransformerLM(TransformerLMConfig(vocab_size=vocab_size, **cfg)).eval()


# --------------------------------------------------------------------------------- model


def test_forward_shapes_and_padding():
    lm = tiny_lm()
    x, y, lengths = pad_batch([[3, 4, 5], [6], []])
    assert x.shape == y.shape == (3, 4) and lengths.tolist() == [4, 2, 1]
    assert x[:, 0].tolist() == [1, 1, 1] and y[0].tolist() == [3, 4, 5, 1]
    nll = lm(x, y, lengths)
    assert nll.shape == (3, 4) and nll.dtype == torch.float32
    assert bool((nll[1, 2:] == 0).all()) and bool((nll[2, 1:] == 0).all())
    assert bool((nll[0] > 0).all())
    lp = lm.log_probs(x)
    assert lp.shape == (3, 4, 13)
    assert torch.allclose(lp.exp().sum(-1), torch.ones(3, 4), atol=1e-5)
    assert bool(torch.isinf(lp[..., 0]).all()), "<blk>/pad must never be predicted"


def test_causality():
    lm = tiny_lm()
    x = torch.tensor([[1, 3, 4, 5, 6, 7]])
    x2 = x.clone()
    x2[0, 4] = 9
    a, b = lm.log_probs(x), lm.log_probs(x2)
    assert torch.equal(a[0, :4], b[0, :4]), "a future token changed earlier log-probs"
    assert not torch.allclose(a[0, 4:], b[0, 4:])


def test_tied_embeddings():
    lm = tiny_lm()
    linears = [n for n, m in lm.named_modules() if isinstance(m, nn.Linear)]
    assert all(n.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "out_proj", "ff1", "ff2")
               for n in linears), linears
    assert len(linears) == 6 * 2
    assert lm.output_weight() is lm.embed.weight
    tables = [n for n, p in lm.named_parameters() if p.shape == (13, 32)]
    assert tables == ["embed.weight"], "no separate output matrix expected"
    # the logits follow the embedding table
    x = torch.tensor([[1, 3, 4]])
    before = lm.logits(x)
    with torch.no_grad():
        lm.embed.weight[7] += torch.randn(32)
    after = lm.logits(x)
    changed = (before - after).abs().amax(dim=(0, 1))
    assert changed[7] > 0.1
    # gradients of the output layer reach the embedding of a token that is never an input
    lm.zero_grad()
    lm(x, torch.tensor([[3, 4, 1]]), torch.tensor([3])).sum().backward()
    assert lm.embed.weight.grad[9].abs().sum() > 0


class _ScaledEmbedding(nn.Embedding):
    def effective_weight(self):
        return self.weight * 0.5


def test_output_uses_effective_weight():
    lm = tiny_lm()
    x = torch.tensor([[1, 3, 4]])
    fake = _ScaledEmbedding(13, 32)
    fake.weight = lm.embed.weight
    lm.embed = fake
    h_lp = lm.logits(x)
    # recompute by hand with the halved table for the output (input embedding unchanged)
    assert torch.equal(lm.output_weight(), lm.embed.weight * 0.5)
    lm.embed = nn.Embedding(13, 32)
    lm.embed.weight = fake.weight
    assert not torch.allclose(h_lp, lm.logits(x))


def test_quantize_covers_every_layer():
    plan_mod = pytest.importorskip("k2quant.plan")
    lm = tiny_lm()
    x = torch.tensor([[1, 3, 4, 5]])
    ref = lm.logits(x)
    plan = plan_mod.Plan({}, default=plan_mod.LayerConfig(weight_bits=3))
    plan_mod.quantize_(lm, plan)
    lm.eval()
    left = [n for n, m in lm.named_modules() if type(m) in (nn.Linear, nn.Embedding)]
    assert left == [], f"layers left float: {left}"
    w = lm.output_weight()
    assert not torch.equal(w, lm.embed.weight), "tied output must use the quantized table"
    assert torch.equal(w, F.embedding(torch.arange(13), w))
    out = lm.logits(x)
    assert out.shape == ref.shape and not torch.allclose(out, ref)
    # frozen (converted) model gives the same outputs
    plan_mod.convert(lm)
    assert torch.allclose(lm.logits(x), out, atol=1e-5)


def test_packed_quantized_lm_round_trip(tmp_path):
    """A 2-bit LM saved with k2quant.export and loaded by load_lm scores identically and
    keeps its tokenizer (the spec in the packed header carries it)."""
    plan_mod = pytest.importorskip("k2quant.plan")
    export = pytest.importorskip("k2quant.export")
    tok = build_vocab([["a", "b", "c"]])
    torch.manual_seed(0)
    lm = TransformerLM(TransformerLMConfig(vocab_size=len(tok), d_model=16, num_heads=2,
                                           num_layers=1, dim_feedforward=32,
                                           tokenizer=tok.to_dict()))
    plan_mod.quantize_(lm, plan_mod.Plan({}, default=plan_mod.LayerConfig(weight_bits=2)))
    lm.eval()
    sents = [[3, 4, 5], [5], []]
    ref = lm.score_sentences(sents)
    export.save_packed(lm, tmp_path / "lm.k2q")
    lm2 = load_lm(tmp_path / "lm.k2q")
    assert torch.equal(lm2.score_sentences(sents), ref)
    assert lm2.tokenizer.symbols == tok.symbols


def test_score_sentences_equals_stepwise_sum():
    lm = tiny_lm(seed=3)
    sents = [[3, 4, 5, 6, 7], [8], [], [9, 10, 11, 12, 3, 4, 5, 6], [2, 2, 5]]
    got = lm.score_sentences(sents, max_tokens=12)  # several batches, sorted by length
    assert got.dtype == torch.float64 and got.shape == (5,)
    for i, s in enumerate(sents):
        total = 0.0
        prefix = [1]
        for t in list(s) + [1]:
            lp = lm.log_probs(torch.tensor([prefix]))[0, -1]
            total += float(lp[t].detach())
            prefix.append(t)
        assert got[i].item() == pytest.approx(total, abs=1e-4), (i, s)


def test_spec_round_trip_and_presets():
    tok = build_vocab([["a", "b"], ["b", "c"]])
    cfg = TransformerLMConfig(vocab_size=len(tok), d_model=16, num_heads=2, num_layers=1,
                              dim_feedforward=32, tokenizer=tok.to_dict())
    lm = TransformerLM(cfg).eval()
    spec = lm.model_spec()
    assert spec["arch"] == "transformer_lm"
    json.dumps(spec)  # JSON-able
    lm2 = build_model(spec).eval()
    lm2.load_state_dict(lm.state_dict())
    x = torch.tensor([[1, 3, 4]])
    assert torch.equal(lm.logits(x), lm2.logits(x))
    assert lm2.tokenizer.symbols == tok.symbols
    p = TransformerLMConfig.preset("paper", 1000)
    assert (p.num_layers, p.d_model, p.num_heads, p.dim_feedforward) == (6, 512, 8, 2048)
    s = TransformerLMConfig.preset("small", 50, num_layers=3)
    assert (s.num_layers, s.d_model, s.num_heads) == (3, 128, 4)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        TransformerLMConfig(vocab_size=10, d_model=30, num_heads=4)
    with pytest.raises(ValueError, match="unknown TransformerLM preset"):
        TransformerLMConfig.preset("huge", 10)
    with pytest.raises(ValueError, match="tokenizer has 6 symbols but vocab_size is 9"):
        TransformerLMConfig(vocab_size=9, tokenizer=tok.to_dict())


# ---------------------------------------------------------------------------------- text


def test_vocab_oov_counted(tmp_path):
    train = [["a", "b", "a"], ["c", "a", "<UNK>"], ["b"]]
    tok = build_vocab(train)
    assert tok.symbols == ["<blk>", "<sos/eos>", "<unk>", "a", "b", "c"]
    enc = tok.encode([["a", "zz", "b", "zz", "yy"], ["<unk>"]])
    assert enc.ids == [[3, UNK_ID, 4, UNK_ID, UNK_ID], [UNK_ID]]
    assert enc.num_oov == 4 and enc.num_words == 6
    assert dict(enc.oov_counts) == {"zz": 2, "yy": 1}
    assert enc.num_tokens == 6 + 2
    rare = build_vocab(train, min_count=2)
    assert rare.symbols[3:] == ["a", "b"]
    assert rare.encode([["c"]]).num_oov == 1
    assert tokenizer_from_dict(tok.to_dict()).symbols == tok.symbols
    (tmp_path / "k.txt").write_text("u1 a b\nu2\n\nu3 c\n")
    assert read_sentences(tmp_path / "k.txt", "kaldi") == [["a", "b"], ["c"]]
    with pytest.raises(ValueError, match="text_format must be one of"):
        read_sentences(tmp_path / "k.txt", "csv")


def test_make_batches():
    lengths = [5, 1, 9, 3, 3, 7, 2, 20]
    batches = make_batches(lengths, max_tokens=12)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 12
    assert batches[0] == [7]  # longer than max_tokens: alone
    sh = make_batches(lengths, 12, shuffle=True, seed=5)
    assert sorted(map(tuple, sh)) == sorted(map(tuple, batches))
    assert sh == make_batches(lengths, 12, shuffle=True, seed=5)


def test_bpe_round_trip(tmp_path):
    pytest.importorskip("sentencepiece")
    from k2quant.lm.text import train_bpe

    sents = [s.split() for s in counting_text(200, 4).splitlines()]
    tok = train_bpe(sents, 30, work_dir=tmp_path)
    assert (tmp_path / "bpe.model").is_file()
    assert tok.symbols[:3] == ["<blk>", "<sos/eos>", "<unk>"] and len(tok) == 30
    enc = tok.encode(sents[:20])
    assert enc.num_oov == 0
    assert all(len(ids) >= len(s) for ids, s in zip(enc.ids, sents[:20]))
    for ids, s in zip(enc.ids, sents[:20]):
        assert tok.decode(ids) == s
    tok2 = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    assert tok2.encode(sents[:20]).ids == enc.ids
    # an LM carrying it can be deep-copied (as save_packed does) after tokenizing
    import copy

    lm = TransformerLM(TransformerLMConfig(vocab_size=len(tok), d_model=16, num_heads=2,
                                           num_layers=1, tokenizer=tok.to_dict()))
    assert lm.tokenizer.encode(sents[:2]).ids == enc.ids[:2]
    assert copy.deepcopy(lm).tokenizer.encode(sents[:2]).ids == enc.ids[:2]
    unk = tok.encode([["zebra"]])
    assert unk.num_oov >= 1 and UNK_ID in unk.ids[0] and unk.oov_counts["zebra"] == 1


# ------------------------------------------------------------------------------ training


def _cfg(texts, exp_dir, **kw):
    from k2quant.lm.train import LmTrainConfig

    train, valid = texts
    base = dict(train_text=str(train), valid_text=str(valid), exp_dir=str(exp_dir),
                d_model=32, num_heads=2, num_layers=1, dim_feedforward=64, dropout=0.1,
                num_epochs=6, lr=3e-3, warmup_steps=10, max_tokens=200, device="cpu",
                log_interval=0, num_threads=1)
    base.update(kw)
    return LmTrainConfig(**base)


def test_training_lowers_perplexity(texts, tmp_path):
    from k2quant.lm.train import eval_lm, train_lm

    hist = train_lm(_cfg(texts, tmp_path / "exp"))
    vocab = 13  # 10 words + 3 specials
    assert len(hist) == 6
    final = hist[-1]["valid_ppl"]
    # uniform over the vocabulary would be 13 (12 predictable symbols); the text is nearly
    # deterministic after its first word
    assert final < vocab / 3, f"held-out ppl {final:.2f} not < {vocab / 3:.2f}: {hist}"
    assert final < hist[0]["valid_ppl"]
    files = {p.name for p in (tmp_path / "exp").iterdir()}
    assert {"epoch-1.pt", "epoch-6.pt", "tokenizer.json", "lm-history.json", "log"} <= files
    saved = json.loads((tmp_path / "exp" / "lm-history.json").read_text())
    assert saved["best_valid_ppl"] == min(h["valid_ppl"] for h in hist)
    res = eval_lm(tmp_path / "exp" / "epoch-6.pt", texts[1])
    assert res["ppl"] == pytest.approx(final, rel=1e-6)
    assert res["num_oov"] == 0 and res["num_sentences"] == 50


def test_resume_identical(texts, tmp_path):
    from k2quant.lm.train import train_lm

    full = train_lm(_cfg(texts, tmp_path / "a", num_epochs=2))
    train_lm(_cfg(texts, tmp_path / "b", num_epochs=1))
    resumed = train_lm(_cfg(texts, tmp_path / "b", num_epochs=2, start_epoch=2))
    a = torch.load(tmp_path / "a" / "epoch-2.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "epoch-2.pt", weights_only=False)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["step"] == b["step"]
    assert [h["valid_ppl"] for h in full] == [h["valid_ppl"] for h in resumed]
    assert not torch.equal(a["model"]["embed.weight"],
                           torch.load(tmp_path / "b" / "epoch-1.pt",
                                      weights_only=False)["model"]["embed.weight"])
    with pytest.raises(ValueError, match="flags differ"):
        train_lm(_cfg(texts, tmp_path / "b", num_epochs=3, start_epoch=3, d_model=64))
    with pytest.raises(FileNotFoundError, match="epoch-6.pt, which does not exist"):
        train_lm(_cfg(texts, tmp_path / "b", num_epochs=8, start_epoch=7))


def test_bpe_training_and_cli(texts, tmp_path):
    pytest.importorskip("sentencepiece")
    from click.testing import CliRunner

    from k2quant.bin.cli import cli

    exp = tmp_path / "bpe"
    r = CliRunner().invoke(cli, [
        "train-lm", "--train-text", str(texts[0]), "--valid-text", str(texts[1]),
        "--exp-dir", str(exp), "--unit", "bpe", "--bpe-vocab-size", "25", "--num-epochs", "2",
        "--d-model", "32", "--num-heads", "2", "--num-layers", "1", "--dim-feedforward", "64",
        "--max-tokens", "300", "--device", "cpu",
    ])
    assert r.exit_code == 0, r.output
    assert "epoch 2: train ppl" in r.output
    lm = load_lm(exp / "epoch-2.pt")
    assert lm.tokenizer.unit == "bpe" and len(lm.tokenizer) == 25
    r = CliRunner().invoke(cli, ["eval-lm", "--lm", str(exp / "epoch-2.pt"), "--text",
                                 str(texts[1]), "--json", str(tmp_path / "ppl.json")])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("ppl ") and "word ppl" in r.output
    res = json.loads((tmp_path / "ppl.json").read_text())
    assert math.isfinite(res["ppl"]) and res["unit"] == "bpe"


def test_word_cli_and_load_errors(texts, tmp_path):
    from click.testing import CliRunner

    from k2quant.bin.cli import cli

    exp = tmp_path / "w"
    args = ["train-lm", "--train-text", str(texts[0]), "--valid-text", str(texts[1]),
            "--exp-dir", str(exp), "--num-epochs", "1", "--d-model", "16", "--num-heads", "2",
            "--num-layers", "1", "--dim-feedforward", "32", "--device", "cpu"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    (tmp_path / "other.txt").write_text("eleven twelve one\n")
    r = CliRunner().invoke(cli, ["eval-lm", "--lm", str(exp / "epoch-1.pt"), "--text",
                                 str(tmp_path / "other.txt")])
    assert r.exit_code == 0, r.output
    assert "2 <unk>" in r.output
    torch.save({"weights": 1}, tmp_path / "bogus.pt")
    with pytest.raises(ValueError, match="expected a checkpoint dict with 'model_spec'"):
        load_lm(tmp_path / "bogus.pt")
    with pytest.raises(FileNotFoundError, match="LM file .* not found"):
        load_lm(tmp_path / "nope.pt")
