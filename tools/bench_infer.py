#!/usr/bin/env python3
"""fp32 vs integer-only TDNN-F inference benchmark (thin wrapper of k2quant.infer.bench).

    python tools/bench_infer.py --preset small --preset kaldi_7q --threads 1,2

Same options as ``k2quant bench --help``.
"""
import sys

from k2quant.bin.bench import main

if __name__ == "__main__":
    sys.exit(main())
