"""``k2quant prepare-lang``: lexicon -> lang dir (phones/words/tokens, L, L_disambig, lang.json).

Thin wrapper of :func:`k2quant.lang.prepare_lang`. A finished lang dir is a no-op: if
``lang.json`` records the same options and is newer than the lexicon, nothing is redone
(``--force`` redoes it).
"""
import json
import logging
from pathlib import Path

import click


@click.command()
@click.option("--lexicon", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Kaldi lexicon(p).txt or CMU Sphinx .dic (alternates WORD(2)).")
@click.option("--lang-dir", required=True, type=click.Path(file_okay=False), help="Output dir.")
@click.option("--topo", type=click.Choice(["chain", "ctc"]), default="chain", show_default=True,
              help="chain: 2 pdfs per phone (num_pdfs=2P+1); ctc: blank + phones (P+1).")
@click.option("--position-marks/--no-position-marks", default=False, show_default=True,
              help="Word-position dependent phones (_B _E _I _S).")
@click.option("--sil-phone", default=None, help="Optional silence phone, e.g. SIL.")
@click.option("--sil-prob", default=0.5, show_default=True, type=float,
              help="Probability of optional silence between words (with --sil-phone).")
@click.option("--oov-word", default="<UNK>", show_default=True)
@click.option("--oov-phone", default="SPN", show_default=True,
              help="Phone of the OOV word if the lexicon has no entry for it.")
@click.option("--silence-phone", "silence_phones", multiple=True,
              help="Extra phones without position marks (repeatable).")
@click.option("--force", is_flag=True, help="Redo even if the lang dir is up to date.")
def main(lexicon, lang_dir, topo, position_marks, sil_phone, sil_prob, oov_word, oov_phone,
         silence_phones, force):
    """Prepare an icefall-style lang dir from a pronunciation lexicon."""
    from k2quant.lang import prepare_lang
    from k2quant.utils.io import atomic_write_json

    log = logging.getLogger("k2quant.prepare_lang")
    args = dict(lexicon=str(Path(lexicon).resolve()), topo=topo, position_marks=position_marks,
                sil_phone=sil_phone, sil_prob=sil_prob, oov_word=oov_word, oov_phone=oov_phone,
                silence_phones=sorted(silence_phones))
    cfg_path = Path(lang_dir) / "lang.json"
    up_to_date = cfg_path.is_file() and cfg_path.stat().st_mtime >= Path(lexicon).stat().st_mtime
    if not force and up_to_date:
        with open(cfg_path, encoding="utf-8") as f:
            if json.load(f).get("prepare_args") == args:
                log.info("%s is up to date; skipping (use --force to redo)", lang_dir)
                return
    log.info("prepare-lang %s", args)
    prepare_lang(lexicon, lang_dir, topo=topo, position_marks=position_marks, sil_phone=sil_phone,
                 sil_prob=sil_prob, oov_word=oov_word, oov_phone=oov_phone,
                 silence_phones=silence_phones)
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["prepare_args"] = args
    atomic_write_json(cfg_path, cfg)
