#!/usr/bin/env bash
# Stages 7-12 shared by the recipes (sourced after stage 6): compression of the acoustic model
# ('k2quant compress' runs + 'k2quant report'), Transformer LM training and ~2-bit compression,
# lattices of the fp32 AM rescored with the fp32 and the compressed LM, and a summary.
# The recipe sets, besides its options: corpus (manifest prefix), eval_split (the scored split:
# dev or test), corpus_title (for report titles), and the paths manifests, fbank, lang, lm,
# data_dir, exp_dir.
cdir=$exp_dir/compress
fp32_model=$exp_dir/epoch-$num_epochs.pt
if run_stage 7 "Compress the acoustic model (epoch $num_epochs avg $avg): $compress_runs"; then
  require_file "$fp32_model" "Train first (stage 4)."
  for name in $compress_runs; do
    if [ -f "$cdir/$name/report.json" ]; then
      log "  $name already compressed ($cdir/$name/report.json)"; continue
    fi
    case $name in
      uniform[0-9]*) flags=(--method uniform --bits "${name#uniform}") ;;
      *-sub-r*) flags=(--method "${name%%-*}" --subspace --ratio "${name##*-sub-r}") ;;
      *-u2size)
        require_file "$cdir/uniform2/model.k2q" "List uniform2 before $name in --compress-runs."
        flags=(--method "${name%%-*}" --size-bytes "$(stat -c %s "$cdir/uniform2/model.k2q")") ;;
      *-r[0-9]*) flags=(--method "${name%%-*}" --ratio "${name##*-r}") ;;
      *-b[0-9]*) flags=(--method "${name%%-*}" --budget "${name##*-b}bits") ;;
      *) die "unknown compression run '$name' (uniformB, M-rX, M-bX, M-u2size, M-sub-rX)" ;;
    esac
    [[ $name == hessian-* || $name == kl-* ]] && \
      flags+=(--sensitivity-cache "$cdir/sensitivity-${name%%-*}.json")
    log "  $name: ${flags[*]}"
    "$k2quant" compress --model "$fp32_model" --avg "$avg" --lang-dir "$lang" \
      --cuts "$fbank/cuts_train.jsonl.gz" --dev-cuts "$fbank/cuts_${eval_split}.jsonl.gz" \
      --out-dir "$cdir/$name" --tag "$name" "${flags[@]}" --fp32-dir "$cdir/fp32" \
      --sens-utts "$compress_sens_utts" --sens-samples "$compress_sens_samples" \
      --qat-epochs "$compress_qat_epochs" --lm-scale "$lm_scale" --seed "$seed" \
      --num-threads "$num_threads"
  done
fi

if run_stage 8 "Compression report $cdir/report.md (+ .json)"; then
  rows=
  for name in $compress_runs; do
    [ -f "$cdir/$name/report.json" ] && rows=${rows:+$rows,}$cdir/$name
  done
  [ -n "$rows" ] || die "no compression report under $cdir; run stage 7 first"
  "$k2quant" report --rows "$rows" --out "$cdir/report.md" \
    --title "$corpus_title: TDNN-F $model_preset, epoch $num_epochs avg $avg"
fi

# ---------------------------------------------------------------------------------------------
# Transformer LM, its compression and n-best rescoring of the decoding lattices (issue 5).
# ---------------------------------------------------------------------------------------------
lm_dir=$exp_dir/lm
lmc_dir=$exp_dir/lm-compress/$lm_compress_method-r$lm_ratio
if run_stage 9 "Transformer word LM ($lm_preset, $lm_epochs epochs) on ${lm_text:-the training transcripts}" "$lm_dir/.stage9.done"; then
  mkdir -p "$lm_dir"
  "$lhotse" kaldi export "$manifests/${corpus}_recordings_${eval_split}.jsonl.gz" \
    "$manifests/${corpus}_supervisions_${eval_split}.jsonl.gz" "$data_dir/kaldi/$eval_split"
  if [ -n "$lm_text" ]; then
    require_file "$lm_text" "--lm-text: a plain text file, one sentence per line."
    cp "$lm_text" "$lm_dir/train.txt"
  else
    cut -d' ' -f2- "$data_dir/kaldi/train/text" > "$lm_dir/train.txt"
  fi
  cut -d' ' -f2- "$data_dir/kaldi/$eval_split/text" > "$lm_dir/valid.txt"  # perplexity only
  "$k2quant" train-lm --train-text "$lm_dir/train.txt" --valid-text "$lm_dir/valid.txt" \
    --exp-dir "$lm_dir" --preset "$lm_preset" --num-epochs "$lm_epochs" --seed "$seed" \
    --device cpu --num-threads "$num_threads"
  mark_done "$lm_dir/.stage9.done"
fi

if run_stage 10 "Compress the LM ($lm_compress_method, ratio $lm_ratio) into $lmc_dir" "$lmc_dir/.stage10.done"; then
  "$k2quant" compress-lm --lm "$lm_dir/epoch-$lm_epochs.pt" --train-text "$lm_dir/train.txt" \
    --valid-text "$lm_dir/valid.txt" --out-dir "$lmc_dir" --method "$lm_compress_method" \
    --ratio "$lm_ratio" --qat-epochs "$lm_qat_epochs" --seed "$seed" --device cpu \
    --num-threads "$num_threads"
  mark_done "$lmc_dir/.stage10.done"
fi

rdir=$exp_dir/rescore
lat_tag=$eval_split-epoch-$num_epochs-avg-$avg
if run_stage 11 "$eval_split lattices (fp32 AM) and n-best rescoring with the fp32 and the compressed LM"; then
  if [ ! -f "$rdir/.stage11.$lat_tag.done" ]; then
    "$k2quant" decode --exp-dir "$exp_dir" --epoch "$num_epochs" --avg "$avg" --lang-dir "$lang" \
      --cuts "$fbank/cuts_${eval_split}.jsonl.gz" --out-dir "$rdir" --lm-scale "$lm_scale" \
      --tag "$lat_tag" --save-lattices --num-threads "$num_threads" --device cpu
    mark_done "$rdir/.stage11.$lat_tag.done"
  fi
  # k2quant decode reads training checkpoints only and k2quant compress saves no lattices, so
  # the compressed AM ($system_am) has no lattices to rescore from the CLIs (see stage 12).
  for lm_name in fp32 "$lm_compress_method-r$lm_ratio"; do
    lm_file=$lmc_dir/lm.k2q
    [ "$lm_name" = fp32 ] && lm_file=$lm_dir/epoch-$lm_epochs.pt
    out=$rdir/fp32am-${lm_name}lm
    if [ -f "$out/rescore-summary.json" ]; then
      log "  $out already rescored"; continue
    fi
    "$k2quant" rescore --lattices "$rdir/lattices-$lat_tag" --lm "$lm_file" \
      --words "$lang/words.txt" --refs "$fbank/cuts_${eval_split}.jsonl.gz" \
      --num-paths "$rescore_num_paths" --lm-scale "$rescore_lm_scales" \
      --ngram-scale "$rescore_ngram_scale" --seed "$seed" --out "$out" --no-progress
  done
fi

if run_stage 12 "Rescoring results and AM/LM sizes"; then
  for out in "$rdir"/fp32am-*lm; do
    log "$out:\n$(cat "$out/wer-summary.txt")"
  done
  log "files (AM: packed fp32 / $system_am; LM: fp32 checkpoint / packed):\n$(ls -l \
    "$cdir/fp32/fp32.k2q" "$cdir/$system_am/model.k2q" "$lm_dir/epoch-$lm_epochs.pt" \
    "$lmc_dir/lm.k2q" 2>&1)"
  log "The AM+LM system rows (size and ratio vs the fp32 system, WER, p-value) need a" \
    "'k2quant report' that takes LM summaries and rescoring outputs (not supported yet)."
fi
