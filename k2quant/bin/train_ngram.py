"""``k2quant train-ngram``: estimate an n-gram LM (interpolated Kneser-Ney / Witten-Bell) to ARPA.

Thin wrapper of :func:`k2quant.lm.ngram.train_ngram`. Word LM::

    k2quant train-ngram --text data/train/text --skip-first-field --order 3 \\
        --vocab data/lang/words.txt --out data/lm/G_3gram.arpa

Phone LM for the LF-MMI denominator (words -> first pronunciation, optional silence)::

    k2quant train-ngram --text data/train/text --skip-first-field --order 2 \\
        --phones-from-lang data/lang --out data/lang/P_2gram.arpa
"""
import logging

import click

_SPECIAL = {"<eps>", "#0", "<s>", "</s>"}


def _read_vocab(path):
    """One word per line, or a symbol table (``word id``); special symbols dropped."""
    words = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            if fields and fields[0] not in _SPECIAL:
                words.append(fields[0])
    return words


@click.command()
@click.option("--text", "texts", required=True, multiple=True,
              type=click.Path(exists=True, dir_okay=False),
              help="Training text, one sentence per line (repeatable).")
@click.option("--order", required=True, type=int, help="N-gram order.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output ARPA file.")
@click.option("--method", type=click.Choice(["kneser_ney", "witten_bell"]), default="kneser_ney",
              show_default=True)
@click.option("--vocab", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Vocabulary (one word per line or words.txt); others map to --unk.")
@click.option("--unk", default="<UNK>", show_default=True)
@click.option("--skip-first-field", is_flag=True, help="Lines start with an utterance id.")
@click.option("--phones-from-lang", default=None, type=click.Path(exists=True, file_okay=False),
              help="Convert words to phones with this lang dir (phone LM for the den graph).")
@click.option("--sil-prob", default=None, type=float,
              help="With --phones-from-lang: silence insertion probability (default: lang's).")
def main(texts, order, out, method, vocab, unk, skip_first_field, phones_from_lang, sil_prob):
    """Estimate an n-gram language model and write it in ARPA format."""
    from k2quant.lm.ngram import read_sentences, train_ngram

    log = logging.getLogger("k2quant.train_ngram")
    sents = []
    for t in texts:
        sents.extend(read_sentences(t, skip_first_field=skip_first_field))
    if phones_from_lang:
        from k2quant.lang import Lang
        from k2quant.training.graph_compiler import phone_lm_sentences

        lang = Lang(phones_from_lang)
        sents, n_oov = phone_lm_sentences(lang, (" ".join(s) for s in sents), sil_prob=sil_prob)
        if n_oov:
            log.warning("%d OOV words mapped to %s", n_oov, lang.oov)
        vocab_words = lang.phones.symbols[1:lang.num_phones + 1]
        train_ngram(sents, order, out, method=method, vocab=vocab_words, unk=None)
    else:
        vocab_words = _read_vocab(vocab) if vocab else None
        train_ngram(sents, order, out, method=method, vocab=vocab_words, unk=unk)
    log.info("wrote %d-gram %s LM of %d sentences to %s", order, method, len(sents), out)
