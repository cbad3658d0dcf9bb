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
# table (exp/compress/report.md + .json), 9 Transformer word LM on the training transcripts
# (or --lm-text), 10 its ~2-bit compression (k2quant compress-lm), 11 dev decoding with saved
# lattices (fp32 AM) and n-best rescoring with the fp32 and the compressed LM, 12 the rescoring
# results and the AM/LM file sizes (the AM+LM system table is not a CLI yet, see stage 12).
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
#
# Stages 7-11 (dev, 639 words; AN4 small model above, fp32 1-best 11.89%; load 6-10 on 2 cores).
# AM alone (stage 8, exp/compress/report.md): uniform2 13.56x 8.14%, hessian-u2size 13.57x
# 8.92%, hessian-sub-r16 16.01x 9.86% (2.66 bits, 1.49M params), all p >= 0.9 vs fp32;
# hessian-u2size 95 s (resumed QAT), hessian-sub-r16 762 s and uniform2 546 s at load ~8.
# AM + LM, rescored with ngram scale 1, 100 paths:
#   | system (AM + LM)                     | AM+LM bytes | ratio | 1-best | rescored (lm scale) | p vs fp32 |
#   |--------------------------------------|-------------|-------|--------|---------------------|-----------|
#   | fp32 AM + fp32 LM (409k params)      | 11,271,336  | 1.00x | 11.89  | 11.27 (0.1)         | -         |
#   | fp32 AM + LM kl-r12 (2.15 bits)      |  9,768,271  | 1.15x | 11.89  | 11.11 (0.2)         | 0.84      |
#   | hessian-sub-r16 AM + LM kl-r12       |    736,968  | 15.3x |  9.86  |  7.82 (0.7)         | 0.99      |
#   | hessian-sub-r16 AM + LM kl-r16 (1.5b)|    703,988  | 16.0x |  9.86  |  8.45 (0.4)         | 0.96      |
# LM: ppl 16.62 (fp32) -> 16.52 (kl-r12, 135,219 bytes, 12.1x) / 16.90 (kl-r16, 102,239 bytes);
# p = MAPSSWE, one-sided, vs the fp32 system at its best scale (scales chosen on dev: optimistic).
# The compressed-AM rows need lattices of the packed model, which no CLI writes yet (stage 11);
# they were measured with the library's decode_cuts(lattice_dir=...) on model.k2q.
# Rescoring 104 lattices, 100 paths, same run: fp32 LM 0.95-1.19 utt/s, packed LM 0.89-1.15.
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
# --- compression of the acoustic model (stages 7-8) ---
# Runs, in order, each into $exp_dir/compress/NAME; NAME is one of
#   uniformB            every layer at B bits (method uniform)
#   M-rX                mixed precision by M (hessian|kl|nas) at on-disk ratio X vs fp32
#   M-bX                mixed precision by M at X average bits
#   M-uBsize            mixed precision by M at the file size of uniformB (run uniformB first)
#   M-sub-rX            M (hessian|kl) + TDNN-F bottleneck dims (--subspace) at ratio X
# The default covers the acceptance rows (>= 8x at <= 4 bits, mixed vs uniform at the 2-bit
# size, subspace >= 12x, and the 16x AM of the AM+LM system) in ~18 min on 2 quiet cores
# (2.5-5 min per run; about twice that at load 8); --compress-runs "$compress_runs_full" gives
# the issue's full table (~50 min).
compress_runs="uniform2 hessian-r8 hessian-u2size hessian-sub-r12.5 hessian-sub-r16"
compress_runs_full="uniform8 uniform4 uniform3 uniform2 hessian-r8 kl-r8 nas-r8 hessian-u2size kl-u2size nas-u2size hessian-sub-r12.5 hessian-sub-r16"
compress_sens_utts=100   # training utterances of the sensitivity (and NAS)
compress_sens_samples=8  # Hutchinson probes per batch (hessian)
compress_qat_epochs=2
# --- Transformer LM and lattice rescoring (stages 9-12) ---
lm_text=             # a larger LM text corpus (plain, one sentence per line) [default: the
                     # training transcripts]; held-out perplexity is on the dev transcripts
lm_epochs=20
lm_preset=small
lm_compress_method=kl
lm_ratio=12          # on-disk compression of the LM (~2 average bits)
lm_qat_epochs=10
rescore_lm_scales=0.1,0.2,0.3,0.4,0.5,0.7,1.0
rescore_ngram_scale=1
rescore_num_paths=100
system_am=hessian-sub-r16    # the compressed AM of the AM+LM system (a --compress-runs name)

help_message="Usage: $0 --corpus-dir DIR [options]
  --corpus-dir DIR [$corpus_dir]  extracted AN4 corpus (etc/, wav/)
  --download true|false [$download]  download AN4 into --corpus-dir first
  --stage N / --stop-stage N   run stages N..M (0 manifests, 1 fbank, 2 lang, 3 word LM + HLG,
                               4 train, 5 decode, 6 score, 7 compress AM, 8 compression report,
                               9 Transformer LM, 10 compress LM, 11 lattices + rescoring,
                               12 rescoring summary)
  --compress-runs \"NAME ...\" [$compress_runs]
                               uniformB | M-rX | M-bX | M-uBsize | M-sub-rX (M: hessian|kl|nas);
                               full table: --compress-runs \"$compress_runs_full\"
  --compress-sens-utts N [$compress_sens_utts]  --compress-qat-epochs N [$compress_qat_epochs]
  --lm-text FILE  LM training text (plain) [training transcripts]  --lm-epochs N [$lm_epochs]
  --lm-ratio X [$lm_ratio]  --lm-compress-method M [$lm_compress_method]
  --rescore-lm-scales LIST [$rescore_lm_scales]  --rescore-num-paths N [$rescore_num_paths]
  --system-am NAME [$system_am]  compressed AM of the AM+LM system
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

# ---------------------------------------------------------------------------------------------
# Stages 7-12 (local/compression_stages.sh): AM compression + report, LM training and
# compression, n-best rescoring with the fp32 and the compressed LM, summary.
# ---------------------------------------------------------------------------------------------
corpus=an4
eval_split=dev
corpus_title="AN4 dev"
. "$top/local/compression_stages.sh"
log "done in $(elapsed) s"
