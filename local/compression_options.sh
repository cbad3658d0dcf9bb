#!/usr/bin/env bash
# Defaults and help of the options of stages 7-12 (local/compression_stages.sh), shared by the
# recipes. Source it among the recipe's defaults (before parse_options.sh); the recipe then
# sets its own compress_runs, compress_runs_full and system_am.
# --- compression of the acoustic model (stages 7-8) ---
# Runs, in order, each into $exp_dir/compress/NAME; NAME is one of
#   uniformB            every layer at B bits (method uniform)
#   M-rX                mixed precision by M (hessian|kl|nas) at on-disk ratio X vs fp32
#   M-bX                mixed precision by M at X average bits
#   M-uBsize            mixed precision by M at the file size of uniformB (run uniformB first)
#   M-sub-rX            M (hessian|kl) + TDNN-F bottleneck dims (--subspace) at ratio X
compress_sens_utts=100   # training utterances of the sensitivity (and NAS)
compress_sens_samples=8  # Hutchinson probes per batch (hessian)
compress_qat_epochs=2
# --- Transformer LM and lattice rescoring (stages 9-12) ---
lm_text=             # a larger LM text corpus (plain, one sentence per line) [default: the
                     # training transcripts]; held-out perplexity is on the scored split
lm_epochs=20
lm_preset=small
lm_compress_method=kl
lm_ratio=12          # on-disk compression of the LM (~2 average bits)
lm_qat_epochs=10
rescore_lm_scales=0.1,0.2,0.3,0.4,0.5,0.7,1.0
rescore_ngram_scale=1
rescore_num_paths=100

# The help lines of these options (call when building help_message, after the recipe's own
# compress_runs / compress_runs_full / system_am are set).
compression_help() {
  echo "  --compress-runs \"NAME ...\" [$compress_runs]
                               uniformB | M-rX | M-bX | M-uBsize | M-sub-rX (M: hessian|kl|nas);
                               full table: --compress-runs \"$compress_runs_full\"
  --compress-sens-utts N [$compress_sens_utts]  --compress-qat-epochs N [$compress_qat_epochs]
  --lm-text FILE  LM training text (plain) [training transcripts]  --lm-epochs N [$lm_epochs]
  --lm-ratio X [$lm_ratio]  --lm-compress-method M [$lm_compress_method]
  --rescore-lm-scales LIST [$rescore_lm_scales]  --rescore-num-paths N [$rescore_num_paths]
  --system-am NAME [$system_am]  compressed AM of the AM+LM system"
}
