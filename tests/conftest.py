"""Test-suite settings.

Most tests use small tensors, for which torch's intra-op threading costs more than it saves
(and several pytest processes may share the 2 cores of a development machine). Tests run with
one thread unless K2QUANT_TEST_THREADS says otherwise; benchmarks live in tools/, not here.
"""
import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("K2QUANT_TEST_THREADS", "1")))


def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Modules with small tensors opt in with ``pytestmark = pytest.mark.usefixtures(...)``: one
# intra-op thread (restored afterwards) avoids oversubscription on a busy 2-core machine.
one_thread = pytest.fixture(_single_thread, name="one_thread")
one_thread_module = pytest.fixture(_single_thread, scope="module", name="one_thread_module")
