#!/usr/bin/env bash
# AN4 (CMU census database): hybrid LF-MMI TDNN-F on CPU.
#
# Data: the CMU Sphinx AN4 distribution (etc/ + wav/; 948 training utterances from 74
# speakers, 0.71 h; letters, digits, numbers, commands). Give its location with --corpus-dir,
# or pass --download true to fetch it (64 MB from CMU) into --corpus-dir. 8 training speakers
# (4 f + 4 m) are held out as a speaker-disjoint dev set; the official test part (130
# utterances, 10 speakers) is decoded too when the corpus folder has it.
#
# Stages: 0 manifests (+ lexicon from etc/an4.dic), 1 fbank (80-dim, lhotse; optional
# 0.9/1.1 speed perturbation), 2 lang dir (chain 2-state topology, optional silence),
# 3 word trigram from the training transcripts + HLG, 4 LF-MMI training of TDNN-F (small
# preset, phone-LM denominator, leaky HMM), 5 decoding (HLG 1-best), 6 scoring,
# 7 compression runs of the acoustic model (k2quant compress; --compress-runs), 8 their report
# table (exp/compress/report.md + .json; and each run's MAPSSWE by k2quant and by NIST sc_stats
# on the same hypotheses, exp/compress/significance/), 9 Transformer word LM on the training transcripts
# (or --lm-text), 10 its ~2-bit compression (k2quant compress-lm), 11 dev lattices of the fp32
# AM and of the compressed AM (--system-am, decoded from its .k2q) and n-best rescoring of both
# with the fp32 and the compressed LM, 12 the AM+LM system table (exp/rescore/systems.md).
#
# Usage: egs/an4/ASR/run.sh --corpus-dir /path/to/an4 [--stage N] [--stop-stage N] ...
#        egs/an4/ASR/run.sh --corpus-dir download/an4 --download true
#
# Results (dev = 8 held-out training speakers, 104 utterances, 639 words; train 844 utterances,
# 0.62 h; fp32 TDNN-F small, 2.4M params, den phone bigram, word trigram, lm scale 1.0,
# max-duration 50 s, Adam 3e-3 -> 3e-4, epoch N avg 2):
#   | epochs | augmentation               | train time (2 cores)        | dev WER (%)     |
#   |--------|----------------------------|-----------------------------|-----------------|
#   | 20     | none (recipe default)      | 27-40 s/epoch, ~11 min      | 7.20 [46/639]   |
#   | 6      | none                       | 22 s/epoch quiet            | 11.89 [76/639]  |
#   | 6      | SpecAugment + frame shifts | 25.6 min (loaded machine)   | 21.44 (underfits)|
#
# Stage 8 (exp/compress/report.md; fp32 7.20%; QAT 2 epochs; 1 thread per run, two runs at a
# time): ratio = 4 x fp32 params / bytes of model.k2q; p = one-sided MAPSSWE vs fp32.
#   | run               | avg bits | bytes     | ratio  | WER  | p     |  | run          | bits | ratio  | WER  |
#   | uniform8          | 8.00     | 2,512,218 | 3.83x  | 6.73 | 0.73  |  | hessian-r8   | 3.64 | 8.00x  | 7.20 |
#   | uniform4          | 4.00     | 1,311,199 | 7.35x  | 6.89 | 0.65  |  | kl-r8        | 3.63 | 8.02x  | 6.57 |
#   | uniform3          | 3.00     | 1,010,931 | 9.53x  | 7.04 | 0.58  |  | nas-r8       | 3.63 | 8.02x  | 6.26 |
#   | hessian-u3size    | 2.97     | 1,000,885 | 9.62x  | 7.20 | 0.50  |  | kl-u3size    | 3.00 | 9.54x  | 8.14 |
#   | uniform2          | 2.00     |   710,701 | 13.55x | 7.82 | 0.32  |  | kl-u2size    | 1.99 | 13.59x | 7.51 |
#   | hessian-u2size    | 2.00     |   710,046 | 13.57x | 7.67 | 0.30  |  | nas-u2size   | 1.98 | 13.65x | 7.67 |
#   | hessian-sub-r12.5 | 3.00     |   770,308 | 12.51x | 6.26 | 0.84  |  | (1.77M params)              |
#   | hessian-sub-r16   | 2.60     |   601,820 | 16.01x | 6.42 | 0.82  |  | (1.52M params)              |
# All lossless. One run: 67-330 s (hessian sensitivity on 100 utterances ~150 s, cached per method;
# QAT 30-85 s/epoch at 1 thread; nas ~270 s).
# Stage 12 (exp/rescore/systems.md; n-best 100 paths, ngram scale 1, every system scored at the
# fp32 system's best LM scale, 1.0; LM 409k params, ppl 16.62; kl-r12: 2.15 bits, ppl 16.52;
# kl-r16: 1.50 bits, ppl 16.90):
#   | AM + LM                     | AM+LM bytes | ratio  | 1-best | rescored | p MAPSSWE | utt/s |
#   |-----------------------------|-------------|--------|--------|----------|-----------|-------|
#   | fp32 + fp32                 | 11,271,336  | 1.00x  | 7.20   | 5.95     | -         | 16.7  |
#   | fp32 + kl-r12 (12.1x)       |  9,768,271  | 1.15x  | 7.20   | 6.10     | 0.16      | 18.3  |
#   | hessian-sub-r16 + fp32      |  2,240,104  | 5.03x  | 6.42   | 6.57     | 0.14      | 24.6  |
#   | hessian-sub-r16 + kl-r12    |    737,039  | 15.29x | 6.42   | 6.42     | 0.20      | 23.8  |
#   | hessian-sub-r16 + kl-r16    |    704,059  | 16.01x | 6.42   | 6.26     | 0.31      | 27.2  |
# (the last row: --lm-ratio 16, then 'k2quant report --systems' over the six rescoring dirs.)
# Integer-only int8 engine (k2quant average-checkpoints --epoch 20 --avg 2; k2quant calibrate
# --zero-shot | --cuts train (300 utts); k2quant decode-int --baseline-errors the fp32 per_utt):
# zero-shot 7.20% (exact dyadic) / 7.36% (qtensor, p 0.16), real-data 7.20% / 7.20%, fp32 7.20%.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
top=$(cd ../../.. && pwd)
. "$top/local/common.sh"

stage=0
stop_stage=100
corpus_dir=download/an4   # extracted AN4 (holding etc/ and wav/)
download=false            # true: fetch AN4 into --corpus-dir if it is not there
num_dev_speakers=8
num_dev2_speakers=8       # dev2: 8 more held-out speakers, never used for tuning
speed_perturb=false
num_jobs=1
num_threads=2
model_preset=small    # TDNN-F, 2.4M parameters with AN4's 69 pdfs
model_config=
num_epochs=20
max_duration=50       # seconds of audio per batch (small batches: more updates on 0.6 h)
lr=0.003
final_lr=0.0003
warmup_steps=30
den_lm_order=2
lm_order=3
lm_scale=1.0
spec_augment=false    # SpecAugment (2 freq + 2 time masks) in training
frame_shift_augment=false # Kaldi chain-style random 0..2 frame shift per utterance
avg=2
seed=42
data_dir=data
exp_dir=exp
. "$top/local/compression_options.sh"  # defaults of the stage 7-12 options
# The default covers the acceptance rows (>= 8x at <= 4 bits, mixed vs uniform at the 2-bit
# size, subspace >= 12x, and the 16x AM of the AM+LM system): measured 163 + 132 + 326 + 68 +
# 67 s = 12.6 min of 1-thread runs on 2 cores; --compress-runs "$compress_runs_full" gives the
# issue's full table (~35 min).
compress_runs="uniform2 hessian-r8 hessian-u2size hessian-sub-r12.5 hessian-sub-r16"
compress_runs_full="uniform8 uniform4 uniform3 uniform2 hessian-r8 kl-r8 nas-r8 hessian-u3size kl-u3size hessian-u2size kl-u2size nas-u2size hessian-sub-r12.5 hessian-sub-r16"
system_am=hessian-sub-r16    # the compressed AM of the AM+LM system (a --compress-runs name)

help_message="Usage: $0 --corpus-dir DIR [options]
  --corpus-dir DIR [$corpus_dir]  extracted AN4 corpus (etc/, wav/)
  --download true|false [$download]  download AN4 into --corpus-dir first
  --stage N / --stop-stage N   run stages N..M (0 manifests, 1 fbank, 2 lang, 3 word LM + HLG,
                               4 train, 5 decode, 6 score, 7 compress AM, 8 compression report,
                               9 Transformer LM, 10 compress LM, 11 lattices + rescoring,
                               12 AM+LM system table)
$(compression_help)
  --num-epochs N [$num_epochs]  --max-duration S [$max_duration]  --speed-perturb B [$speed_perturb]
  --model-preset P [$model_preset]  --model-config JSON  --lr X [$lr]  --avg K [$avg]
  --num-threads N [$num_threads]  --data-dir DIR [$data_dir]  --exp-dir DIR [$exp_dir]"
. "$top/local/parse_options.sh"

find_k2quant
find_lhotse
log "k2quant: $k2quant; stages $stage..$stop_stage; corpus $corpus_dir"

manifests=$data_dir/manifests
fbank=$data_dir/fbank
lang=$data_dir/lang
lm=$data_dir/lm

if run_stage 0 "AN4 manifests and lexicon from $corpus_dir into $manifests" "$manifests/.stage0.done"; then
  download_flag=()
  if [ "$download" = true ]; then
    download_flag=(--download)
  elif [ ! -d "$corpus_dir/etc" ]; then
    die "AN4 corpus not found at '$corpus_dir' (expected $corpus_dir/etc and $corpus_dir/wav). Pass --corpus-dir /path/to/an4, or --download true to fetch it (64 MB) into --corpus-dir."
  fi
  "$k2quant" prepare-an4 --corpus-dir "$corpus_dir" --output-dir "$manifests" \
    --num-dev-speakers "$num_dev_speakers" --num-dev2-speakers "$num_dev2_speakers" \
    "${download_flag[@]+"${download_flag[@]}"}"
  mark_done "$manifests/.stage0.done"
fi

if run_stage 1 "80-dim fbank (speed perturbation: $speed_perturb) into $fbank" "$fbank/.stage1.done"; then
  sp_flag=--no-speed-perturb
  [ "$speed_perturb" = true ] && sp_flag=--speed-perturb
  "$k2quant" compute-fbank --manifest-dir "$manifests" --prefix an4 --output-dir "$fbank" \
    --num-jobs "$num_jobs" "$sp_flag"
  mark_done "$fbank/.stage1.done"
fi

if run_stage 2 "Lang dir $lang (chain topology, optional silence) and the ${den_lm_order}-gram phone LM of the denominator graph" "$lang/.stage2.done"; then
  "$k2quant" prepare-lang --lexicon "$manifests/an4_lexicon.txt" --lang-dir "$lang" \
    --topo chain --sil-phone SIL
  # training transcripts as a Kaldi text file (utt-id words...)
  "$lhotse" kaldi export "$manifests/an4_recordings_train.jsonl.gz" \
    "$manifests/an4_supervisions_train.jsonl.gz" "$data_dir/kaldi/train"
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
    --train-cuts "$fbank/cuts_train.jsonl.gz" --valid-cuts "$fbank/cuts_dev.jsonl.gz" \
    --model-preset "$model_preset" ${model_config:+--model-config "$model_config"} \
    --num-epochs "$num_epochs" --max-duration "$max_duration" --lr "$lr" --final-lr "$final_lr" \
    --warmup-steps "$warmup_steps" --den-lm-order "$den_lm_order" --seed "$seed" \
    --num-threads "$num_threads" --device cpu "${aug_flags[@]}"
  mark_done "$exp_dir/.stage4.done"
fi

splits=dev
[ -f "$fbank/cuts_dev2.jsonl.gz" ] && splits="$splits dev2"
[ -f "$fbank/cuts_test.jsonl.gz" ] && splits="$splits test"
if run_stage 5 "Decode $splits (epoch $num_epochs, avg $avg, HLG 1-best)"; then
  for split in $splits; do
    tag=$split-epoch-$num_epochs-avg-$avg
    if [ -f "$exp_dir/decode/.stage5.$tag.done" ]; then
      log "  $tag already decoded"; continue
    fi
    "$k2quant" decode --exp-dir "$exp_dir" --epoch "$num_epochs" --avg "$avg" --lang-dir "$lang" \
      --cuts "$fbank/cuts_$split.jsonl.gz" --out-dir "$exp_dir/decode" --lm-scale "$lm_scale" \
      --tag "$tag" --num-threads "$num_threads" --device cpu
    mark_done "$exp_dir/decode/.stage5.$tag.done"
  done
fi

if run_stage 6 "Score $splits"; then
  for split in $splits; do
    tag=$split-epoch-$num_epochs-avg-$avg
    "$k2quant" score --ref "$exp_dir/decode/ref-$tag.txt" --hyp "$exp_dir/decode/hyps-$tag.txt" \
      --out-dir "$exp_dir/decode" --name "$tag-final" | tee "$exp_dir/decode/WER-$tag.txt"
    log "AN4 $split WER ($tag): $(cat "$exp_dir/decode/WER-$tag.txt")"
  done
fi

# ---------------------------------------------------------------------------------------------
# Stages 7-12 (local/compression_stages.sh): AM compression + report, LM training and
# compression, n-best rescoring with the fp32 and the compressed LM, summary.
# ---------------------------------------------------------------------------------------------
corpus=an4
eval_split=dev
corpus_title="AN4 dev"
. "$top/local/compression_stages.sh"

# Significance of every compression run against fp32 on the same hypotheses: k2quant's MAPSSWE
# (NIST segments, as sc_stats; utterance segments) and bootstrap, and NIST sclite + sc_stats
# when SCTK is installed (tools/install.sh --with-sctk); exp/compress/significance/NAME.
if run_stage 8 "MAPSSWE (k2quant and sc_stats) and bootstrap of each run vs fp32"; then
  sclite_flag=--no-sclite
  { command -v sclite >/dev/null || [ -x /usr/lib/sctk/bin/sclite ]; } && sclite_flag=--sclite
  for name in $compress_runs; do
    hyp=$cdir/$name/decode/hyps-compressed.txt
    [ -f "$hyp" ] && [ -f "$cdir/fp32/hyps-fp32.txt" ] || continue
    mkdir -p "$cdir/significance"
    "$k2quant" compare-systems --ref "$cdir/fp32/ref-fp32.txt" --hyp-a "$cdir/fp32/hyps-fp32.txt" \
      --hyp-b "$hyp" "$sclite_flag" --out-dir "$cdir/significance/$name" \
      | tee "$cdir/significance/$name.txt"
  done
fi
log "done in $(elapsed) s"
