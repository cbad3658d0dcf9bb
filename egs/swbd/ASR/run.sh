#!/usr/bin/env bash
# Switchboard-1 (300 h) LF-MMI TDNN-F + Transformer LM, compressed: the system of Xu et al.,
# "Towards Green ASR" (Interspeech 2022), i.e. Kaldi's swbd/s5c run_tdnn_7q.sh in k2quant form,
# with the n-gram and Transformer LM rescoring of the paper and its compression table.
#
# NOT RUN ON THE REAL CORPUS HERE: we do not have the LDC data. Every stage 0-12 runs in CI on a
# fake LDC tree in the real directory layouts (tests/fake_ldc.py, tests/test_recipe_swbd.py:
# 8 kHz two-channel SPHERE, MS-98 transcripts and lexicon, eval2000 stm/glm, Fisher text) with a
# tiny model, which checks formats and plumbing, not accuracy. No number below was measured by
# this recipe.
#
# Data (LDC licences; give the paths as options):
#   --swbd-audio-dir   LDC97S62 (Switchboard-1 Release 2; */*.sph, 2-channel 8 kHz, shorten)
#   --swbd-trans-dir   directory holding swb_ms98_transcriptions/ (ISIP MS-98 transcripts and
#                      sw-ms98-dict.text; public)
#   --eval2000-dir     holding LDC2002S09/hub5e_00/english/*.sph and LDC2002T43/reference/
#                      (english/*.txt, hub5e00.english.000405.stm, en20000405_hub5.glm)
#   --fisher-dirs      "LDC2004T19 LDC2005T19" (Fisher English transcripts, fe_03_p{1,2}_tran)
#                      for the sw1_fsh 4-gram and the Transformer LM; empty: Switchboard text only
# Tools: sph2pipe on PATH (LDC97S62 and LDC2002S09 are shorten-compressed SPHERE: Kaldi's
# tools/ builds it, or 'lhotse install-sph2pipe'); NIST SCTK for eval2000 scoring
# ('apt-get install sctk' or 'tools/install.sh --with-sctk').
#
# Kaldi-compatible choices: the first 4000 training utterances are the dev set (Kaldi's
# train_dev; LM scales and n-best settings are tuned on dev and applied unchanged to eval2000),
# train_nodup (<= 300 copies of a transcript), Kaldi's swbd1/fisher text normalisation,
# speed perturbation 0.9/1.0/1.1, 8 kHz 40-bin fbank from 20 to 3700 Hz (instead of 40-dim MFCC
# + i-vectors + LDA), chain 2-state topology, 4-gram phone LM for the den graph, TDNN-F kaldi_7q
# preset (tdnn1 1536, 14 tdnnf 1536/160, prefinal 256, xent branch, xent-regularize 0.1, leaky
# HMM 0.1, dropout schedule 0,0@0.20,0.5@0.50,0), 6 epochs; decoding with the sw1 3-gram HLG
# (Kaldi's sw1_tg), whole-lattice rescoring with a 4-gram on Switchboard + Fisher text (Kaldi's
# sw1_fsh_fg interpolates separate sw1 and fisher 4-grams; here one Kneser-Ney 4-gram is
# estimated on the pooled text), then n-best rescoring with a Transformer LM trained on
# Fisher + Switchboard text; scoring of eval2000 with sclite, the stm and glm of LDC2002T43
# (hubscr.pl: glm mapping, %HESITATION, fragments), per subset swbd / callhome / total.
#
# Stages: 0 manifests + lexicon + dev split + eval2000 + Fisher text (k2quant prepare-swbd),
# 1 fbank (8 kHz, 40 bins) with speed perturbation, 2 lang dir + den phone LM, 3 sw1 3-gram +
# HLG and the sw1_fsh 4-gram, 4 LF-MMI training (1 node x N GPUs, or M nodes with torchrun),
# 5 decoding of dev (LM scales) and eval2000 (dev's best scale) + 4-gram lattice rescoring,
# 6 scoring (k2quant WER; sclite per eval2000 subset), 7 compression runs of the acoustic model
# (k2quant compress; --compress-runs), 8 their report table, 9 Transformer word LM on Fisher +
# Switchboard text, 10 its ~2-bit compression, 11 eval2000 lattices of the fp32 and the
# compressed AM, n-best rescoring with the fp32 and the compressed LM, 12 the AM+LM table.
#
# Usage: egs/swbd/ASR/run.sh --swbd-audio-dir DIR --swbd-trans-dir DIR --eval2000-dir DIR \
#          --fisher-dirs "DIR DIR" [--world-size 4] [--stage N] [--stop-stage N]
#
# Training on more than one GPU (stage 4):
#   1 node x N GPUs:  --world-size N (k2quant spawns N DDP processes, nccl).
#   M nodes x N GPUs: --launcher torchrun --num-nodes M --gpus-per-node N \
#                     --master-addr HOST0 --master-port 29500, run on every node with its
#                     --node-rank 0..M-1 (and --stage 4 --stop-stage 4); stage 4 then runs
#                       torchrun --nnodes M --nproc-per-node N --node-rank R \
#                         --rdzv-backend c10d --rdzv-endpoint HOST0:29500 \
#                         -m k2quant.bin.cli train ...
#                     (env:// rendezvous; each process takes RANK / LOCAL_RANK / WORLD_SIZE from
#                     torchrun and uses cuda:LOCAL_RANK). Run stages 5-12 on one node.
#
# Reference numbers (not from this recipe; GUIDE.md section 2 and the papers):
#   | system                                        | eval2000 total | swbd | callhome |
#   |-----------------------------------------------|----------------|------|----------|
#   | Kaldi TDNN-F 7q, sw1 3-gram (sw1_tg)          | 14.3           |      |          |
#   | + 4-gram lattice rescoring (sw1_fsh_fg)       | 12.9 (12.8)    | 8.6  | 17.0     |
#   | + Transformer LM lattice rescoring            | ~10.6          | 6.8  | 14.4     |
#   | Xu et al. 2022: 4-bit TDNN-F + 2-bit Trf LM   | lossless (no significant WER increase) at 13.6x |
#   | k2quant kaldi_7q (this recipe)                | not run        | -    | -        |
#   rt03 (Kaldi 7q): 17.6 (tg) / 15.2 (fg); RT03 is not prepared by this recipe.
#
# Resources for a full run (estimates, not measured: Kaldi's 7q trains ~6 epochs over ~900 h of
# speed-perturbed audio): disk ~120 GB (LDC97S62 ~30 GB of shorten SPHERE read in place; lilcom
# fbank of the 3x speed-perturbed train ~25 GB; lattices ~10 GB; checkpoints of 18.7M-parameter
# models and compression runs ~10 GB); training 4 x V100-class GPUs for ~1-2 days (~150 GPU
# hours); each QAT compression run (2 epochs) ~50 GPU hours, the full table of stage 7 several
# hundred GPU hours; the pure-Python Kneser-Ney 4-gram on Fisher + Switchboard text (~25M
# words) ~1 h and ~20 GB of RAM; decoding + rescoring of eval2000 ~1 h on one GPU.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
top=$(cd ../../.. && pwd)
. "$top/local/common.sh"

stage=0
stop_stage=100
swbd_audio_dir=       # LDC97S62
swbd_trans_dir=       # holding swb_ms98_transcriptions/
eval2000_dir=         # holding LDC2002S09/ and LDC2002T43/
fisher_dirs=          # "LDC2004T19 LDC2005T19" (space-separated; empty: no Fisher text)
swbd_lexicon=         # default: swb_ms98_transcriptions/sw-ms98-dict.text
num_dev_utts=4000
dev_split=first       # first: Kaldi's train_dev; conversations: whole held-out conversations
dev_seed=0            # used by --dev-split conversations only
max_dup_utts=300      # Kaldi's train_nodup
speed_perturb=true
audio_reader=auto     # auto: sph2pipe for .sph (LDC's shorten SPHERE); libsndfile: PCM/mu-law
feat_dim=40           # mel bins: 40 from 20 to 3700 Hz for 8 kHz telephone speech
num_jobs=1
num_threads=0         # torch threads per process (0: torch's default)
world_size=4          # processes of 'k2quant train' (GPUs with nccl; CPU: gloo)
launcher=local        # local: k2quant train --world-size; torchrun: multi-node (see header)
num_nodes=1
node_rank=0
gpus_per_node=4
master_addr=localhost
master_port=29500
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
fg_order=4            # order of the rescoring LM (Kaldi's sw1_fsh_fg)
lm_scales=0.6,0.8,1.0,1.2,1.5  # tuned on dev (3-gram 1-best and 4-gram rescoring)
avg=2
seed=42
use_sclite=auto       # auto: NIST scoring of eval2000 when SCTK is installed; true: required
data_dir=data
exp_dir=exp
. "$top/local/compression_options.sh"  # defaults of the stage 7-12 options
compress_runs="uniform4 uniform2 hessian-u2size kl-u2size nas-u2size hessian-sub-r12.5"
compress_runs_full="uniform8 uniform4 uniform3 uniform2 hessian-r8 kl-r8 nas-r8 hessian-u2size kl-u2size nas-u2size hessian-sub-r12.5 hessian-sub-r16"
system_am=hessian-sub-r12.5  # the compressed AM of the AM+LM system (a --compress-runs name)
lm_preset=paper               # 6 layers, dim 512, 8 heads
lm_epochs=10

help_message="Usage: $0 --swbd-audio-dir DIR --swbd-trans-dir DIR --eval2000-dir DIR [options]
  --stage N / --stop-stage N   run stages N..M (0 manifests, 1 fbank, 2 lang, 3 LMs + HLG,
                               4 train, 5 decode + 4-gram rescoring, 6 score, 7 compress AM,
                               8 compression report, 9 Transformer LM, 10 compress LM,
                               11 lattices + n-best rescoring, 12 AM+LM system table)
  --fisher-dirs \"DIR DIR\"  --swbd-lexicon FILE  --num-dev-utts N [$num_dev_utts]
  --dev-split first|conversations [$dev_split]  --max-dup-utts N [$max_dup_utts] (0: keep all)
  --audio-reader auto|libsndfile [$audio_reader]  --speed-perturb B [$speed_perturb]
  --world-size N [$world_size]  --launcher local|torchrun [$launcher]  --num-nodes M
  --node-rank R  --gpus-per-node N  --master-addr HOST  --master-port P
  --num-epochs N [$num_epochs]  --max-duration S [$max_duration]  --lm-scales LIST [$lm_scales]
  --model-preset P [$model_preset]  --model-config JSON  --avg K [$avg]  --device D [$device]
  --use-sclite auto|true|false [$use_sclite]
$(compression_help)"
. "$top/local/parse_options.sh"

find_k2quant
find_lhotse
log "k2quant: $k2quant; stages $stage..$stop_stage"
manifests=$data_dir/manifests
fbank=$data_dir/fbank
lang=$data_dir/lang
lm=$data_dir/lm
threads_flag=()
[ "$num_threads" -gt 0 ] && threads_flag=(--num-threads "$num_threads")

if run_stage 0 "Switchboard + eval2000 manifests, lexicon, dev split, Fisher LM text" "$manifests/.stage0.done"; then
  for v in swbd_audio_dir swbd_trans_dir eval2000_dir; do
    [ -n "${!v}" ] && [ -d "${!v}" ] || die "--${v//_/-} is required and must be a directory (got '${!v}')"
  done
  fisher_flags=()
  for d in $fisher_dirs; do fisher_flags+=(--fisher-dir "$d"); done
  # -> swbd_{recordings,supervisions}_{train,dev,eval2000}.jsonl.gz, swbd_lexicon.txt,
  # swbd_eval2000.{stm,glm}, swbd_fisher_text.txt (see k2quant/data/swbd.py)
  "$k2quant" prepare-swbd --audio-dir "$swbd_audio_dir" --transcripts-dir "$swbd_trans_dir" \
    --eval2000-dir "$eval2000_dir" ${swbd_lexicon:+--lexicon "$swbd_lexicon"} \
    "${fisher_flags[@]+"${fisher_flags[@]}"}" --output-dir "$manifests" \
    --num-dev-utts "$num_dev_utts" --dev-split "$dev_split" --seed "$dev_seed" \
    --max-dup-utts "$max_dup_utts"
  mark_done "$manifests/.stage0.done"
fi

if run_stage 1 "${feat_dim}-dim fbank at 8 kHz (speed perturbation $speed_perturb, reader $audio_reader)" "$fbank/.stage1.done"; then
  sp_flag=--no-speed-perturb
  [ "$speed_perturb" = true ] && sp_flag=--speed-perturb
  # compute-fbank reads the first recording of each split before anything else: a missing or
  # failing sph2pipe stops here with its command and stderr, and no cuts file is written
  "$k2quant" compute-fbank --manifest-dir "$manifests" --prefix swbd --output-dir "$fbank" \
    --splits train,dev,eval2000 --num-mel-bins "$feat_dim" --num-jobs "$num_jobs" "$sp_flag" \
    --audio-reader "$audio_reader"
  mark_done "$fbank/.stage1.done"
fi

if run_stage 2 "Lang dir (chain topology, silence) and the ${den_lm_order}-gram den phone LM" "$lang/.stage2.done"; then
  "$k2quant" prepare-lang --lexicon "$manifests/swbd_lexicon.txt" --lang-dir "$lang" \
    --topo chain --sil-phone SIL --silence-phone SPN --silence-phone LAU --silence-phone NSN
  for split in train dev eval2000; do
    "$lhotse" kaldi export "$manifests/swbd_recordings_$split.jsonl.gz" \
      "$manifests/swbd_supervisions_$split.jsonl.gz" "$data_dir/kaldi/$split" >/dev/null
  done
  "$k2quant" train-ngram --text "$data_dir/kaldi/train/text" --skip-first-field \
    --order "$den_lm_order" --phones-from-lang "$lang" --out "$lang/P_${den_lm_order}gram.arpa"
  mark_done "$lang/.stage2.done"
fi

if run_stage 3 "sw1 ${lm_order}-gram + HLG; sw1_fsh ${fg_order}-gram for lattice rescoring" "$lang/.stage3.done"; then
  mkdir -p "$lm"
  cut -d' ' -f2- "$data_dir/kaldi/train/text" > "$lm/sw1.txt"
  cat "$lm/sw1.txt" > "$lm/sw1_fsh.txt"
  [ -f "$manifests/swbd_fisher_text.txt" ] && cat "$manifests/swbd_fisher_text.txt" >> "$lm/sw1_fsh.txt"
  "$k2quant" train-ngram --text "$lm/sw1.txt" --order "$lm_order" --vocab "$lang/words.txt" \
    --out "$lm/G_${lm_order}_gram.arpa"
  "$k2quant" compile-hlg --lang-dir "$lang" --lm "$lm/G_${lm_order}_gram.arpa" --force
  "$k2quant" train-ngram --text "$lm/sw1_fsh.txt" --order "$fg_order" --vocab "$lang/words.txt" \
    --out "$lm/G_${fg_order}_gram.arpa"
  mark_done "$lang/.stage3.done"
fi

if run_stage 4 "Train TDNN-F $model_preset with LF-MMI, $num_epochs epochs ($launcher)" "$exp_dir/.stage4.done"; then
  # Resuming after a crash: rerun with --stage 4 after adding e.g. '--start-epoch 4' below, or
  # call 'k2quant train ... --start-epoch N' directly (bit-identical continuation).
  train_args=(--exp-dir "$exp_dir" --lang-dir "$lang"
    --train-cuts "$fbank/cuts_train.jsonl.gz" --valid-cuts "$fbank/cuts_dev.jsonl.gz"
    --model-preset "$model_preset" ${model_config:+--model-config "$model_config"}
    --feat-dim "$feat_dim" --num-epochs "$num_epochs" --max-duration "$max_duration"
    --device "$device" --lr "$lr" --final-lr "$final_lr" --warmup-steps "$warmup_steps"
    --den-lm-order "$den_lm_order" --xent-regularize 0.1 --leaky-hmm 0.1 --seed "$seed"
    "${threads_flag[@]+"${threads_flag[@]}"}")
  case $launcher in
    local)
      "$k2quant" train "${train_args[@]}" --world-size "$world_size" ;;
    torchrun)
      # every node runs this stage with its --node-rank; torchrun sets RANK, LOCAL_RANK and
      # WORLD_SIZE (= num_nodes x gpus_per_node) and 'k2quant train' joins by env://
      py=$(dirname "$k2quant")/python
      [ -x "$py" ] || py=python3
      "$py" -m torch.distributed.run --nnodes "$num_nodes" --nproc-per-node "$gpus_per_node" \
        --node-rank "$node_rank" --rdzv-backend c10d \
        --rdzv-endpoint "$master_addr:$master_port" \
        -m k2quant.bin.cli train "${train_args[@]}" ;;
    *) die "--launcher must be local or torchrun, got '$launcher'" ;;
  esac
  [ "$launcher" = torchrun ] && [ "$node_rank" != 0 ] && { log "node $node_rank done"; exit 0; }
  mark_done "$exp_dir/.stage4.done"
fi

ddir=$exp_dir/decode
best_scale_file=$ddir/best_lm_scale
if run_stage 5 "Decode dev (LM scales $lm_scales) and eval2000 (dev's best scale); ${fg_order}-gram lattice rescoring"; then
  mkdir -p "$ddir"
  tag=dev-epoch-$num_epochs-avg-$avg
  if [ ! -f "$ddir/.stage5.$tag.done" ]; then
    scale_flags=()
    for s in ${lm_scales//,/ }; do scale_flags+=(--lm-scale "$s"); done
    "$k2quant" decode --exp-dir "$exp_dir" --epoch "$num_epochs" --avg "$avg" --lang-dir "$lang" \
      --cuts "$fbank/cuts_dev.jsonl.gz" --out-dir "$ddir" --tag "$tag" --device "$device" \
      "${scale_flags[@]}" --save-lattices "${threads_flag[@]+"${threads_flag[@]}"}"
    mark_done "$ddir/.stage5.$tag.done"
  fi
  # the dev WER of every scale (wer-TAG-lm_scale_S.json, or wer-TAG.json for the first one)
  best=$(python3 - "$ddir" "$tag" "$lm_scales" <<'PY'
import json, sys
d, tag, scales = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
def wer(s, first):
    for name in ([f"wer-{tag}.json"] if first else []) + [f"wer-{tag}-lm_scale_{float(s):g}.json"]:
        try:
            return json.load(open(f"{d}/{name}"))["wer"]
        except OSError:
            pass
    raise SystemExit(f"no WER file of lm scale {s} in {d}")
w = {s: wer(s, i == 0) for i, s in enumerate(scales)}
print(min(scales, key=lambda s: (w[s], float(s))))
PY
)
  echo "$best" > "$best_scale_file"
  log "  best LM scale on dev: $best (applied unchanged to eval2000)"
  tag=eval2000-epoch-$num_epochs-avg-$avg
  if [ ! -f "$ddir/.stage5.$tag.done" ]; then
    "$k2quant" decode --exp-dir "$exp_dir" --epoch "$num_epochs" --avg "$avg" --lang-dir "$lang" \
      --cuts "$fbank/cuts_eval2000.jsonl.gz" --out-dir "$ddir" --tag "$tag" --device "$device" \
      --lm-scale "$best" --save-lattices "${threads_flag[@]+"${threads_flag[@]}"}"
    mark_done "$ddir/.stage5.$tag.done"
  fi
  # Whole-lattice rescoring with the sw1_fsh 4-gram (G composition; Kaldi's
  # lmrescore_const_arpa.sh): 'k2quant rescore-ngram --lattices DIR --lm ARPA --words WORDS
  # --refs CUTS --lm-scale LIST --out-dir OUT' writes the rescored lattices to OUT/lattices
  # and hyps-S.txt / wer-S.json per LM scale S; the scale is tuned on dev and applied to eval2000.
  if "$k2quant" rescore-ngram --help >/dev/null 2>&1; then
    for split in dev eval2000; do
      tag=$split-epoch-$num_epochs-avg-$avg
      out=$ddir/fg-$tag
      [ -f "$out/.done" ] && { log "  $out already rescored"; continue; }
      scales=$lm_scales
      [ "$split" = eval2000 ] && scales=$(cat "$ddir/fg-dev-epoch-$num_epochs-avg-$avg/best_lm_scale")
      "$k2quant" rescore-ngram --lattices "$ddir/lattices-$tag" --lm "$lm/G_${fg_order}_gram.arpa" \
        --words "$lang/words.txt" --refs "$fbank/cuts_$split.jsonl.gz" --lm-scale "$scales" \
        --out-dir "$out"
      if [ "$split" = dev ]; then
        python3 - "$out" "$scales" > "$out/best_lm_scale" <<'PY'
import json, sys
d, scales = sys.argv[1], sys.argv[2].split(",")
w = {s: json.load(open(f"{d}/wer-{float(s):g}.json"))["wer"] for s in scales}
print(min(scales, key=lambda s: (w[s], float(s))))
PY
      fi
      mark_done "$out/.done"
    done
  else
    log "  ${fg_order}-gram lattice rescoring skipped: this k2quant has no 'rescore-ngram' command"
  fi
fi

have_sclite=false
if [ "$use_sclite" != false ]; then
  if "$k2quant" score-sclite --help >/dev/null 2>&1 && \
     { command -v sclite >/dev/null || [ -x /usr/lib/sctk/bin/sclite ] || [ -n "${SCTK_BIN:-}" ]; }; then
    have_sclite=true
  elif [ "$use_sclite" = true ]; then
    die "--use-sclite true but NIST SCTK (sclite, hubscr.pl, sc_stats) is not installed: 'apt-get install sctk' or tools/install.sh --with-sctk"
  fi
fi
if run_stage 6 "Score dev and eval2000 (k2quant WER; sclite per eval2000 subset: $have_sclite)"; then
  best=$(cat "$best_scale_file")
  for split in dev eval2000; do
    tag=$split-epoch-$num_epochs-avg-$avg
    hyp=$ddir/hyps-$tag.txt
    [ "$split" = dev ] && [ -f "$ddir/hyps-$tag-lm_scale_$(printf %g "$best").txt" ] && \
      hyp=$ddir/hyps-$tag-lm_scale_$(printf %g "$best").txt
    "$k2quant" score --ref "$ddir/ref-$tag.txt" --hyp "$hyp" --out-dir "$ddir" \
      --name "$tag-final" | tee "$ddir/WER-$tag.txt"
  done
  if [ "$have_sclite" = true ]; then
    mkdir -p "$ddir/sclite"
    tag=eval2000-epoch-$num_epochs-avg-$avg
    "$k2quant" score-sclite --hyp "$ddir/hyps-$tag.txt" --cuts "$fbank/cuts_eval2000.jsonl.gz" \
      --stm "$manifests/swbd_eval2000.stm" --glm "$manifests/swbd_eval2000.glm" \
      --out-dir "$ddir/sclite" --name tg | tee "$ddir/sclite/WER-tg.txt"
    fg_hyp=$ddir/fg-$tag/hyps-$(cat "$ddir/fg-dev-epoch-$num_epochs-avg-$avg/best_lm_scale" 2>/dev/null || echo none).txt
    if [ -f "$fg_hyp" ]; then
      "$k2quant" score-sclite --hyp "$fg_hyp" --cuts "$fbank/cuts_eval2000.jsonl.gz" \
        --stm "$manifests/swbd_eval2000.stm" --glm "$manifests/swbd_eval2000.glm" \
        --out-dir "$ddir/sclite" --name fg --baseline tg | tee "$ddir/sclite/WER-fg.txt"
    fi
  fi
fi

# ---------------------------------------------------------------------------------------------
# Stages 7-12 (local/compression_stages.sh): AM compression + report, LM training and
# compression, n-best rescoring with the fp32 and the compressed LM, summary; on eval2000.
# ---------------------------------------------------------------------------------------------
corpus=swbd
eval_split=eval2000
corpus_title="Switchboard eval2000"
[ -n "$lm_text" ] || lm_text=$lm/sw1_fsh.txt  # the Transformer LM learns Fisher + Switchboard
lm_scale=$(cat "$best_scale_file" 2>/dev/null || echo 1.0)  # tuned on dev (stage 5)
fg_scale_file=$ddir/fg-dev-epoch-$num_epochs-avg-$avg/best_lm_scale

# Stage 11 hands each AM's eval2000 lattices to this first: 4-gram lattice rescoring (at the
# scale tuned on dev), so that the Transformer LM rescores the 4-gram lattices, as in the paper.
lattice_hook() {
  local name=$1 lats=$2 out=$exp_dir/rescore/fg-$1
  if ! "$k2quant" rescore-ngram --help >/dev/null 2>&1 || [ ! -f "$fg_scale_file" ]; then
    echo "$lats"; return
  fi
  if [ ! -f "$out/.done" ]; then
    "$k2quant" rescore-ngram --lattices "$lats" --lm "$lm/G_${fg_order}_gram.arpa" \
      --words "$lang/words.txt" --refs "$fbank/cuts_eval2000.jsonl.gz" \
      --lm-scale "$(cat "$fg_scale_file")" --out-dir "$out" >&2
    mark_done "$out/.done"
  fi
  echo "$out/lattices"
}
. "$top/local/compression_stages.sh"

if run_stage 12 "eval2000 per subset (sclite): fp32 and every compressed AM, MAPSSWE vs fp32" && \
   [ "$have_sclite" = true ]; then
  sdir=$exp_dir/compress/sclite
  names=
  for name in fp32 $compress_runs; do
    # eval2000 hypotheses of 'k2quant compress': fp32/hyps-fp32.txt, NAME/decode/hyps-*.txt
    hyp=
    for f in "$exp_dir/compress/$name"/hyps-*.txt "$exp_dir/compress/$name"/decode/hyps-*.txt; do
      [ -f "$f" ] && { hyp=$f; break; }
    done
    [ -n "$hyp" ] || { log "  no hypotheses of $name in $exp_dir/compress/$name; skipped"; continue; }
    base=(--baseline fp32)
    [ "$name" = fp32 ] && base=()
    "$k2quant" score-sclite --hyp "$hyp" --cuts "$fbank/cuts_eval2000.jsonl.gz" \
      --stm "$manifests/swbd_eval2000.stm" --glm "$manifests/swbd_eval2000.glm" \
      --out-dir "$sdir" --name "${name//./_}" "${base[@]+"${base[@]}"}"
    names=${names:+$names,}${name//./_}
  done
  [ -n "$names" ] && "$k2quant" score-sclite --table "$names" --baseline fp32 --out-dir "$sdir" \
    --name eval2000-subsets
fi
log "done in $(elapsed) s"
