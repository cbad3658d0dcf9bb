#!/usr/bin/env bash
# Switchboard-1 (300 h) LF-MMI TDNN-F: the system of Xu et al., "Towards Green ASR" (Interspeech
# 2022), i.e. Kaldi's swbd/s5c run_tdnn_7q.sh in k2quant form.
#
# NOT RUN HERE: this recipe needs the LDC corpora, which we do not have. It is written to be
# correct by construction (every stage calls the same k2quant/lhotse commands as the AN4 and
# mini recipes, which are run and tested) but it has never been executed end to end.
#
# Data (LDC licences; give the paths as options):
#   --swbd-audio-dir   LDC97S62 (Switchboard-1 Release 2, *.sph, 2-channel 8 kHz)
#   --swbd-trans-dir   swb_ms98_transcriptions (ISIP/MS-98 word transcripts + sw-ms98-dict.text)
#   --eval2000-dir     LDC2002S09 + LDC2002T43 (Hub5'00; eval2000 = swbd + callhome halves)
# Kaldi-compatible choices: the first 4000 training utterances are the dev set (Kaldi's
# train_dev), 8 kHz audio, 40-dim fbank (instead of 40-dim MFCC + i-vectors + LDA), speed
# perturbation 0.9/1.0/1.1, chain 2-state topology, 4-gram phone LM for the den graph,
# TDNN-F kaldi_7q preset (tdnn1 1536, 14 tdnnf 1536/160, prefinal 256, xent branch,
# xent-regularize 0.1, leaky HMM 0.1, dropout schedule 0,0@0.20,0.5@0.50,0), 6 epochs,
# trigram word LM from the Switchboard training transcripts (Kaldi's sw1_tg).
#
# Stages: 0 manifests + lexicon + dev split + eval2000 (k2quant prepare-swbd), 1 fbank with speed perturbation, 2 lang dir + den phone LM, 3 word LM + HLG,
# 4 DDP training (--world-size GPUs, nccl), 5 decoding of eval2000 (and dev), 6 scoring.
#
# Usage: egs/swbd/ASR/run.sh --swbd-audio-dir DIR --swbd-trans-dir DIR --eval2000-dir DIR \
#          [--world-size 4] [--stage N] [--stop-stage N]
#
# Results: none measured (see above). Reference (Kaldi 7q, GUIDE.md section 2):
#   | system                         | eval2000 tg | eval2000 fg | rt03 tg | rt03 fg |
#   |--------------------------------|-------------|-------------|---------|---------|
#   | Kaldi TDNN-F 7q (MFCC+ivector) | 14.3        | 12.9        | 17.6    | 15.2    |
#   | k2quant kaldi_7q (this recipe) | not run     | not run     | -       | -       |
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
top=$(cd ../../.. && pwd)
. "$top/local/common.sh"

stage=0
stop_stage=100
swbd_audio_dir=       # LDC97S62
swbd_trans_dir=       # swb_ms98_transcriptions
eval2000_dir=         # LDC2002S09/LDC2002T43 root
swbd_lexicon=         # default: $swbd_trans_dir/swb_ms98_transcriptions/sw-ms98-dict.text
num_dev_utts=4000
dev_split=first       # first: Kaldi's train_dev; conversations: whole held-out conversations
dev_seed=0            # used by --dev-split conversations only
max_dup_utts=300      # Kaldi's train_nodup
speed_perturb=true
feat_dim=40           # mel bins: 40 as Kaldi's hires features for 8 kHz telephone speech
num_jobs=1
world_size=4          # GPUs (DDP, nccl); on CPU this becomes gloo processes
device=auto
model_preset=kaldi_7q
model_config=
num_epochs=6
max_duration=300      # seconds of audio per GPU and batch
lr=0.002
final_lr=0.0002
warmup_steps=2000
den_lm_order=4
lm_order=3
lm_scale=1.0
avg=2
seed=42
data_dir=data
exp_dir=exp

help_message="Usage: $0 --swbd-audio-dir DIR --swbd-trans-dir DIR --eval2000-dir DIR [options]
  --stage N / --stop-stage N   run stages N..M (0 manifests, 1 fbank, 2 lang, 3 LM + HLG,
                               4 train, 5 decode, 6 score)
  --swbd-lexicon FILE  --num-dev-utts N [$num_dev_utts]  --dev-split first|conversations [$dev_split]
  --max-dup-utts N [$max_dup_utts] (0: keep all)
  --world-size N [$world_size]  --num-epochs N [$num_epochs]  --max-duration S [$max_duration]
  --model-preset P [$model_preset]  --model-config JSON  --avg K [$avg]  --device D [$device]"
. "$top/local/parse_options.sh"

find_k2quant
find_lhotse
manifests=$data_dir/manifests
fbank=$data_dir/fbank
lang=$data_dir/lang
lm=$data_dir/lm

if run_stage 0 "Switchboard + eval2000 manifests, lexicon, dev split" "$manifests/.stage0.done"; then
  for v in swbd_audio_dir swbd_trans_dir eval2000_dir; do
    [ -n "${!v}" ] && [ -d "${!v}" ] || die "--${v//_/-} is required and must be a directory (got '${!v}')"
  done
  # -> swbd_{recordings,supervisions}_{train,dev,eval2000}.jsonl.gz and swbd_lexicon.txt
  # (lhotse's prepare_switchboard / prepare_eval2000, Kaldi swbd1_data_prep-style text
  # normalisation, MS-98 lexicon with [noise]/[laughter]/[vocalized-noise] -> NSN/LAU/SPN,
  # dev = Kaldi's train_dev, train = Kaldi's train_nodup; see k2quant/data/swbd.py)
  "$k2quant" prepare-swbd --audio-dir "$swbd_audio_dir" --transcripts-dir "$swbd_trans_dir" \
    --eval2000-dir "$eval2000_dir" ${swbd_lexicon:+--lexicon "$swbd_lexicon"} \
    --output-dir "$manifests" --num-dev-utts "$num_dev_utts" --dev-split "$dev_split" \
    --seed "$dev_seed" --max-dup-utts "$max_dup_utts"
  mark_done "$manifests/.stage0.done"
fi

if run_stage 1 "${feat_dim}-dim fbank (8 kHz; speed perturbation $speed_perturb)" "$fbank/.stage1.done"; then
  # lhotse decodes LDC's shorten-compressed SPHERE only through the sph2pipe binary
  command -v sph2pipe >/dev/null || die "sph2pipe must be on PATH to read the Switchboard .sph audio (Kaldi's tools/sph2pipe or 'lhotse install-sph2pipe')"
  sp_flag=--no-speed-perturb
  [ "$speed_perturb" = true ] && sp_flag=--speed-perturb
  "$k2quant" compute-fbank --manifest-dir "$manifests" --prefix swbd --output-dir "$fbank" \
    --splits train,dev,eval2000 --num-mel-bins "$feat_dim" --num-jobs "$num_jobs" "$sp_flag"
  mark_done "$fbank/.stage1.done"
fi

if run_stage 2 "Lang dir (chain topology, silence) and the ${den_lm_order}-gram den phone LM" "$lang/.stage2.done"; then
  "$k2quant" prepare-lang --lexicon "$manifests/swbd_lexicon.txt" --lang-dir "$lang" \
    --topo chain --sil-phone SIL --silence-phone SPN --silence-phone LAU --silence-phone NSN
  "$lhotse" kaldi export "$manifests/swbd_recordings_train.jsonl.gz" \
    "$manifests/swbd_supervisions_train.jsonl.gz" "$data_dir/kaldi/train"
  "$k2quant" train-ngram --text "$data_dir/kaldi/train/text" --skip-first-field \
    --order "$den_lm_order" --phones-from-lang "$lang" --out "$lang/P_${den_lm_order}gram.arpa"
  mark_done "$lang/.stage2.done"
fi

if run_stage 3 "Word ${lm_order}-gram (Switchboard transcripts) and HLG" "$lang/.stage3.done"; then
  "$k2quant" train-ngram --text "$data_dir/kaldi/train/text" --skip-first-field \
    --order "$lm_order" --vocab "$lang/words.txt" --out "$lm/G_${lm_order}_gram.arpa"
  "$k2quant" compile-hlg --lang-dir "$lang" --lm "$lm/G_${lm_order}_gram.arpa" --force
  mark_done "$lang/.stage3.done"
fi

if run_stage 4 "Train TDNN-F $model_preset with LF-MMI, $num_epochs epochs, world size $world_size" "$exp_dir/.stage4.done"; then
  # Resuming after a crash: rerun with --stage 4 after adding e.g. '--start-epoch 4' below, or
  # call 'k2quant train ... --start-epoch N' directly (bit-identical continuation).
  "$k2quant" train --exp-dir "$exp_dir" --lang-dir "$lang" \
    --train-cuts "$fbank/cuts_train.jsonl.gz" --valid-cuts "$fbank/cuts_dev.jsonl.gz" \
    --model-preset "$model_preset" ${model_config:+--model-config "$model_config"} \
    --feat-dim "$feat_dim" --num-epochs "$num_epochs" --max-duration "$max_duration" \
    --world-size "$world_size" --device "$device" --lr "$lr" --final-lr "$final_lr" \
    --warmup-steps "$warmup_steps" --den-lm-order "$den_lm_order" --xent-regularize 0.1 \
    --leaky-hmm 0.1 --seed "$seed"
  mark_done "$exp_dir/.stage4.done"
fi

if run_stage 5 "Decode eval2000 and dev (epoch $num_epochs, avg $avg)"; then
  for split in eval2000 dev; do
    tag=$split-epoch-$num_epochs-avg-$avg
    [ -f "$exp_dir/decode/.stage5.$tag.done" ] && { log "  $tag already decoded"; continue; }
    "$k2quant" decode --exp-dir "$exp_dir" --epoch "$num_epochs" --avg "$avg" --lang-dir "$lang" \
      --cuts "$fbank/cuts_$split.jsonl.gz" --out-dir "$exp_dir/decode" --lm-scale "$lm_scale" \
      --tag "$tag" --device "$device" --save-lattices
    mark_done "$exp_dir/decode/.stage5.$tag.done"
  done
fi

if run_stage 6 "Score eval2000 and dev"; then
  for split in eval2000 dev; do
    tag=$split-epoch-$num_epochs-avg-$avg
    "$k2quant" score --ref "$exp_dir/decode/ref-$tag.txt" --hyp "$exp_dir/decode/hyps-$tag.txt" \
      --out-dir "$exp_dir/decode" --name "$tag-final" | tee "$exp_dir/decode/WER-$tag.txt"
  done
fi
log "done in $(elapsed) s"
