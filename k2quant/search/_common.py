"""Helpers shared by the search results (:class:`~k2quant.search.allocate.Allocation`,
:class:`~k2quant.search.nas.NasResult`): checking a model against the searched layers and
re-factorising its TDNN-F bottlenecks, and the constants both use."""
from typing import Any, Dict, Iterable, List, Mapping

from torch import nn

from k2quant.plan import quantizable_layers

DEFAULT_CANDIDATE_BITS = (1, 2, 3, 4, 6, 8)
BUDGET_KINDS = ("avg_bits", "size_bytes", "ratio")


def check_model_has_layers(model: nn.Module, layers: Iterable[str], what: str) -> None:
    """Raise ``ValueError`` naming the ``layers`` that ``model`` has no quantizable layer for
    (``what``: the result's name in the message, e.g. ``"allocation"``)."""
    have = set(quantizable_layers(model))
    missing = [n for n in layers if n not in have]
    if missing:
        raise ValueError(
            f"the {what} names layers the model lacks: {missing}; the model's "
            f"quantizable layers are {sorted(have)}"
        )


def apply_bottleneck_dims(model: nn.Module, dims: Mapping[str, int],
                          what: str) -> List[Dict[str, Any]]:
    """Re-factorise ``model``'s TDNN-F pairs to ``dims`` in place; layers already at their dim
    are left alone. Returns the ``refactor_bottleneck`` infos of the changed layers."""
    if not dims:
        return []
    if not hasattr(model, "refactor_bottleneck"):
        raise ValueError(
            f"the {what} changes bottleneck dims {dims} but the model "
            f"({type(model).__name__}) has no refactor_bottleneck()"
        )
    names = model.tdnnf_layer_names()
    unknown = [p for p in dims if p not in names]
    if unknown:
        raise ValueError(f"the {what} names TDNN-F layers the model lacks: {unknown}")
    out = []
    for p, d in dims.items():
        cur = int(model.get_submodule(f"{p}.linear").weight.shape[0])
        if d != cur:
            out.append(model.refactor_bottleneck(p, int(d)))
    return out
