"""k2quant: compression toolkit for hybrid LF-MMI speech recognition.

The core (``k2quant.quant``, ``k2quant.nn``, ``k2quant.plan``, ``k2quant.export``, search, LM)
needs only PyTorch. Code that builds or reads FSAs (LF-MMI training, lattices, rescoring) imports
k2 lazily through :func:`k2quant.utils.deps.import_k2`, which explains how to install it.
"""

__version__ = "0.1.0"
