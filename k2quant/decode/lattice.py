"""Decoding lattices: pruned intersection of a decoding graph with network output, 1-best
word sequences, and per-utterance lattice files.

Lattice scores. ``get_lattice`` returns an FsaVec (axes [utt][state][arc]) whose arc
``scores`` are *total* scores: acoustic log-prob of the arc's network column at that frame
plus the decoding graph's arc score. The graph's attributes are propagated to the lattice arcs;
an HLG from :func:`k2quant.decode.graph.compile_hlg` / ``load_hlg`` has ``lm_scores`` (a copy
of its scores: G's LM log-probs plus any L/H weights), so the lattice arcs carry

- ``scores``: total (am + graph),
- ``lm_scores``: the graph part,
- ``aux_labels``: ragged word ids (0 = none, -1 on final arcs),
- ``phones``: the phone id matched inside H o LG (0 on arcs that emit no phone),
- ``labels``: the network column (pdf id) of each arc, -1 on final arcs.

Lattice file format (one file per utterance, ``<out_dir>/<cut_id>.pt``, written atomically
with ``torch.save``) -- a dict::

    {
      "format": "k2quant-lattice-v1",
      "lattice": lat.as_dict(),          # single FSA; k2.Fsa.from_dict(d["lattice"])
      "cut_id": str,
      "words_txt_sha256": str | None,    # hash of the words.txt giving aux_labels' meaning
      "subsampling_factor": int,         # lattice frames are network output frames
      "start_frame": int | None,         # segment start/length in network output frames
      "num_frames": int | None,
      "score_attributes": [...],         # which per-arc score tensors the lattice holds
      ...extra metadata passed by the caller
    }

When the graph had ``lm_scores``, the stored lattice also has ``am_scores = scores -
lm_scores`` so an n-best rescorer can recombine ``am_scores + lm_scale * new_lm_scores``
without knowing the graph. Read with :func:`load_lattice` (one) or :func:`load_lattices`
(several, as an FsaVec). Never pickle ``k2.Fsa`` objects directly (not reliable).
"""
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from k2quant.utils.deps import import_k2
from k2quant.utils.io import PathLike, atomic_torch_save, load_trusted

log = logging.getLogger(__name__)

Fsa = Any  # k2.Fsa (k2 is imported lazily)
LATTICE_FORMAT = "k2quant-lattice-v1"


def subsample_segments(supervision_segments: torch.Tensor, subsampling_factor: int) -> torch.Tensor:
    """Map ``[seq_idx, start_frame, num_frames]`` rows from input frames to network-output
    frames (``start // sf``, ``num_frames // sf``; as icefall). Returns int32 on CPU."""
    seg = supervision_segments.to(device="cpu", dtype=torch.int64).clone()
    if subsampling_factor < 1:
        raise ValueError(f"subsampling_factor must be >= 1, got {subsampling_factor}")
    seg[:, 1:] = torch.div(seg[:, 1:], subsampling_factor, rounding_mode="floor")
    return seg.to(torch.int32)


def _check_segments(nnet_output: torch.Tensor, segments: torch.Tensor, allow_truncate: int) -> None:
    if nnet_output.ndim != 3:
        raise ValueError(
            f"nnet_output must be a 3-D tensor (N, T, C) of log-probs, got shape "
            f"{tuple(nnet_output.shape)}"
        )
    if not nnet_output.dtype.is_floating_point:
        raise ValueError(f"nnet_output must be floating point, got {nnet_output.dtype}")
    if segments.ndim != 2 or segments.shape[1] != 3:
        raise ValueError(
            f"supervision_segments must have shape (S, 3) with rows [seq_idx, start_frame, "
            f"num_frames], got {tuple(segments.shape)}"
        )
    if segments.dtype != torch.int32 or segments.device.type != "cpu":
        raise ValueError(
            f"supervision_segments must be an int32 CPU tensor, got {segments.dtype} on "
            f"{segments.device}; use segments.to(device='cpu', dtype=torch.int32)"
        )
    N, T, _ = nnet_output.shape
    seq, start, dur = segments[:, 0], segments[:, 1], segments[:, 2]
    if segments.shape[0] == 0:
        raise ValueError("supervision_segments is empty; nothing to decode")
    if bool((seq < 0).any()) or bool((seq >= N).any()):
        raise ValueError(f"supervision_segments seq_idx must be in [0, {N}), got {seq.tolist()}")
    if bool((dur <= 0).any()) or bool((start < 0).any()) or bool((start >= T).any()):
        raise ValueError(
            f"supervision_segments need 0 <= start_frame < T={T} and num_frames > 0, got "
            f"{segments.tolist()}"
        )
    too_long = (start + dur) > T + allow_truncate
    if bool(too_long.any()):
        raise ValueError(
            f"supervision segments {segments[too_long].tolist()} end after the network output "
            f"(T={T}, allow_truncate={allow_truncate}); were the segments divided by the "
            f"subsampling factor (see subsample_segments) and is subsampling_factor right?"
        )


def get_lattice(
    nnet_output: torch.Tensor,
    decoding_graph: Fsa,
    supervision_segments: torch.Tensor,
    *,
    search_beam: float = 20,
    output_beam: float = 8,
    min_active_states: int = 30,
    max_active_states: int = 10000,
    subsampling_factor: int = 1,
) -> Fsa:
    """Pruned intersection of ``decoding_graph`` with the network output.

    Args:
      nnet_output: 3-D tensor of dtype torch.float32 with shape (N, T, C): log-probs, C =
        the number of network output columns (= lang ``num_pdfs``).
      decoding_graph: an arc-sorted single FSA (e.g. HLG from :func:`load_hlg`) whose labels
        are columns of ``nnet_output``.
      supervision_segments: 2-D int32 CPU tensor (S, 3) of rows ``[seq_idx, start_frame,
        num_frames]`` in *network output* frames (already divided by the subsampling
        factor, see :func:`subsample_segments`). Row order defines the lattice order; it
        need not be sorted for decoding.
      search_beam, output_beam, min_active_states, max_active_states: as in
        ``k2.intersect_dense_pruned``.
      subsampling_factor: the model's; segments may overrun T by up to
        ``subsampling_factor - 1`` frames (rounding), which are truncated.
    Returns:
      An FsaVec lattice with axes [utt][state][arc], one FSA per segment row (see the module
      docstring for its attributes).

    Caution:
      ``decoding_graph`` must be arc-sorted and on the device of ``nnet_output``.
    """
    k2 = import_k2()
    allow_truncate = int(subsampling_factor) - 1
    if allow_truncate < 0:
        raise ValueError(f"subsampling_factor must be >= 1, got {subsampling_factor}")
    _check_segments(nnet_output, supervision_segments, allow_truncate)
    if decoding_graph.properties & k2.fsa_properties.ARC_SORTED == 0:
        raise ValueError("decoding_graph must be arc-sorted: use k2.arc_sort(graph) (or load_hlg)")
    C = nnet_output.shape[2]
    max_label = int(decoding_graph.labels.max()) if decoding_graph.num_arcs else -1
    if max_label >= C:
        raise ValueError(
            f"decoding_graph uses label {max_label} but nnet_output has only {C} columns; "
            f"the graph and the model disagree on num_pdfs"
        )
    dense = k2.DenseFsaVec(nnet_output, supervision_segments, allow_truncate=allow_truncate)
    return k2.intersect_dense_pruned(
        decoding_graph,
        dense,
        search_beam=search_beam,
        output_beam=output_beam,
        min_active_states=min_active_states,
        max_active_states=max_active_states,
    )


def best_paths(lattice: Fsa, use_double_scores: bool = True) -> Fsa:
    """``k2.shortest_path`` of each lattice (an FsaVec of linear FSAs)."""
    k2 = import_k2()
    return k2.shortest_path(lattice, use_double_scores=use_double_scores)


def path_aux_labels(paths: Fsa) -> List[List[int]]:
    """The aux_labels (word ids) along each path of an FsaVec, without 0s and -1s."""
    k2 = import_k2()
    aux = paths.aux_labels
    if isinstance(aux, torch.Tensor):
        ragged = k2.RaggedTensor(paths.arcs.shape().remove_axis(1), aux)
        ragged = ragged.remove_values_leq(0)
    else:
        values = aux.remove_values_leq(0)
        shape = paths.arcs.shape().compose(values.shape)
        shape = shape.remove_axis(1).remove_axis(1)  # drop the state and arc axes
        ragged = k2.RaggedTensor(shape, values.values)
    return ragged.tolist()


def one_best(lattice: Fsa, use_double_scores: bool = True) -> List[List[int]]:
    """Word ids of the best path of each lattice (in lattice order); [] for empty lattices."""
    if len(lattice.shape) != 3:
        raise ValueError("one_best expects an FsaVec (axes [utt][state][arc]), got a single FSA; "
                         "use k2.create_fsa_vec([lattice])")
    return path_aux_labels(best_paths(lattice, use_double_scores=use_double_scores))


def ids_to_words(hyps: Sequence[Sequence[int]], id2word: Dict[int, str]) -> List[List[str]]:
    """Map word ids to words (``id2word``: e.g. inverted words.txt)."""
    try:
        return [[id2word[i] for i in h] for h in hyps]
    except KeyError as e:
        raise ValueError(f"word id {e.args[0]} is not in the word table "
                         f"({len(id2word)} entries); is it the words.txt of the graph?") from e


# --------------------------------------------------------------------------- lattice I/O


def _check_cut_id(cut_id: str) -> None:
    if not cut_id or cut_id in (".", "..") or "/" in cut_id or (os.sep in cut_id) or "\0" in cut_id:
        raise ValueError(f"cut id {cut_id!r} cannot be used as a file name (contains a path "
                         f"separator or is empty)")


def save_lattices(
    lattice: Fsa,
    cut_ids: Sequence[str],
    out_dir: PathLike,
    *,
    words_txt: Optional[PathLike] = None,
    words_txt_sha256: Optional[str] = None,
    subsampling_factor: int = 1,
    supervision_segments: Optional[torch.Tensor] = None,
    extra_meta: Optional[Dict[str, Any]] = None,
) -> List[Path]:
    """Write one ``<out_dir>/<cut_id>.pt`` per lattice (format in the module docstring).

    Args:
      lattice: FsaVec from :func:`get_lattice`.
      cut_ids: one id per lattice, in lattice order (= the row order of the
        supervision segments, which may differ from the batch order).
      words_txt / words_txt_sha256: the word table (or its hash) the aux_labels refer to.
      subsampling_factor: recorded so tools can map lattice frames to input frames.
      supervision_segments: the (subsampled) segments given to :func:`get_lattice`, to record
        each lattice's start frame and length.
      extra_meta: further JSON-able metadata stored in every file.
    Returns:
      The written paths, in lattice order.
    """
    if len(lattice.shape) != 3:
        raise ValueError("save_lattices expects an FsaVec (axes [utt][state][arc])")
    n = lattice.shape[0]
    if len(cut_ids) != n:
        raise ValueError(f"got {len(cut_ids)} cut ids for {n} lattices; pass one id per lattice "
                         f"in supervision-segment order")
    if len(set(cut_ids)) != n:
        raise ValueError("cut_ids contain duplicates; each lattice needs its own file")
    if supervision_segments is not None and supervision_segments.shape[0] != n:
        raise ValueError(f"supervision_segments has {supervision_segments.shape[0]} rows for "
                         f"{n} lattices")
    if words_txt is not None and words_txt_sha256 is None:
        from k2quant.decode.graph import file_sha256

        words_txt_sha256 = file_sha256(words_txt)
    k2 = import_k2()
    out_dir = Path(out_dir)
    lattice = lattice.detach().to("cpu")
    paths = []
    for i, cut_id in enumerate(cut_ids):
        _check_cut_id(cut_id)
        # (lattice[i] fails for an empty FSA of an FsaVec with ragged attributes; index_fsa
        # handles every case)
        lat = k2.index_fsa(lattice, torch.tensor([i], dtype=torch.int32))[0]
        score_attrs = ["scores"]
        if hasattr(lat, "lm_scores"):
            lat.am_scores = lat.scores - lat.lm_scores
            score_attrs += ["lm_scores", "am_scores"]
        seg = None if supervision_segments is None else supervision_segments[i].tolist()
        payload = {
            "format": LATTICE_FORMAT,
            "lattice": lat.as_dict(),
            "cut_id": cut_id,
            "words_txt_sha256": words_txt_sha256,
            "subsampling_factor": int(subsampling_factor),
            "start_frame": None if seg is None else int(seg[1]),
            "num_frames": None if seg is None else int(seg[2]),
            "score_attributes": score_attrs,
            **(extra_meta or {}),
        }
        path = out_dir / f"{cut_id}.pt"
        atomic_torch_save(payload, path)
        paths.append(path)
    return paths


def empty_fsa() -> Fsa:
    """A single FSA with no states and no arcs (``k2.Fsa.from_dict`` cannot build one)."""
    k2 = import_k2()
    return k2.connect(k2.Fsa.from_str("0 1 1 0\n2"))


def fsa_from_dict(d: Dict[str, Any]) -> Fsa:
    """``k2.Fsa.from_dict``, also for empty lattices (whose ``as_dict()`` has 0 arcs)."""
    k2 = import_k2()
    arcs = d["arcs"]
    if isinstance(arcs, torch.Tensor) and arcs.ndim == 2 and arcs.shape[0] == 0:
        fsa = empty_fsa()
        for name, value in d.items():
            if name == "arcs":
                continue
            if isinstance(value, torch.Tensor) and value.numel() == 0:
                setattr(fsa, name, value)
            elif isinstance(value, k2.RaggedTensor) and value.dim0 == 0:
                setattr(fsa, name, value)
        if not hasattr(fsa, "aux_labels"):
            fsa.aux_labels = torch.zeros(0, dtype=torch.int32)
        return fsa
    return k2.Fsa.from_dict(d)


def load_lattice(path: PathLike, *, words_txt_sha256: Optional[str] = None) -> Tuple[Fsa, dict]:
    """Read a file written by :func:`save_lattices`: ``(single k2.Fsa, metadata dict)``.

    If ``words_txt_sha256`` is given, it must match the file's (else ``ValueError``).
    """
    d = load_trusted(path)
    if not isinstance(d, dict) or d.get("format") != LATTICE_FORMAT or "lattice" not in d:
        got = d.get("format") if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"{path}: not a k2quant lattice file (expected format "
                         f"{LATTICE_FORMAT!r}, got {got!r})")
    meta = {k: v for k, v in d.items() if k != "lattice"}
    stored = meta.get("words_txt_sha256")
    if words_txt_sha256 is not None and stored not in (None, words_txt_sha256):
        raise ValueError(f"{path}: lattice word ids come from a words.txt with sha256 "
                         f"{stored}, but {words_txt_sha256} was expected; "
                         f"decode and rescore with the same lang dir")
    return fsa_from_dict(d["lattice"]), meta


def load_lattices(paths: Sequence[PathLike], **kw) -> Tuple[Fsa, List[dict]]:
    """Load several lattice files into one FsaVec (in the given order) plus their metadata."""
    k2 = import_k2()
    if not paths:
        raise ValueError("load_lattices: no paths given")
    lats, metas = zip(*(load_lattice(p, **kw) for p in paths))
    return k2.create_fsa_vec(list(lats)), list(metas)


def lattice_path(out_dir: PathLike, cut_id: str) -> Path:
    """Where :func:`save_lattices` puts the lattice of ``cut_id``."""
    _check_cut_id(cut_id)
    return Path(out_dir) / f"{cut_id}.pt"


__all__ = [
    "LATTICE_FORMAT",
    "subsample_segments",
    "get_lattice",
    "best_paths",
    "path_aux_labels",
    "one_best",
    "ids_to_words",
    "save_lattices",
    "load_lattice",
    "fsa_from_dict",
    "load_lattices",
    "lattice_path",
]
