"""Corpus preparation and features (lhotse manifests, icefall layout).

- :mod:`k2quant.data.an4`: the CMU AN4 corpus -> manifests, speaker-disjoint dev, lexicon.
- :mod:`k2quant.data.mini`: the embedded default corpus, synthesised offline with eSpeak NG.
- :mod:`k2quant.data.features`: lhotse fbank -> ``cuts_{split}.jsonl.gz``.
- :mod:`k2quant.data.cuts`: cut filtering, OOV mapping, NaN/Inf feature checks.
- :mod:`k2quant.data.lexicon`, :mod:`k2quant.data.manifests`: file formats and names.

lhotse, soundfile and espeakng-loader are imported inside the functions that need them, so
``import k2quant.data.<module>`` works without them.
"""
