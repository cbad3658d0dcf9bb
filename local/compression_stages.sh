#!/usr/bin/env bash
# Stages 7-12 shared by the recipes (sourced after stage 6): compression of the acoustic model
# ('k2quant compress' runs + 'k2quant report'), Transformer LM training and ~2-bit compression,
# lattices of the fp32 AM and of the compressed AM ($system_am) rescored with the fp32 and the
# compressed LM, and the AM+LM system table ('k2quant report --systems').
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
      *-u[0-9]size)
        ub=${name##*-u}; ub=${ub%size}
        require_file "$cdir/uniform$ub/model.k2q" "List uniform$ub before $name in --compress-runs."
        flags=(--method "${name%%-*}" --size-bytes "$(stat -c %s "$cdir/uniform$ub/model.k2q")") ;;
      *-r[0-9]*) flags=(--method "${name%%-*}" --ratio "${name##*-r}") ;;
      *-b[0-9]*) flags=(--method "${name%%-*}" --budget "${name##*-b}bits") ;;
      *) die "unknown compression run '$name' (uniformB, M-rX, M-bX, M-uBsize, M-sub-rX)" ;;
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
lmc_name=$lm_compress_method-r$lm_ratio
lmc_dir=$exp_dir/lm-compress/$lmc_name
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
if run_stage 11 "$eval_split lattices of the fp32 AM and of $system_am; n-best rescoring with the fp32 and the compressed LM"; then
  if [ ! -f "$rdir/.stage11.$lat_tag.done" ]; then
    "$k2quant" decode --exp-dir "$exp_dir" --epoch "$num_epochs" --avg "$avg" --lang-dir "$lang" \
      --cuts "$fbank/cuts_${eval_split}.jsonl.gz" --out-dir "$rdir" --lm-scale "$lm_scale" \
      --tag "$lat_tag" --save-lattices --num-threads "$num_threads" --device cpu
    mark_done "$rdir/.stage11.$lat_tag.done"
  fi
  am_lats=("fp32:$rdir/lattices-$lat_tag")
  if [ -f "$cdir/$system_am/model.k2q" ]; then
    sys_tag=$eval_split-$system_am
    if [ ! -f "$rdir/.stage11.$sys_tag.done" ]; then
      "$k2quant" decode --model "$cdir/$system_am/model.k2q" --lang-dir "$lang" \
        --cuts "$fbank/cuts_${eval_split}.jsonl.gz" --out-dir "$rdir" --lm-scale "$lm_scale" \
        --tag "$sys_tag" --save-lattices --num-threads "$num_threads" --device cpu
      mark_done "$rdir/.stage11.$sys_tag.done"
    fi
    am_lats+=("$system_am:$rdir/lattices-$sys_tag")
  else
    log "  no $cdir/$system_am/model.k2q (stage 7 with $system_am in --compress-runs):" \
      "rescoring the fp32 AM's lattices only"
  fi
  for am in "${am_lats[@]}"; do
    # a recipe may rescore the lattices first (swbd: the 4-gram); it prints the new directory
    declare -F lattice_hook >/dev/null && am="${am%%:*}:$(lattice_hook "${am%%:*}" "${am#*:}")"
    for lm_name in fp32 "$lmc_name"; do
      lm_file=$lmc_dir/lm.k2q
      [ "$lm_name" = fp32 ] && lm_file=$lm_dir/epoch-$lm_epochs.pt
      out=$rdir/${am%%:*}am-${lm_name}lm
      if [ -f "$out/rescore-summary.json" ]; then
        log "  $out already rescored"; continue
      fi
      "$k2quant" rescore --lattices "${am#*:}" --lm "$lm_file" \
        --words "$lang/words.txt" --refs "$fbank/cuts_${eval_split}.jsonl.gz" \
        --num-paths "$rescore_num_paths" --lm-scale "$rescore_lm_scales" \
        --ngram-scale "$rescore_ngram_scale" --seed "$seed" --out "$out" --no-progress
    done
  done
fi

if run_stage 12 "AM+LM system report $rdir/systems.md (+ .json): sizes, ratio vs fp32, WER, p-values"; then
  systems=
  for name in fp32am-fp32lm fp32am-${lmc_name}lm ${system_am}am-fp32lm ${system_am}am-${lmc_name}lm; do
    [ -f "$rdir/$name/rescore-summary.json" ] && systems=${systems:+$systems,}$rdir/$name
  done
  [ -f "$rdir/fp32am-fp32lm/rescore-summary.json" ] || die "no $rdir/fp32am-fp32lm; run stage 11 first"
  "$k2quant" report --systems "$systems" --out "$rdir/systems.md" \
    --title "$corpus_title: AM + LM systems (TDNN-F $model_preset epoch $num_epochs avg $avg)"
fi
