"""TDNN-F output feeds k2 the icefall way: segments // 3, DenseFsaVec(allow_truncate=2)."""
import pytest
import torch

k2 = pytest.importorskip("k2")

from k2quant.models.tdnnf import TdnnF, get_preset  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_dense_fsa_vec_accepts_icefall_segments():
    torch.manual_seed(0)
    num_classes = 12
    model = TdnnF(get_preset("small", 80, num_classes)).eval()
    sf = model.subsampling_factor
    # a padded batch of 3 sequences (T = 100), the second holds two supervisions
    x = torch.randn(3, 100, 80)
    with torch.no_grad():
        log_probs = model(x)
    assert log_probs.shape == (3, 34, num_classes)
    # [seq_idx, start_frame, num_frames] in input frames, as lhotse/icefall give them
    sups = [(0, 0, 100), (1, 0, 52), (1, 52, 47), (2, 1, 98), (2, 0, 5)]
    segments = torch.tensor(
        [[s, start // sf, num // sf] for s, start, num in sups], dtype=torch.int32
    )
    segments = segments[torch.argsort(segments[:, 2], descending=True)]
    for seq, start, dur in segments.tolist():
        assert start + dur <= log_probs.shape[1]
    dense = k2.DenseFsaVec(log_probs, segments, allow_truncate=sf - 1)
    assert dense.dim0() == len(sups)
    # any token sequence is allowed by the CTC topology: every segment has a finite score
    graph = k2.arc_sort(k2.create_fsa_vec([k2.ctc_topo(num_classes - 1)] * len(sups)))
    lattice = k2.intersect_dense(graph, dense, output_beam=10.0)
    scores = lattice.get_tot_scores(log_semiring=True, use_double_scores=True)
    assert scores.shape == (len(sups),) and torch.isfinite(scores).all()


@pytest.mark.parametrize("T", [3, 4, 5, 31, 32, 33])
def test_dense_fsa_vec_full_utterance_any_length(T):
    model = TdnnF(get_preset("small", 80, 7)).eval()
    with torch.no_grad():
        log_probs = model(torch.randn(1, T, 80))
    segments = torch.tensor([[0, 0, T // 3]], dtype=torch.int32)
    dense = k2.DenseFsaVec(log_probs, segments, allow_truncate=2)
    assert dense.duration.tolist() == [T // 3]
