"""``k2quant train-lm``: train the Transformer LM on a text file, with held-out perplexity.

Examples::

    k2quant train-lm --train-text data/lm/train.txt --valid-text data/lm/dev.txt \\
        --exp-dir exp/lm --num-epochs 20
    k2quant train-lm ... --unit bpe --bpe-vocab-size 200 --text-format kaldi
    k2quant train-lm ... --num-epochs 30 --start-epoch 21     # resume from epoch-20.pt

Writes ``EXP_DIR/epoch-N.pt`` (usable with ``k2quant eval-lm --lm`` and ``k2quant rescore
--lm``), ``EXP_DIR/tokenizer.json``, ``EXP_DIR/lm-history.json`` and
``EXP_DIR/log/log-train-lm.txt`` (see :mod:`k2quant.lm.train`).
"""
import click

from k2quant.bin.common import num_threads_option


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--train-text", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Training text, one sentence per line.")
@click.option("--valid-text", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Held-out text for the per-epoch perplexity.")
@click.option("--exp-dir", required=True, type=click.Path(file_okay=False),
              help="Output directory (checkpoints, tokenizer, logs).")
@click.option("--unit", type=click.Choice(["word", "bpe"]), default="word", show_default=True)
@click.option("--text-format", type=click.Choice(["plain", "kaldi"]), default="plain",
              show_default=True, help="kaldi: the first field of each line is an utterance id.")
@click.option("--bpe-vocab-size", default=200, show_default=True, type=int,
              help="Pieces of the sentencepiece model (with --unit bpe).")
@click.option("--min-count", default=1, show_default=True, type=int,
              help="Words seen fewer times become <unk> (--unit word).")
@click.option("--preset", type=click.Choice(["small", "paper"]), default="small",
              show_default=True, help="small: 2x128, 4 heads; paper: 6x512, 8 heads.")
@click.option("--num-layers", type=int, default=None, help="Override the preset.")
@click.option("--d-model", type=int, default=None, help="Override the preset.")
@click.option("--num-heads", type=int, default=None, help="Override the preset.")
@click.option("--dim-feedforward", type=int, default=None, help="Override the preset.")
@click.option("--dropout", type=float, default=None, help="Override the preset.")
@click.option("--num-epochs", default=20, show_default=True, type=int)
@click.option("--start-epoch", default=1, show_default=True, type=int,
              help="Resume from EXP_DIR/epoch-(N-1).pt.")
@click.option("--lr", default=1e-3, show_default=True, type=float, help="Peak learning rate.")
@click.option("--warmup-steps", default=100, show_default=True, type=int)
@click.option("--max-tokens", default=500, show_default=True, type=int,
              help="Padded tokens per batch.")
@click.option("--grad-clip", default=5.0, show_default=True, type=float)
@click.option("--seed", default=42, show_default=True, type=int)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True)
@num_threads_option
def main(train_text, valid_text, exp_dir, unit, text_format, bpe_vocab_size, min_count, preset,
         num_layers, d_model, num_heads, dim_feedforward, dropout, num_epochs, start_epoch, lr,
         warmup_steps, max_tokens, grad_clip, seed, device, num_threads):
    """Train a Transformer LM on TRAIN_TEXT; report perplexity on VALID_TEXT after each epoch."""
    from k2quant.lm.train import LmTrainConfig, train_lm

    cfg = LmTrainConfig(
        train_text=train_text, valid_text=valid_text, exp_dir=exp_dir, unit=unit,
        text_format=text_format, bpe_vocab_size=bpe_vocab_size, min_count=min_count,
        preset=preset, num_layers=num_layers, d_model=d_model, num_heads=num_heads,
        dim_feedforward=dim_feedforward, dropout=dropout, num_epochs=num_epochs,
        start_epoch=start_epoch, lr=lr, warmup_steps=warmup_steps, max_tokens=max_tokens,
        grad_clip=grad_clip, seed=seed, device=device, num_threads=num_threads,
    )
    try:
        history = train_lm(cfg)
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    for h in history:
        click.echo(f"epoch {h['epoch']}: train ppl {h['train_ppl']:.2f}, "
                   f"valid ppl {h['valid_ppl']:.2f}")
