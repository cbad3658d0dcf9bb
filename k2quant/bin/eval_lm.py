"""``k2quant eval-lm``: perplexity of a Transformer LM (checkpoint or packed file) on a text.

Example::

    k2quant eval-lm --lm exp/lm/epoch-10.pt --text data/lm/test.txt
    k2quant eval-lm --lm exp/lm/lm-2bit.k2q --text data/lm/test.txt --json ppl.json

Prints ``ppl``, the number of predicted tokens (words or pieces plus one ``<eos>`` per
sentence) and how many tokens were ``<unk>``; for BPE models also the per-word perplexity.
"""
import click


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--lm", "lm_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="LM checkpoint (train-lm's epoch-N.pt) or packed .k2q file.")
@click.option("--text", "text_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Text to evaluate, one sentence per line.")
@click.option("--text-format", type=click.Choice(["plain", "kaldi"]), default="plain",
              show_default=True, help="kaldi: the first field of each line is an utterance id.")
@click.option("--max-tokens", default=4000, show_default=True, type=int)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False),
              help="Also write the result as JSON here.")
def main(lm_path, text_path, text_format, max_tokens, device, json_out):
    """Print the perplexity of LM on TEXT."""
    from k2quant.lm.train import eval_lm

    try:
        res = eval_lm(lm_path, text_path, text_format=text_format, max_tokens=max_tokens,
                      device=device)
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    if json_out:
        from k2quant.utils.io import atomic_write_json

        atomic_write_json(json_out, res)
    line = (f"ppl {res['ppl']:.3f} over {res['num_tokens']} tokens ({res['num_sentences']} "
            f"sentences, {res['num_words']} words, {res['num_oov']} <unk> tokens)")
    if res["unit"] == "bpe":
        line += f"; word ppl {res['word_ppl']:.3f}"
    click.echo(line)
