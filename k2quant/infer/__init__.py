"""Integer-only inference and zero-shot calibration (issue 6).

- :mod:`k2quant.infer.dyadic`: dyadic multipliers ``m / 2**e`` and rounding shifts.
- :mod:`k2quant.infer.fold`: BatchNorm folding of a TdnnF (float, exact).
- :mod:`k2quant.infer.int_engine`: :class:`IntTdnnF`, the integer engine (int8 GEMMs on the
  CPU) and its bit-exact simulated reference.
- :mod:`k2quant.infer.qtensor`: the ``qtensor`` back end (quint8 tensors end to end through
  fbgemm's static quantized kernels) and its bit-exact simulation.
- :mod:`k2quant.infer.streaming`: edge padding and chunked evaluation.
- :mod:`k2quant.infer.calibrate`: zero-shot synthetic features, activation ranges, PTQ.
- :mod:`k2quant.infer.bench`: fp32 vs integer speed/memory/size benchmark.
"""
from k2quant.infer.dyadic import dyadic_multiplier, rounding_shift
from k2quant.infer.fold import FoldedTdnnF, activation_points, fold_tdnnf
from k2quant.infer.int_engine import ActQuant, IntTdnnF, resolve_backend
from k2quant.infer.streaming import chunked_forward, pad_features

__all__ = [
    "dyadic_multiplier", "rounding_shift", "FoldedTdnnF", "fold_tdnnf", "activation_points",
    "ActQuant", "IntTdnnF", "resolve_backend", "chunked_forward", "pad_features",
]
