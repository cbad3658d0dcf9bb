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
