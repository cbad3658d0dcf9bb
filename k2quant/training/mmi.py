"""LF-MMI loss on k2 (icefall ``mmi.py`` semantics, chain or CTC topology).

Inputs follow k2/icefall:

* ``log_probs``: 3-D ``torch.float32`` tensor ``(N, T, C)``, the acoustic model's output
  (normally log-softmax; LF-MMI also works with unnormalised outputs). ``C`` must equal the
  lang's ``num_pdfs``; a graph arc with label ``l`` reads column ``l`` (``k2.DenseFsaVec``
  convention). For the chain topology column 0 is unused; for CTC it is the blank.
* ``supervision_segments``: ``(S, 3)`` ``torch.int32`` CPU tensor, rows
  ``[seq_idx, start_frame, num_frames]`` already divided by the subsampling factor. Any
  order: the loss sorts them by decreasing ``num_frames`` (as ``k2.intersect_dense`` needs) and
  permutes ``texts`` with them.
* ``texts``: ``S`` word transcripts (whitespace-separated), one per segment.

Per segment ``num_tot = log sum_{paths in num graph} exp(graph + acoustic score)`` and likewise
``den_tot`` (``get_tot_scores(log_semiring=True, use_double_scores=True)``); the loss is

    loss = -sum_s (num_tot[s] - den_scale * den_tot[s])     (+ xent_regularize * xent)

summed, not normalised (divide by ``info["num_frames"]`` for a per-frame value). Segments whose
num or den score is not finite (e.g. too few frames for the transcript: each chain phone needs
at least one frame) are dropped from the loss and counted in ``info["num_dropped"]``; the loss
is then recomputed on the remaining segments, so no NaN or inf reaches the gradients.

The gradient of ``num_tot`` w.r.t. ``log_probs[n, t, c]`` is the numerator occupation posterior
of pdf ``c`` at frame ``t`` (it sums to 1 over ``c`` on every frame of a segment and is 0 off the
segments); likewise for ``den_tot``. Hence ``d(-loss)/d log_probs = gamma_num - den_scale *
gamma_den``, whose per-frame sums are ``1 - den_scale`` (0 for the usual ``den_scale=1``),
whether or not ``log_probs`` is log-softmax normalised.

Leaky HMM (``leaky_hmm > 0``; Kaldi's ``--chain.leaky-hmm-coefficient``): Kaldi adds, after
every frame of the den forward-backward, ``leaky_hmm * (sum of all alphas) * init(s)`` to each
state ``s``, ``init`` being the state occupancy averaged over 100 steps of the normalised HMM
started in the start state. We build the same thing into the den FSA so that exact k2
intersection still applies: every emitting arc ``s -> d`` gets a copy ``s -> LEAK`` with
``+log(leaky_hmm)``, and the extra state ``LEAK`` has a copy of every arc (and final arc) of each
state ``q`` with ``+log init(q)`` (plus, for emitting arcs, a copy into ``LEAK`` again with
``+log(leaky_hmm)``). Summed over paths this is exactly Kaldi's recursion
``alpha_t = alpha'_t + leaky_hmm * sum(alpha'_t) * init`` (tested), with about 4x the den arcs.
The numerator is not leaky.

Regulariser (``xent_regularize > 0``): Kaldi's cross-entropy branch, ``-sum_t sum_c
gamma_num[t, c] * xent_log_probs[t, c]`` with the numerator posteriors ``gamma_num`` (detached)
as soft targets; pass the xent head's output as ``xent_log_probs`` (default: ``log_probs``).
"""
import logging
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from k2quant.utils.deps import import_k2

logger = logging.getLogger(__name__)


def den_initial_probs(den_graph, num_iters: int = 100) -> torch.Tensor:
    """Average state occupancy of the den HMM over ``num_iters`` steps from the start state.

    Arc probabilities are the exponentiated scores normalised over each state's emitting arcs
    (as Kaldi's ``DenominatorGraph::SetInitialProbs``). Returns a float64 vector over states
    (the final state gets 0) summing to 1.
    """
    arcs = den_graph.arcs.values().long().cpu()
    scores = den_graph.scores.detach().double().cpu()
    num_states = int(den_graph.shape[0])
    emit = arcs[:, 2] != -1
    src, dst, sc = arcs[emit, 0], arcs[emit, 1], scores[emit]
    # per-state normaliser (float64; a global shift is enough for LM-sized log-probs)
    e = torch.exp(sc - sc.max()) if sc.numel() else sc
    z = torch.zeros(num_states, dtype=torch.float64).index_add_(0, src, e)
    prob = e / z[src]
    cur = torch.zeros(num_states, dtype=torch.float64)
    cur[0] = 1.0
    avg = torch.zeros_like(cur)
    for _ in range(num_iters):
        nxt = torch.zeros_like(cur).index_add_(0, dst, cur[src] * prob)
        s = nxt.sum()
        cur = nxt / s if s > 0 else nxt
        avg += cur
    tot = avg.sum()
    if tot <= 0:
        avg[0] = 1.0
        tot = avg.sum()
    return avg / tot


def add_leaky_arcs(den_graph, leaky_hmm: float, num_iters: int = 100):
    """The den graph with a Kaldi-style leaky-HMM state (see the module docstring).

    Args:
      den_graph: single k2 Fsa (labels = pdf ids, aux_labels = phone ids).
      leaky_hmm: leak probability, e.g. 0.1 (Kaldi's ``leaky-hmm-coefficient``).

    Returns:
      A new arc-sorted Fsa with one more state (``LEAK``) and about 4x the arcs.
    """
    k2 = import_k2()
    if not leaky_hmm > 0:
        raise ValueError(f"leaky_hmm must be > 0, got {leaky_hmm}")
    device = den_graph.device
    g = den_graph.to("cpu")
    init = den_initial_probs(g, num_iters)
    arcs = g.arcs.values().clone()  # (num_arcs, 4) int32: src, dst, label, score bits
    scores = g.scores.detach().float().clone()
    aux = g.aux_labels.clone()
    num_states = int(g.shape[0])
    final = num_states - 1  # k2: the final state is the last one
    leak = final
    new_final = final + 1

    src, dst, lab = arcs[:, 0], arcs[:, 1], arcs[:, 2]
    dst = torch.where(dst == final, torch.full_like(dst, new_final), dst)
    emit = lab != -1

    # 1) original arcs; 2) emitting copies into LEAK
    parts = [(src, dst, lab, scores, aux)]
    parts.append((src[emit], torch.full_like(dst[emit], leak), lab[emit],
                  scores[emit] + math.log(leaky_hmm), aux[emit]))
    # 3) LEAK's arcs: copies of each state's arcs weighted by init(q), and 4) their leaking
    # copies back into LEAK (mass that left LEAK leaks again on the next frame, as in Kaldi)
    keep = init[src.long()] > 0
    w = torch.log(init[src.long()][keep]).float()
    parts.append((torch.full_like(src[keep], leak), dst[keep], lab[keep],
                  scores[keep] + w, aux[keep]))
    ke = keep & emit
    we = torch.log(init[src.long()][ke]).float()
    parts.append((torch.full_like(src[ke], leak), torch.full_like(dst[ke], leak), lab[ke],
                  scores[ke] + we + math.log(leaky_hmm), aux[ke]))
    s_all = torch.cat([p[0] for p in parts])
    d_all = torch.cat([p[1] for p in parts])
    l_all = torch.cat([p[2] for p in parts])
    sc_all = torch.cat([p[3] for p in parts])
    a_all = torch.cat([p[4] for p in parts])
    order = torch.argsort(s_all * (new_final + 1) + d_all, stable=True)
    new_arcs = torch.stack(
        [s_all[order], d_all[order], l_all[order], sc_all[order].contiguous().view(torch.int32)],
        dim=1,
    ).to(torch.int32)
    out = k2.Fsa(new_arcs, aux_labels=a_all[order].contiguous())
    out = k2.arc_sort(out)
    out.scores.requires_grad_(False)
    return out.to(device)


class LFMMILoss(nn.Module):
    """Lattice-free MMI loss (see the module docstring for inputs and semantics).

    Args:
      graph_compiler: a :class:`k2quant.training.graph_compiler.MmiGraphCompiler`.
      den_scale: weight of the denominator term.
      use_pruned_intersect: den via ``k2.intersect_dense_pruned`` (search_beam, output_beam,
        min/max_active_states) instead of the exact ``k2.intersect_dense`` (output_beam).
      leaky_hmm: Kaldi leaky-HMM coefficient for the den graph (0 = off; 7q uses 0.1).
      xent_regularize: weight of the cross-entropy regulariser (0 = off; 7q uses 0.1).
      den_output_beam: output beam of the den lattice. ``get_tot_scores`` runs on the pruned
        lattice, so this slightly underestimates ``den_tot``; ``math.inf`` is exact. Measured
        on 16 x 150 frames, 40 phones, random outputs: beam 10 (icefall's value) loses ~3 nats
        per sequence on flat outputs (~0.15 on peaky ones), beam 20 < 0.001, at ~2-3x the
        time of beam 10 on flat outputs and ~1.5x on peaky ones; inf costs 1.5-4x more again.
        On CPU the pruned variant is slower than the exact one.
      num_output_beam: the same for the numerator (default ``math.inf``; num graphs are small).
      search_beam, min_active_states, max_active_states: for the pruned den.
      allow_truncate: passed to ``k2.DenseFsaVec`` (segments may overrun T by this many frames).

    ``forward(log_probs, supervision_segments, texts, xent_log_probs=None)`` returns
    ``(loss, info)``: ``loss`` is a 0-d float64 tensor (sum over kept segments; multiply or add
    it to float32 losses freely) and ``info`` a dict with
    ``loss``, ``num_tot``, ``den_tot`` (sums over kept segments), ``num_frames`` (frames of the
    kept segments), ``num_segments``, ``num_dropped``, ``dropped`` (indices into the input
    segments), ``num_oov_words`` and, if enabled, ``xent``.
    """

    def __init__(
        self,
        graph_compiler,
        *,
        den_scale: float = 1.0,
        use_pruned_intersect: bool = False,
        leaky_hmm: float = 0.0,
        xent_regularize: float = 0.0,
        den_output_beam: float = 20.0,
        num_output_beam: float = math.inf,
        search_beam: float = 20.0,
        min_active_states: int = 30,
        max_active_states: int = 10000,
        allow_truncate: int = 0,
    ):
        super().__init__()
        k2 = import_k2()
        self.graph_compiler = graph_compiler
        self.den_scale = float(den_scale)
        self.use_pruned_intersect = use_pruned_intersect
        self.leaky_hmm = float(leaky_hmm)
        self.xent_regularize = float(xent_regularize)
        self.den_output_beam = den_output_beam
        self.num_output_beam = num_output_beam
        self.search_beam = search_beam
        self.min_active_states = min_active_states
        self.max_active_states = max_active_states
        self.allow_truncate = allow_truncate
        den = graph_compiler.den_graph
        if self.leaky_hmm > 0:
            den = add_leaky_arcs(den, self.leaky_hmm)
        self.den_graph = den
        self._den_vec = k2.create_fsa_vec([den])

    @property
    def num_pdfs(self) -> int:
        return self.graph_compiler.lang.num_pdfs

    def _check(self, log_probs, segments, texts):
        if log_probs.dim() != 3:
            raise ValueError(f"log_probs must be 3-D (N, T, C), got shape {tuple(log_probs.shape)}")
        if log_probs.dtype != torch.float32:
            raise ValueError(
                f"log_probs must be torch.float32 (k2.DenseFsaVec), got {log_probs.dtype}; "
                "call .float() on the network output"
            )
        if log_probs.shape[2] != self.num_pdfs:
            raise ValueError(
                f"log_probs has {log_probs.shape[2]} columns but the lang's topology needs "
                f"num_pdfs={self.num_pdfs} ({self.graph_compiler.lang.topo_kind}); build the "
                "model with num_classes=lang.num_pdfs"
            )
        if (
            segments.dim() != 2 or segments.shape[1] != 3 or segments.dtype != torch.int32
            or segments.device.type != "cpu"
        ):
            raise ValueError(
                "supervision_segments must be an (S, 3) torch.int32 CPU tensor "
                f"[seq_idx, start, num_frames], got {tuple(segments.shape)} {segments.dtype} "
                f"on {segments.device}"
            )
        if len(texts) != segments.shape[0]:
            raise ValueError(
                f"need one text per supervision segment: {segments.shape[0]} segments, "
                f"{len(texts)} texts"
            )

    def _tot_scores(self, log_probs, segments, num_graphs):
        """num_tot and den_tot (float64, shape (S,)) for segments sorted by decreasing length."""
        k2 = import_k2()
        dense = k2.DenseFsaVec(log_probs, segments, allow_truncate=self.allow_truncate)
        num_lats = k2.intersect_dense(num_graphs, dense, output_beam=self.num_output_beam)
        num_tot = num_lats.get_tot_scores(log_semiring=True, use_double_scores=True)
        if self.use_pruned_intersect:
            den_lats = k2.intersect_dense_pruned(
                self._den_vec, dense, search_beam=self.search_beam,
                output_beam=self.den_output_beam, min_active_states=self.min_active_states,
                max_active_states=self.max_active_states,
            )
        else:
            idx = torch.zeros(segments.shape[0], dtype=torch.int32, device=self._den_vec.device)
            den_lats = k2.intersect_dense(
                k2.index_fsa(self._den_vec, idx), dense, output_beam=self.den_output_beam
            )
        den_tot = den_lats.get_tot_scores(log_semiring=True, use_double_scores=True)
        return num_tot, den_tot

    def forward(
        self,
        log_probs: torch.Tensor,
        supervision_segments: torch.Tensor,
        texts: Sequence[str],
        xent_log_probs: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Dict]:
        k2 = import_k2()
        self._check(log_probs, supervision_segments, texts)
        if self._den_vec.device != log_probs.device:
            self._den_vec = self._den_vec.to(log_probs.device)
        S = supervision_segments.shape[0]
        order = torch.argsort(-supervision_segments[:, 2].long(), stable=True)
        segs = supervision_segments[order]
        txts = [texts[i] for i in order.tolist()]
        oov_before = self.graph_compiler.num_oov_words

        num_graphs = self.graph_compiler.compile_num(txts)
        oov = self.graph_compiler.num_oov_words - oov_before
        num_tot, den_tot = self._tot_scores(log_probs, segs, num_graphs)
        ok = torch.isfinite(num_tot.detach()) & torch.isfinite(den_tot.detach())
        ok = ok.cpu()
        dropped: List[int] = sorted(order[~ok].tolist())
        if not bool(ok.all()):
            logger.warning(
                "LF-MMI: dropping %d/%d segments with non-finite num/den score (too short for "
                "the transcript?): %s", len(dropped), S, dropped,
            )
            segs = segs[ok]
            txts = [t for t, k in zip(txts, ok.tolist()) if k]
            if len(txts) > 0:
                keep = torch.nonzero(ok).flatten().to(torch.int32).to(num_graphs.device)
                num_graphs = k2.index_fsa(num_graphs, keep)
                num_tot, den_tot = self._tot_scores(log_probs, segs, num_graphs)

        if len(txts) == 0:
            zero = log_probs.sum() * 0.0
            info = dict(loss=0.0, num_tot=0.0, den_tot=0.0, num_frames=0, num_segments=0,
                        num_dropped=len(dropped), dropped=dropped, num_oov_words=oov)
            return zero, info

        tot = num_tot - self.den_scale * den_tot
        loss = -tot.sum()
        T = log_probs.shape[1]
        frames = (torch.clamp(segs[:, 1] + segs[:, 2], max=T) - segs[:, 1]).sum().item()
        info = dict(
            num_tot=float(num_tot.detach().sum()),
            den_tot=float(den_tot.detach().sum()),
            num_frames=int(frames),
            num_segments=len(txts),
            num_dropped=len(dropped),
            dropped=dropped,
            num_oov_words=oov,
        )
        if self.xent_regularize > 0:
            xent = self._xent(log_probs, segs, num_graphs, num_tot, xent_log_probs)
            info["xent"] = float(xent.detach())
            loss = loss + self.xent_regularize * xent
        info["loss"] = float(loss.detach())
        return loss, info

    def _xent(self, log_probs, segs, num_graphs, num_tot, xent_log_probs):
        """-sum gamma_num * xent_log_probs with detached numerator posteriors gamma_num."""
        if num_tot.requires_grad and log_probs.requires_grad:
            (gamma,) = torch.autograd.grad(num_tot.sum(), log_probs, retain_graph=True)
        else:
            lp = log_probs.detach().requires_grad_(True)
            with torch.enable_grad():
                k2 = import_k2()
                dense = k2.DenseFsaVec(lp, segs, allow_truncate=self.allow_truncate)
                lats = k2.intersect_dense(num_graphs, dense, output_beam=self.num_output_beam)
                tot = lats.get_tot_scores(log_semiring=True, use_double_scores=True)
                (gamma,) = torch.autograd.grad(tot.sum(), lp)
        target = xent_log_probs if xent_log_probs is not None else log_probs
        if target.shape != log_probs.shape:
            raise ValueError(
                f"xent_log_probs must have the shape of log_probs {tuple(log_probs.shape)}, "
                f"got {tuple(target.shape)}"
            )
        return -(gamma.detach().to(target.dtype) * target).sum()
