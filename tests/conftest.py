"""Test-suite settings.

Most tests use small tensors, for which torch's intra-op threading costs more than it saves
(and several pytest processes may share the 2 cores of a development machine). Tests run with
one thread unless K2QUANT_TEST_THREADS says otherwise; benchmarks live in tools/, not here.
"""
import os

import torch

torch.set_num_threads(int(os.environ.get("K2QUANT_TEST_THREADS", "1")))
