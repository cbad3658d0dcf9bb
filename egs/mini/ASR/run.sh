#!/usr/bin/env bash
# mini: the embedded default recipe (what `make demo` runs).
#
# Synthesises an AN4-style corpus offline with eSpeak NG (k2quant.data.mini: spelled letters,
# digits, numbers, dates, commands; 600 train / 150 test utterances; the test voices are never
# heard in training), then trains and decodes a hybrid LF-MMI system:
#   fbank (80-dim, lhotse) -> lang (chain 2-state topology, silence) -> word trigram + HLG ->
#   TDNN-F "small" preset trained with LF-MMI (phone-LM denominator) -> 1-best HLG decoding ->
#   WER on the unseen-voice test set.
# Everything runs on CPU; budget: under 10 minutes on 2 cores, everything included.
# Stages 7-12 (off by default: --stop-stage 6, which is what `make demo` runs) are those of the
# AN4 recipe: 7 AM compression runs (--compress-runs), 8 their report table, 9 Transformer
# word LM on the training transcripts (or --lm-text), 10 its ~2-bit compression, 11 test
# lattices of the fp32 AM and of the compressed AM (--system-am) + n-best rescoring with the
# fp32 and the compressed LM, 12 the AM+LM system table (exp/rescore/systems.md: sizes, ratio
# vs the fp32 system, WER, p-values). Run them with --stage 7 --stop-stage 12.
#
# Usage: egs/mini/ASR/run.sh [--stage N] [--stop-stage N] [--num-epochs N] ...   (see --help)
# Outputs: data/ (manifests, fbank, lang, lm), exp/ (checkpoints, logs, decode/), relative to
# this directory.
#
# Results (test = 150 utterances, 8 unseen voices, 822 words; fp32; 2 CPU threads on a machine
# shared with other jobs, so times are as measured under that load):
#   | model                          | params | epochs | train time | test WER (%)   | make demo wall |
#   |--------------------------------|--------|--------|------------|----------------|----------------|
#   | TDNN-F small, hidden 256/bn 64 | 0.79M  | 6      | 3.0 min    | 1.95 [16/822]  | 3.4 min (load ~2-3) |
#   | same, earlier run              | 0.79M  | 6      | 5.5 min    | 2.80 [23/822]  | 6.3 min (load ~4-5) |
# Epoch 1 costs most (97 s: the LF-MMI denominator lattice of an untrained, flat network is
# large); later epochs take ~11 s on a quiet machine. Last epoch, no averaging, lm scale 1.0,
# den phone bigram, word trigram, frame-shift augmentation.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
top=$(cd ../../.. && pwd)
. "$top/local/common.sh"

stage=0
stop_stage=6          # the demo: fp32 train + decode + WER; stages 7-12 on request
num_train=600         # utterances to synthesise for training
num_test=150          # test utterances (unseen voices)
corpus_seed=0
small=false           # true: the 48 + 12 utterance smoke corpus of the test suite
num_jobs=1            # feature extraction workers
num_threads=2         # torch threads for training/decoding
model_preset=small
# the small preset slimmed down to ~0.8M parameters so that the whole demo fits in 10 minutes
model_config='{"hidden_dim": 256, "bottleneck_dims": 64, "prefinal_bottleneck": 128}'
num_epochs=6
max_duration=50       # seconds of audio per batch
lr=0.003
final_lr=0.0003
warmup_steps=30
den_lm_order=2        # phone n-gram of the denominator graph
lm_order=3            # word n-gram of HLG
lm_scale=1.0
spec_augment=false    # SpecAugment (2 freq + 2 time masks) in training
frame_shift_augment=true  # Kaldi chain-style random 0..2 frame shift per utterance
avg=1
seed=42
data_dir=data
exp_dir=exp
. "$top/local/compression_options.sh"  # defaults of the stage 7-12 options
# Default: a few minutes per run on 2 cores; --compress-runs "$compress_runs_full": the full table.
compress_runs="uniform2 hessian-u2size hessian-sub-r12.5"
compress_runs_full="uniform8 uniform4 uniform3 uniform2 hessian-r8 kl-r8 nas-r8 hessian-u2size kl-u2size nas-u2size hessian-sub-r12.5"
system_am=hessian-sub-r12.5  # the compressed AM of the AM+LM system (a --compress-runs name)

help_message="Usage: $0 [options]
  --stage N / --stop-stage N   run stages N..M [0..6] (0 corpus, 1 fbank, 2 lang,
                               3 word LM + HLG, 4 train, 5 decode, 6 score, 7 compress AM,
                               8 compression report, 9 Transformer LM, 10 compress LM,
                               11 lattices + rescoring, 12 AM+LM system table)
$(compression_help)
  --num-train N --num-test N   corpus size [600 / 150]    --small true   smoke-test corpus
  --num-epochs N [$num_epochs]  --max-duration S [$max_duration]  --model-preset P [$model_preset]
  --num-threads N [$num_threads] --num-jobs N [$num_jobs] --lm-scale X [$lm_scale] --avg K [$avg]
  --data-dir DIR [$data_dir]   --exp-dir DIR [$exp_dir]"
. "$top/local/parse_options.sh"

find_k2quant
find_lhotse
log "k2quant: $k2quant; stages $stage..$stop_stage; data $data_dir, exp $exp_dir"

manifests=$data_dir/manifests
fbank=$data_dir/fbank
lang=$data_dir/lang
lm=$data_dir/lm
small_flag=()
[ "$small" = true ] && small_flag=(--small)
size_flags=()
[ "$small" = true ] || size_flags=(--num-train "$num_train" --num-test "$num_test")

if run_stage 0 "Synthesise the mini corpus (eSpeak NG) into $manifests" "$manifests/.stage0.done"; then
  "$k2quant" prepare-mini --output-dir "$manifests" --seed "$corpus_seed" \
    "${small_flag[@]+"${small_flag[@]}"}" "${size_flags[@]+"${size_flags[@]}"}"
  mark_done "$manifests/.stage0.done"
fi

if run_stage 1 "Compute 80-dim fbank features into $fbank" "$fbank/.stage1.done"; then
  "$k2quant" compute-fbank --manifest-dir "$manifests" --prefix mini --output-dir "$fbank" \
    --num-jobs "$num_jobs"
  mark_done "$fbank/.stage1.done"
fi

if run_stage 2 "Lang dir $lang (chain topology, optional silence) and the ${den_lm_order}-gram phone LM of the denominator graph" "$lang/.stage2.done"; then
  "$k2quant" prepare-lang --lexicon "$manifests/mini_lexicon.txt" --lang-dir "$lang" \
    --topo chain --sil-phone SIL
  # training transcripts as a Kaldi text file (utt-id words...)
  "$lhotse" kaldi export "$manifests/mini_recordings_train.jsonl.gz" \
    "$manifests/mini_supervisions_train.jsonl.gz" "$data_dir/kaldi/train"
  "$k2quant" train-ngram --text "$data_dir/kaldi/train/text" --skip-first-field \
    --order "$den_lm_order" --phones-from-lang "$lang" --out "$lang/P_${den_lm_order}gram.arpa"
  mark_done "$lang/.stage2.done"
fi

if run_stage 3 "Word ${lm_order}-gram LM from the training transcripts, and HLG" "$lang/.stage3.done"; then
  "$k2quant" train-ngram --text "$data_dir/kaldi/train/text" --skip-first-field \
    --order "$lm_order" --vocab "$lang/words.txt" --out "$lm/G_${lm_order}_gram.arpa"
  "$k2quant" compile-hlg --lang-dir "$lang" --lm "$lm/G_${lm_order}_gram.arpa" --force
  mark_done "$lang/.stage3.done"
fi

aug_flags=(--no-spec-augment --frame-shift-augment)
[ "$spec_augment" = true ] && aug_flags[0]=--spec-augment
[ "$frame_shift_augment" = true ] || aug_flags[1]=--no-frame-shift-augment
if run_stage 4 "Train TDNN-F ($model_preset) with LF-MMI for $num_epochs epochs" "$exp_dir/.stage4.done"; then
  "$k2quant" train --exp-dir "$exp_dir" --lang-dir "$lang" \
    --train-cuts "$fbank/cuts_train.jsonl.gz" --valid-cuts "$fbank/cuts_test.jsonl.gz" \
    --model-preset "$model_preset" ${model_config:+--model-config "$model_config"} \
    --num-epochs "$num_epochs" --max-duration "$max_duration" --lr "$lr" --final-lr "$final_lr" \
    --warmup-steps "$warmup_steps" --den-lm-order "$den_lm_order" --seed "$seed" \
    --num-threads "$num_threads" --device cpu "${aug_flags[@]}"
  mark_done "$exp_dir/.stage4.done"
fi

tag=test-epoch-$num_epochs-avg-$avg
if run_stage 5 "Decode the test set (epoch $num_epochs, avg $avg, HLG 1-best)" "$exp_dir/decode/.stage5.$tag.done"; then
  "$k2quant" decode --exp-dir "$exp_dir" --epoch "$num_epochs" --avg "$avg" --lang-dir "$lang" \
    --cuts "$fbank/cuts_test.jsonl.gz" --out-dir "$exp_dir/decode" --lm-scale "$lm_scale" \
    --tag "$tag" --num-threads "$num_threads" --device cpu
  mark_done "$exp_dir/decode/.stage5.$tag.done"
fi

if run_stage 6 "Score the test hypotheses"; then
  "$k2quant" score --ref "$exp_dir/decode/ref-$tag.txt" \
    --hyp "$exp_dir/decode/hyps-$tag.txt" --out-dir "$exp_dir/decode" \
    --name "$tag-final" | tee "$exp_dir/decode/WER-$tag.txt"
  log "mini test WER ($tag, lm scale $lm_scale): $(cat "$exp_dir/decode/WER-$tag.txt")"
fi

# ---------------------------------------------------------------------------------------------
# Stages 7-12 (local/compression_stages.sh): AM compression + report, LM training and
# compression, n-best rescoring with the fp32 and the compressed LM, summary.
# ---------------------------------------------------------------------------------------------
corpus=mini
eval_split=test
corpus_title="mini test"
. "$top/local/compression_stages.sh"
log "done in $(elapsed) s"
