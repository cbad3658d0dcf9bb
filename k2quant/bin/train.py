"""``k2quant train``: LF-MMI training of a TDNN-F acoustic model (icefall-style flags).

Examples::

    k2quant train --exp-dir exp --lang-dir data/lang --train-cuts data/fbank/cuts_train.jsonl.gz \\
        --valid-cuts data/fbank/cuts_dev.jsonl.gz --num-epochs 6 --max-duration 200
    k2quant train ... --start-epoch 4            # resume from exp/epoch-3.pt (bit-exact)
    k2quant train ... --world-size 4             # DDP (nccl on GPUs, gloo on CPU)

See :mod:`k2quant.training.train` for what an epoch does and what a checkpoint holds.
"""
import dataclasses

import click

_HELP = {
    "exp_dir": "Output directory: checkpoints epoch-N.pt, log/, tensorboard/.",
    "lang_dir": "Lang dir from 'k2quant prepare-lang' (lang.json, phone LM for the den graph).",
    "train_cuts": "Training CutSet with features (cuts_train.jsonl.gz).",
    "valid_cuts": "Validation CutSet (loss only), e.g. cuts_dev.jsonl.gz.",
    "num_epochs": "Train epochs 1..N.",
    "start_epoch": "Resume from exp-dir/epoch-(N-1).pt when N > 1.",
    "world_size": "Number of DDP processes (GPUs, or CPU processes with gloo).",
    "seed": "Random seed (model init, dropout, batch shuffling).",
    "device": "auto | cpu | cuda.",
    "num_threads": "torch intra-op threads per process (0: torch's default).",
    "master_port": "TCP port for DDP rendezvous on localhost.",
    "max_duration": "Seconds of audio per batch (per process).",
    "num_buckets": "Duration buckets of the dynamic bucketing sampler.",
    "utt_cmn": "Subtract each utterance's mean feature vector.",
    "frame_shift_augment": "Drop 0..subsampling_factor-1 leading frames at random (Kaldi's chain frame shifts).",
    "spec_augment": "SpecAugment the training features (2 freq masks <= 15 bins, 2 time masks <= 20 frames).",
    "model_preset": "TDNN-F preset (k2quant.models.tdnnf.get_preset): small, kaldi_7q, ...",
    "model_config": "JSON file: a full model spec {arch, config} or config fields overriding the preset.",
    "feat_dim": "Feature dimension (80 for k2quant's fbank).",
    "optimizer": "adam | sgd.",
    "lr": "Peak learning rate (after warm-up).",
    "final_lr": "Learning rate at the end of training (exponential schedule).",
    "lr_schedule": "exp (Kaldi-style exponential decay lr -> final-lr) | noam.",
    "warmup_steps": "Linear warm-up steps.",
    "momentum": "SGD momentum.",
    "weight_decay": "L2 weight decay.",
    "grad_clip": "Clip the gradient norm to this (0: off).",
    "orthonormal_every": "Apply the semi-orthogonal constraint every K steps (0: never).",
    "xent_regularize": "Weight of the cross-entropy regulariser (Kaldi 0.1); 0 disables it.",
    "den_scale": "Scale of the denominator term of LF-MMI.",
    "leaky_hmm": "Leaky-HMM coefficient of the denominator graph (Kaldi 0.1).",
    "den_output_beam": "Output beam of the denominator lattice (smaller is faster, prunes mass).",
    "den_lm_order": "Phone LM order for the denominator graph if the lang dir lacks one.",
    "log_interval": "TensorBoard per-batch scalars every N steps.",
    "tensorboard": "Write TensorBoard logs to exp-dir/tensorboard.",
    "progress_bar": "Show a tqdm progress bar.",
}


def _options(func):
    from k2quant.training.train import TrainConfig

    required = {"exp_dir", "lang_dir", "train_cuts"}
    for f in reversed(dataclasses.fields(TrainConfig)):
        flag = "--" + f.name.replace("_", "-")
        default = None if f.default is dataclasses.MISSING else f.default
        typ = {"int": int, "float": float, "str": str, "bool": bool}.get(
            getattr(f.type, "__name__", str(f.type)), str)
        if typ is bool:
            func = click.option(f"{flag}/--no-{f.name.replace('_', '-')}", f.name,
                                default=default, show_default=True, help=_HELP.get(f.name))(func)
        else:
            func = click.option(flag, f.name, type=typ, default=default,
                                required=f.name in required, show_default=default is not None,
                                help=_HELP.get(f.name))(func)
    return func


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@_options
def main(**kwargs):
    """Train an acoustic model with LF-MMI on lhotse cuts (writes EXP_DIR/epoch-N.pt)."""
    from k2quant.training.train import TrainConfig, train

    cfg = TrainConfig(**kwargs)
    try:
        cfg.validate()
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    hist = train(cfg)
    if hist:
        last = hist[-1]
        msg = f"epoch {last['epoch']}: train loss/frame {last['train_loss_per_frame']:.4f}"
        if "valid_loss_per_frame" in last:
            msg += f", valid loss/frame {last['valid_loss_per_frame']:.4f}"
        click.echo(msg)
