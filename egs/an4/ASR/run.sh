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
# preset, phone-LM denominator, leaky HMM), 5 decoding (HLG 1-best), 6 scoring.
#
# Usage: egs/an4/ASR/run.sh --corpus-dir /path/to/an4 [--stage N] [--stop-stage N] ...
#        egs/an4/ASR/run.sh --corpus-dir download/an4 --download true
#
# Results (dev = 8 held-out training speakers, 104 utterances, 639 words; train 844 utterances,
# 0.62 h; fp32; 2 CPU threads on a machine shared with other jobs, load average 4-6, so the
# times are pessimistic: the same epoch took 22 s on a quiet machine and 311 s on a busy one):
#   | model (params)      | epochs | augmentation               | train time | dev WER (%), epoch 6 avg 2 |
#   |---------------------|--------|----------------------------|------------|----------------------------|
#   | TDNN-F small (2.4M) | 6      | none (recipe default)      | 19.4 min   | 11.89 [76/639]             |
#   | TDNN-F small (2.4M) | 6      | SpecAugment + frame shifts | 25.6 min   | 21.44 [137/639] (underfits)|
# Both with den phone bigram, word trigram, lm scale 1.0, max-duration 50 s, Adam 3e-3 -> 3e-4.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
top=$(cd ../../.. && pwd)
. "$top/local/common.sh"

stage=0
stop_stage=100
corpus_dir=download/an4   # extracted AN4 (holding etc/ and wav/)
download=false            # true: fetch AN4 into --corpus-dir if it is not there
num_dev_speakers=8
speed_perturb=false
num_jobs=1
num_threads=2
model_preset=small    # TDNN-F, 2.4M parameters with AN4's 69 pdfs
model_config=
num_epochs=6
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

help_message="Usage: $0 --corpus-dir DIR [options]
  --corpus-dir DIR [$corpus_dir]  extracted AN4 corpus (etc/, wav/)
  --download true|false [$download]  download AN4 into --corpus-dir first
  --stage N / --stop-stage N   run stages N..M (0 manifests, 1 fbank, 2 lang, 3 word LM + HLG,
                               4 train, 5 decode, 6 score)
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
    --num-dev-speakers "$num_dev_speakers" "${download_flag[@]+"${download_flag[@]}"}"
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
[ -f "$fbank/cuts_test.jsonl.gz" ] && splits="dev test"
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
log "done in $(elapsed) s"
