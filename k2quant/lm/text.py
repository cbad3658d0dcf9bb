"""LM text: reading, vocabularies (words or sentencepiece BPE), tokenisation and batching.

Text files hold one sentence per line: ``plain`` (the whole line is the sentence) or ``kaldi``
(``<utt_id> w1 w2 ...``: the first field is dropped). Words are split on whitespace and kept
as they are (no case folding: the LM vocabulary must match ``words.txt`` of the decoding
graph when the LM rescores lattices). Blank lines are skipped.

Symbol ids (icefall's ``transformer_lm``/BPE convention, used by
:class:`k2quant.models.transformer_lm.TransformerLM`):

==========  ==============  ======================================================
id          symbol          meaning
==========  ==============  ======================================================
0           ``<blk>``       padding; never predicted
1           ``<sos/eos>``   one symbol: start-of-sentence input and end target
2           ``<unk>``       any word/piece not in the vocabulary
3 ..        words / pieces
==========  ==============  ======================================================

Word vocabularies (:func:`build_vocab`) list the training text's words by decreasing count
(ties alphabetically) after the three special symbols, optionally cut at ``min_count`` or
``max_words``; words spelled like an unknown-word marker (``<unk>``, ``<UNK>``) map to
``<unk>``. Encoding a text counts the tokens that became ``<unk>`` (:class:`EncodedText`).

BPE vocabularies (:func:`train_bpe`) are trained with the sentencepiece library on the
training text itself (nothing is downloaded), with ``<blk>`` and ``<sos/eos>`` as user-defined
symbols and ``unk_id=2`` so that sentencepiece ids are the LM ids; the ``identity``
normalisation keeps the serialised model small. The model bytes are stored in the tokenizer
dict (base64), so an LM checkpoint or packed file needs no separate ``bpe.model``.

Batching (:func:`make_batches`) sorts sentences by length and cuts the sorted list into
batches of at most ``max_tokens`` padded tokens (``batch_size * longest``); training shuffles
the batch order with a seeded ``random.Random`` per epoch.
"""
import base64
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

log = logging.getLogger(__name__)

PathLike = Union[str, Path]

BLK, SOS_EOS, UNK = "<blk>", "<sos/eos>", "<unk>"
SPECIAL_SYMBOLS = (BLK, SOS_EOS, UNK)
PAD_ID, SOS_ID, EOS_ID, UNK_ID = 0, 1, 1, 2
UNK_SPELLINGS = frozenset({"<unk>", "<UNK>", "<Unk>"})
TEXT_FORMATS = ("plain", "kaldi")


# ----------------------------------------------------------------------------- reading


def read_sentences(path: PathLike, text_format: str = "plain") -> List[List[str]]:
    """Sentences (lists of words) of a text file; blank lines (or id-only lines) skipped."""
    if text_format not in TEXT_FORMATS:
        raise ValueError(f"text_format must be one of {TEXT_FORMATS}, got {text_format!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} not found")
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            words = line.split()
            if text_format == "kaldi":
                words = words[1:]
            if words:
                out.append(words)
    if not out:
        raise ValueError(f"{path}: no sentences found (format {text_format!r}); is it empty?")
    return out


# --------------------------------------------------------------------------- tokenizers


@dataclass
class EncodedText:
    """Token ids of several sentences plus counts for perplexity/OOV reports."""

    ids: List[List[int]]
    num_words: int = 0          # words in the input (before sub-word splitting)
    num_oov: int = 0            # words (word unit) or pieces (bpe) that became <unk>
    oov_counts: Counter = field(default_factory=Counter)

    @property
    def num_tokens(self) -> int:
        """Predicted tokens: every token plus one ``<eos>`` per sentence."""
        return sum(len(s) + 1 for s in self.ids)

    @property
    def oov_rate(self) -> float:
        return self.num_oov / max(1, self.num_words)


class Tokenizer:
    """Maps sentences (lists of words) to LM token ids. Subclasses: word, bpe."""

    unit = "?"

    def __init__(self, symbols: Sequence[str]):
        symbols = list(symbols)
        if tuple(symbols[:3]) != SPECIAL_SYMBOLS:
            raise ValueError(f"the first three symbols must be {SPECIAL_SYMBOLS}, got "
                             f"{tuple(symbols[:3])}")
        if len(set(symbols)) != len(symbols):
            dup = [s for s, c in Counter(symbols).items() if c > 1][:5]
            raise ValueError(f"duplicate symbols in the vocabulary: {dup}")
        self.symbols = symbols
        self.sym2id = {s: i for i, s in enumerate(symbols)}

    def __len__(self) -> int:
        return len(self.symbols)

    pad_id, sos_id, eos_id, unk_id = PAD_ID, SOS_ID, EOS_ID, UNK_ID

    def encode(self, sentences: Iterable[Sequence[str]]) -> EncodedText:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> List[str]:
        raise NotImplementedError

    def to_dict(self) -> Dict[str, Any]:
        raise NotImplementedError


class WordTokenizer(Tokenizer):
    """One token per word; unknown words -> ``<unk>`` (counted)."""

    unit = "word"

    def encode(self, sentences: Iterable[Sequence[str]]) -> EncodedText:
        enc = EncodedText(ids=[])
        get = self.sym2id.get
        for words in sentences:
            row = []
            for w in words:
                i = get(w)
                if i is None or i < 3:
                    if w not in UNK_SPELLINGS:
                        enc.oov_counts[w] += 1
                    enc.num_oov += 1
                    i = UNK_ID
                row.append(i)
            enc.ids.append(row)
            enc.num_words += len(words)
        return enc

    def decode(self, ids: Sequence[int]) -> List[str]:
        return [self.symbols[i] for i in ids]

    def to_dict(self) -> Dict[str, Any]:
        return {"unit": "word", "symbols": list(self.symbols)}


class BpeTokenizer(Tokenizer):
    """Sentencepiece pieces; the sentencepiece model is kept as bytes (see module docstring)."""

    unit = "bpe"

    def __init__(self, model_proto: bytes):
        from k2quant.utils.deps import optional_import

        spm = optional_import("sentencepiece")
        self.model_proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor()
        self.sp.LoadFromSerializedProto(self.model_proto)
        super().__init__([self.sp.IdToPiece(i) for i in range(self.sp.GetPieceSize())])
        if self.sp.unk_id() != UNK_ID:
            raise ValueError(f"sentencepiece model has unk_id={self.sp.unk_id()}, expected "
                             f"{UNK_ID}; train it with k2quant.lm.text.train_bpe")

    def encode(self, sentences: Iterable[Sequence[str]]) -> EncodedText:
        enc = EncodedText(ids=[])
        for words in sentences:
            row = list(self.sp.EncodeAsIds(" ".join(words))) if words else []
            n_unk = sum(1 for i in row if i == UNK_ID)
            if n_unk:
                enc.num_oov += n_unk
                for w in words:
                    if UNK_ID in self.sp.EncodeAsIds(w):
                        enc.oov_counts[w] += 1
            enc.ids.append(row)
            enc.num_words += len(words)
        return enc

    def decode(self, ids: Sequence[int]) -> List[str]:
        return self.sp.DecodeIds([int(i) for i in ids]).split()

    def to_dict(self) -> Dict[str, Any]:
        return {"unit": "bpe", "symbols": list(self.symbols),
                "sp_model": base64.b64encode(self.model_proto).decode("ascii")}


def tokenizer_from_dict(d: Dict[str, Any]) -> Tokenizer:
    """Inverse of ``Tokenizer.to_dict()``."""
    unit = d.get("unit") if isinstance(d, dict) else None
    if unit == "word":
        return WordTokenizer(d["symbols"])
    if unit == "bpe":
        tok = BpeTokenizer(base64.b64decode(d["sp_model"]))
        if d.get("symbols") and list(d["symbols"]) != tok.symbols:
            raise ValueError("BPE tokenizer dict: stored symbols differ from the sentencepiece "
                             "model's pieces (corrupted tokenizer)")
        return tok
    raise ValueError(f"tokenizer dict must have unit 'word' or 'bpe', got {unit!r}")


# ------------------------------------------------------------------------- vocabularies


def build_vocab(
    sentences: Iterable[Sequence[str]], *, min_count: int = 1, max_words: Optional[int] = None
) -> WordTokenizer:
    """Word vocabulary of ``sentences`` (see the module docstring for the order).

    Args:
      min_count: words seen fewer times become ``<unk>``.
      max_words: keep at most this many words (the most frequent), besides the specials.
    """
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    counts = Counter(w for s in sentences for w in s)
    for s in list(counts):
        if s in UNK_SPELLINGS or s in SPECIAL_SYMBOLS:
            del counts[s]
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    if max_words is not None:
        words = words[:max_words]
    dropped = len(counts) - len(words)
    if dropped:
        log.info("vocabulary: %d word types kept, %d rare types mapped to %s", len(words),
                 dropped, UNK)
    return WordTokenizer(list(SPECIAL_SYMBOLS) + words)


def train_bpe(
    sentences: Sequence[Sequence[str]],
    vocab_size: int,
    *,
    model_type: str = "bpe",
    work_dir: Optional[PathLike] = None,
    character_coverage: float = 1.0,
) -> BpeTokenizer:
    """Train a sentencepiece model on ``sentences`` (no downloads).

    Args:
      vocab_size: number of pieces including ``<blk>``, ``<sos/eos>``, ``<unk>``.
        sentencepiece fails when the text cannot support that many pieces; the error then
        says to lower it. With ``work_dir`` the model is also written to ``work_dir/bpe.model``.
    """
    import io

    from k2quant.utils.deps import optional_import

    spm = optional_import("sentencepiece")
    if vocab_size < 5:
        raise ValueError(f"BPE vocab_size must be >= 5 (3 special symbols), got {vocab_size}")
    lines = [" ".join(s) for s in sentences if s]
    if not lines:
        raise ValueError("train_bpe: no training sentences")
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=buf,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            user_defined_symbols=[BLK, SOS_EOS],
            unk_id=UNK_ID,
            unk_piece=UNK,
            bos_id=-1,
            eos_id=-1,
            pad_id=-1,
            normalization_rule_name="identity",
            input_sentence_size=10_000_000,
            shuffle_input_sentence=False,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(f"sentencepiece could not train a {vocab_size}-piece {model_type} "
                         f"model on this text ({e}); lower --bpe-vocab-size") from e
    proto = buf.getvalue()
    if work_dir is not None:
        from k2quant.utils.io import atomic_write_bytes

        atomic_write_bytes(Path(work_dir) / "bpe.model", proto)
    return BpeTokenizer(proto)


# ----------------------------------------------------------------------------- batching


def make_batches(
    lengths: Sequence[int], max_tokens: int, *, shuffle: bool = False, seed: int = 0
) -> List[List[int]]:
    """Indexes of sentences grouped into batches of at most ``max_tokens`` padded tokens.

    Sentences are sorted by decreasing length (stable), so each batch holds similar lengths;
    a sentence longer than ``max_tokens`` gets a batch of its own. With ``shuffle`` the order
    of the batches (not their content) is shuffled with ``random.Random(seed)``.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: List[List[int]] = []
    cur: List[int] = []
    longest = 0
    for i in order:
        n = max(1, lengths[i])
        if cur and max(longest, n) * (len(cur) + 1) > max_tokens:
            batches.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        batches.append(cur)
    if shuffle:
        random.Random(seed).shuffle(batches)
    return batches


def pad_batch(
    sentences: Sequence[Sequence[int]], sos_id: int = SOS_ID, eos_id: int = EOS_ID,
    pad_id: int = PAD_ID,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LM inputs/targets of a batch: ``x = [sos, t_1..t_n]``, ``y = [t_1..t_n, eos]``.

    Returns:
      ``(x, y, lengths)``: two (N, L) int64 tensors right-padded with ``pad_id``
      (``L = 1 + longest sentence``) and the (N,) int64 lengths ``n + 1``.
    """
    N = len(sentences)
    L = 1 + max((len(s) for s in sentences), default=0)
    x = torch.full((N, L), pad_id, dtype=torch.int64)
    y = torch.full((N, L), pad_id, dtype=torch.int64)
    lengths = torch.zeros(N, dtype=torch.int64)
    for i, s in enumerate(sentences):
        n = len(s)
        t = torch.as_tensor(list(s), dtype=torch.int64)
        x[i, 0] = sos_id
        x[i, 1:n + 1] = t
        y[i, :n] = t
        y[i, n] = eos_id
        lengths[i] = n + 1
    return x, y, lengths


__all__ = [
    "BLK", "SOS_EOS", "UNK", "SPECIAL_SYMBOLS", "PAD_ID", "SOS_ID", "EOS_ID", "UNK_ID",
    "read_sentences", "EncodedText", "Tokenizer", "WordTokenizer", "BpeTokenizer",
    "tokenizer_from_dict", "build_vocab", "train_bpe", "make_batches", "pad_batch",
]
