"""Builders shared by several test modules (``from helpers import ...``; pytest puts tests/ on
``sys.path``)."""
import random

import torch

# A tiny lang: "A" is a prefix of "B" (needs lexicon disambiguation #1); no word sequence over
# it has two segmentations into words.
TINY_LEXICON = [("A", ["a", "b"]), ("B", ["a", "b", "c"]), ("C", ["c", "a"])]

# A bigram over TINY_LEXICON's words with explicit A->C, C->B, B-></s>; everything else via
# back-off.
TINY_ARPA = """\
\\data\\
ngram 1=5
ngram 2=4

\\1-grams:
-0.69897 </s>
-99 <s> -0.30103
-0.60206 A -0.30103
-0.60206 B -0.30103
-0.60206 C -0.30103

\\2-grams:
-0.30103 <s> A
-0.30103 A C
-0.30103 C B
-0.30103 B </s>

\\end\\
"""

WORDS = "zero one two three four five six seven eight nine".split()


def counting_text(n, seed):
    """Sentences of 3..6 consecutive number words (mod 10): very predictable after word 1."""
    r = random.Random(seed)
    lines = []
    for _ in range(n):
        k, L = r.randrange(10), r.randint(3, 6)
        lines.append(" ".join(WORDS[(k + i) % 10] for i in range(L)))
    return "\n".join(lines) + "\n"


def fbank_like(n, t, seed, feat_dim):
    """Stationary, temporally smooth, fbank-like random features (n, t, feat_dim)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, feat_dim, t + 8, generator=g)
    smooth = torch.nn.functional.avg_pool1d(noise, 9, stride=1) * 3.0  # ~unit variance
    return (smooth.transpose(1, 2) * 2.0 + torch.linspace(-5, 3, feat_dim)).contiguous()


def tdnnf_hvp_case():
    """(model, loss_fn, batch): a ReLU TDNN-F in eval mode and a frame cross entropy with
    curvature in the output too (a loss whose double backward is complete), on which the
    Hessian-vector products by double backprop and by output differences must agree."""
    from torch import nn

    from k2quant.models.tdnnf import TdnnF, TdnnFConfig

    torch.manual_seed(0)
    model = TdnnF(TdnnFConfig(feat_dim=20, num_classes=30, hidden_dim=64, bottleneck_dims=16,
                              strides=[1, 1, 0, 3], prefinal_bottleneck=24,
                              dropout_schedule=None)).eval()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 60, 20, generator=g)
    with torch.no_grad():
        y = torch.randint(0, 30, (2 * model(x).shape[1],), generator=g)

    def smooth_loss(m, b):
        lp = m(b[0])
        return (nn.functional.cross_entropy(0.7 * lp.reshape(-1, lp.shape[-1]), b[1])
                + 0.01 * lp.pow(2).mean())

    return model, smooth_loss, (x, y)
