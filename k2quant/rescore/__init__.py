"""N-best rescoring of k2 lattices with a (quantized) neural LM.

- :mod:`k2quant.rescore.nbest`: lattice files -> n-best lists -> LM scores -> best hypothesis
  per (lm_scale, ngram_scale) setting (one LM pass for all settings).
- :mod:`k2quant.rescore.run`: the ``k2quant rescore`` driver (files, WER, summary JSON).

Both need k2 at call time only (imported lazily).
"""
