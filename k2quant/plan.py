"""Quantization plans: which layer gets which quantizer, and the entry points that apply them.

A :class:`Plan` maps layer names to :class:`LayerConfig` objects::

    plan = Plan(
        {
            "output": LayerConfig(weight_bits=8),          # exact fully-qualified module name
            "re:tdnn\\.\\d+\\.linear": LayerConfig(weight_bits=4, act_bits=8),
            "re:.*embed.*": None,                           # keep these layers float
        },
        default=LayerConfig(weight_bits=6),
    )
    quantize_(model, plan)   # swaps nn.Linear/Conv1d/Embedding/LSTM in place for k2quant.nn modules
    ...                      # quantization-aware training
    convert(model)           # freezes: float weights -> uint8 codes + scales (eval mode)
    plan.save("exp/plan.json")

Precedence (for every quantizable layer, by its fully-qualified module name):

1. an exact key equal to the name;
2. otherwise the ``re:<regex>`` keys **in the order given**; the first whose regex
   ``re.fullmatch``-es the name wins;
3. otherwise ``default``.

The selected value is a :class:`LayerConfig` (quantize the layer with it) or ``None`` (keep the
layer float). A ``None`` default means "layers not named by the plan stay float". Every exact key
must name a quantizable layer and every ``re:`` pattern must match at least one, otherwise
:meth:`Plan.resolve` raises ``ValueError`` listing the quantizable layers (typos do not silently
leave layers float).

Quantizable layers are modules whose type is exactly ``nn.Linear``, ``nn.Conv1d``,
``nn.Embedding`` or ``nn.LSTM`` (subclasses such as icefall's ``ScaledLinear`` or the
``out_proj`` of ``nn.MultiheadAttention`` have different forwards and are not swapped), plus
modules that are already :class:`k2quant.nn.QuantModule`.
"""
import copy
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, Iterator, List, Mapping, NamedTuple, Optional, Tuple, Union

from torch import nn

from k2quant.utils.io import atomic_write_json

PathLike = Union[str, os.PathLike]

__all__ = [
    "LayerConfig",
    "Plan",
    "QuantSpec",
    "quantize_",
    "convert",
    "quantizable_layers",
    "model_size_bytes",
    "QUANTIZER_KINDS",
    "LSTM_LOCATIONS",
]

#: Quantizer kinds known to :func:`k2quant.quant.make_quantizer`.
QUANTIZER_KINDS = ("uniform", "lsq", "pact", "sawb", "general", "binary", "ternary")
#: Kinds whose bit width is fixed by the method.
FIXED_BITS = {"binary": 1, "ternary": 2}
GRANULARITIES = ("channel", "tensor")
#: QuantLSTM quantizer locations configurable through ``LayerConfig.locations``.
LSTM_LOCATIONS = (
    "input",
    "hidden",
    "cell",
    "gate_weights",
    "gate_weights_i",
    "gate_weights_f",
    "gate_weights_g",
    "gate_weights_o",
)
_RESERVED_OPTIONS = ("kind", "bits", "granularity", "ch_axis", "signed", "name")
_LOCATION_KEYS = ("kind", "bits", "granularity", "signed", "options")
PLAN_FORMAT = "k2quant-plan"
PLAN_FORMAT_VERSION = 1
#: The keys of a plan's JSON object.
PLAN_KEYS = ("format", "version", "layers", "default")


def _check_bits(field_name: str, value: Any, allow_none: bool) -> None:
    ok = (value is None and allow_none) or (
        isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 8
    )
    if not ok:
        allowed = "an int in 1..8" + (" or None (float)" if allow_none else "")
        raise ValueError(f"LayerConfig.{field_name} must be {allowed}; received {value!r}")


def _check_kind(field_name: str, value: Any) -> None:
    if value not in QUANTIZER_KINDS:
        raise ValueError(
            f"LayerConfig.{field_name} must be one of {list(QUANTIZER_KINDS)}; received {value!r}"
        )


def _check_fixed_bits(kind_field: str, kind: str, bits_field: str, bits: Optional[int]) -> None:
    if bits is not None and kind in FIXED_BITS and bits != FIXED_BITS[kind]:
        raise ValueError(
            f"LayerConfig.{kind_field}={kind!r} needs {bits_field}={FIXED_BITS[kind]}; "
            f"received {bits_field}={bits!r}. Set {bits_field}={FIXED_BITS[kind]} or pick "
            f"another quantizer kind."
        )


def _check_options(field_name: str, value: Any) -> None:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError(
            f"LayerConfig.{field_name} must be a dict with str keys; received {value!r}"
        )
    reserved = sorted(set(value) & set(_RESERVED_OPTIONS))
    if reserved:
        raise ValueError(
            f"LayerConfig.{field_name} must not contain {reserved}: these are set from the "
            f"config fields (bits, quantizer kind, granularity, act_signed) or by the module"
        )
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"LayerConfig.{field_name} must be JSON-serialisable (plans are saved as JSON); "
            f"received {value!r} ({e})"
        ) from None


def _act_options(kind: str, options: Mapping[str, Any], observer: bool = True) -> Dict[str, Any]:
    """Activation quantizer options with k2quant's defaults filled in (see ``act_spec``)."""
    opts = dict(options)
    if kind == "uniform":
        opts.setdefault("observer", observer)
    return opts


class QuantSpec(NamedTuple):
    """Everything needed to build one quantizer with :func:`k2quant.quant.make_quantizer`."""

    kind: str
    bits: int
    granularity: str
    signed: bool
    options: Dict[str, Any]


@dataclass
class LayerConfig:
    """How to quantize one layer. Validated on construction; JSON-able via :meth:`to_dict`.

    Attributes:
      weight_bits: bit width of the weights, 1..8.
      act_bits: bit width of the layer's input activations, 1..8, or ``None`` for float
        activations (weight-only quantization). Ignored by ``QuantEmbedding`` (its input is
        integer token ids).
      weight_quantizer: kind of the weight quantizer, one of :data:`QUANTIZER_KINDS`
        (``binary`` needs ``weight_bits=1``, ``ternary`` needs ``weight_bits=2``).
      act_quantizer: kind of the activation quantizer (per tensor).
      granularity: ``"channel"`` (one scale per output channel / embedding row / gate row,
        the default) or ``"tensor"`` for the weights.
      weight_options: extra keyword arguments for the weight quantizer
        (e.g. ``{"range": "mse"}`` for ``uniform``). Must be JSON-serialisable.
      act_options: extra keyword arguments for the activation quantizer.
      act_signed: whether activation codes are signed. ``None`` (default) means automatic:
        unsigned for ``pact`` (its range is ``[0, alpha]``), signed otherwise.
      locations: ``QuantLSTM`` only. Per-location overrides, keys from :data:`LSTM_LOCATIONS`:
        ``input`` (x_t), ``hidden`` (h_{t-1}), ``cell`` (c_t), ``gate_weights`` (all eight
        per-gate weight matrices, input-to-hidden and hidden-to-hidden) and
        ``gate_weights_{i,f,g,o}`` (one gate; beats ``gate_weights``). Each value is ``None``
        (keep that location float) or a dict with any of ``kind``, ``bits`` (None = float),
        ``granularity``, ``signed``, ``options``; missing entries default to the layer's
        weight settings (gate weights) or activation settings (input, hidden, cell), except
        that ``hidden``/``cell`` are signed by default and, for ``uniform``, use a per-step
        range (``observer=False``: a running range observed once per time step would average
        per-step extremes and clip later, larger states).

    Activation defaults: ``uniform`` activation quantizers get ``observer=True`` (static
    range from a running min/max updated in training mode and frozen in eval mode) unless
    the options say otherwise, so calibrate by running a few batches in training mode (or
    train) before evaluating.
    """

    weight_bits: int = 8
    act_bits: Optional[int] = None
    weight_quantizer: str = "uniform"
    act_quantizer: str = "uniform"
    granularity: str = "channel"
    weight_options: Dict[str, Any] = field(default_factory=dict)
    act_options: Dict[str, Any] = field(default_factory=dict)
    act_signed: Optional[bool] = None
    locations: Dict[str, Optional[Dict[str, Any]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_bits("weight_bits", self.weight_bits, allow_none=False)
        _check_bits("act_bits", self.act_bits, allow_none=True)
        _check_kind("weight_quantizer", self.weight_quantizer)
        _check_kind("act_quantizer", self.act_quantizer)
        _check_fixed_bits(
            "weight_quantizer", self.weight_quantizer, "weight_bits", self.weight_bits
        )
        _check_fixed_bits("act_quantizer", self.act_quantizer, "act_bits", self.act_bits)
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"LayerConfig.granularity must be one of {list(GRANULARITIES)}; "
                f"received {self.granularity!r}"
            )
        _check_options("weight_options", self.weight_options)
        _check_options("act_options", self.act_options)
        if self.act_signed is not None and not isinstance(self.act_signed, bool):
            raise ValueError(
                f"LayerConfig.act_signed must be True, False or None (auto); "
                f"received {self.act_signed!r}"
            )
        if not isinstance(self.locations, dict):
            raise ValueError(
                f"LayerConfig.locations must be a dict {{location: dict or None}}; "
                f"received {self.locations!r}"
            )
        for loc, spec in self.locations.items():
            where = f"locations[{loc!r}]"
            if loc not in LSTM_LOCATIONS:
                raise ValueError(
                    f"LayerConfig.locations has unknown location {loc!r}; allowed locations "
                    f"are {list(LSTM_LOCATIONS)}"
                )
            if spec is None:
                continue
            if not isinstance(spec, dict):
                raise ValueError(
                    f"LayerConfig.{where} must be None (float) or a dict with keys from "
                    f"{list(_LOCATION_KEYS)}; received {spec!r}"
                )
            unknown = sorted(set(spec) - set(_LOCATION_KEYS))
            if unknown:
                raise ValueError(
                    f"LayerConfig.{where} has unknown keys {unknown}; allowed keys are "
                    f"{list(_LOCATION_KEYS)}"
                )
            if "bits" in spec:
                _check_bits(f"{where}['bits']", spec["bits"], allow_none=True)
            if "kind" in spec:
                _check_kind(f"{where}['kind']", spec["kind"])
            if "granularity" in spec and spec["granularity"] not in GRANULARITIES:
                raise ValueError(
                    f"LayerConfig.{where}['granularity'] must be one of {list(GRANULARITIES)}; "
                    f"received {spec['granularity']!r}"
                )
            if "signed" in spec and not isinstance(spec["signed"], bool):
                raise ValueError(
                    f"LayerConfig.{where}['signed'] must be a bool; received {spec['signed']!r}"
                )
            if "options" in spec:
                _check_options(f"{where}['options']", spec["options"])
            # The effective spec must be consistent too (e.g. kind=binary with bits from layer).
            try:
                self.location_spec(loc)
            except ValueError as e:
                raise ValueError(f"LayerConfig.{where}: {e}") from None

    # ------------------------------------------------------------------ specs for the modules
    def weight_spec(self) -> QuantSpec:
        """The weight quantizer spec (signed, per ``granularity``)."""
        return QuantSpec(
            self.weight_quantizer,
            self.weight_bits,
            self.granularity,
            True,
            dict(self.weight_options),
        )

    def _auto_signed(self, kind: str) -> bool:
        if self.act_signed is not None:
            return self.act_signed
        return kind != "pact"

    def act_spec(self) -> Optional[QuantSpec]:
        """The input-activation quantizer spec (per tensor), or ``None`` if ``act_bits`` is None.

        ``uniform`` activation quantizers default to ``observer=True`` (static range: running
        min/max updated in training, frozen in eval, as integer inference needs); set
        ``act_options={"observer": False}`` for a per-batch (dynamic) range.
        """
        if self.act_bits is None:
            return None
        return QuantSpec(
            self.act_quantizer,
            self.act_bits,
            "tensor",
            self._auto_signed(self.act_quantizer),
            _act_options(self.act_quantizer, self.act_options),
        )

    def location_spec(self, location: str) -> Optional[QuantSpec]:
        """Effective quantizer spec of one ``QuantLSTM`` location (``None`` = float).

        ``location`` is ``input``, ``hidden``, ``cell`` or ``gate_weights_{i,f,g,o}``
        (``gate_weights`` alone gives the spec shared by the gates without their own entry).
        """
        if location not in LSTM_LOCATIONS:
            raise ValueError(
                f"unknown LSTM location {location!r}; allowed: {list(LSTM_LOCATIONS)}"
            )
        is_weight = location.startswith("gate_weights")
        chain = [location]
        if location != "gate_weights" and is_weight:
            chain.append("gate_weights")
        override: Optional[Dict[str, Any]] = {}
        for key in chain:
            if key in self.locations:
                override = self.locations[key]
                break
        if override is None:
            return None
        if is_weight:
            kind = override.get("kind", self.weight_quantizer)
            bits = override.get("bits", self.weight_bits)
            gran = override.get("granularity", self.granularity)
            signed = override.get("signed", True)
            base_opts = self.weight_options if kind == self.weight_quantizer else {}
        else:
            kind = override.get("kind", self.act_quantizer)
            bits = override.get("bits", self.act_bits)
            gran = override.get("granularity", "tensor")
            if location == "input":
                signed = override.get("signed", self._auto_signed(kind))
            else:  # h in (-1, 1) and c are signed by construction, whatever the kind
                signed = override.get("signed", True)
            base_opts = self.act_options if kind == self.act_quantizer else {}
        if bits is None:
            return None
        if kind in FIXED_BITS and bits != FIXED_BITS[kind]:
            if "bits" not in override:  # bits inherited from the layer: follow the method
                bits = FIXED_BITS[kind]
            else:
                raise ValueError(
                    f"kind {kind!r} needs bits={FIXED_BITS[kind]}; received bits={bits!r}"
                )
        opts = dict(base_opts)
        opts.update(override.get("options", {}))
        if not is_weight:
            # Recurrent states are observed once per time step, so a running-range EMA
            # averages per-step extremes and clips the larger states of later steps: hidden
            # and cell default to a per-step (dynamic) range instead.
            opts = _act_options(kind, opts, observer=(location == "input"))
        return QuantSpec(kind, bits, gran, signed, opts)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> Dict[str, Any]:
        """A JSON-serialisable dict (deep copy)."""
        return copy.deepcopy(asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LayerConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        if not isinstance(d, Mapping):
            raise ValueError(f"LayerConfig.from_dict expects a dict; received {d!r}")
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ValueError(
                f"LayerConfig.from_dict: unknown keys {unknown}; allowed keys are {allowed}"
            )
        return cls(**copy.deepcopy(dict(d)))


ConfigLike = Union[LayerConfig, Mapping[str, Any], None]


def _as_config(value: ConfigLike, where: str) -> Optional[LayerConfig]:
    if value is None or isinstance(value, LayerConfig):
        return value
    if isinstance(value, Mapping):
        try:
            return LayerConfig.from_dict(value)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: {e}") from None
    raise ValueError(
        f"{where} must be a LayerConfig, a dict (LayerConfig.to_dict) or None; "
        f"received {type(value).__name__}: {value!r}"
    )


class Plan:
    """Per-layer quantization plan. See the module docstring for the precedence rules.

    Args:
      layers: ordered mapping from a fully-qualified module name (as in
        ``model.named_modules()``) or ``"re:<regex>"`` to a :class:`LayerConfig` (or its dict
        form) or ``None`` (keep float). The order of the ``re:`` keys matters: the first
        pattern that fully matches a name wins.
      default: config for quantizable layers matched by no key; ``None`` keeps them float.
    """

    def __init__(
        self,
        layers: Optional[Mapping[str, ConfigLike]] = None,
        default: ConfigLike = None,
    ) -> None:
        layers = {} if layers is None else layers
        if not isinstance(layers, Mapping):
            raise ValueError(
                f"Plan(layers=...) must be a dict {{name or 're:<regex>': LayerConfig or None}}; "
                f"received {type(layers).__name__}"
            )
        self.layers: Dict[str, Optional[LayerConfig]] = {}
        self._patterns: List[Tuple[str, "re.Pattern"]] = []
        for key, value in layers.items():
            if not isinstance(key, str):
                raise ValueError(f"Plan keys must be str; received {key!r}")
            self.layers[key] = _as_config(value, f"Plan.layers[{key!r}]")
            if key.startswith("re:"):
                try:
                    self._patterns.append((key, re.compile(key[3:])))
                except re.error as e:
                    raise ValueError(f"Plan key {key!r} is not a valid regular expression: {e}")
        self.default: Optional[LayerConfig] = _as_config(default, "Plan(default=...)")

    # ------------------------------------------------------------------ lookup
    def match(self, name: str) -> Tuple[Optional[str], Optional[LayerConfig]]:
        """Which key decides layer ``name`` and its value.

        Returns ``(key, config)``; ``key`` is the exact name, the winning ``"re:..."`` key, or
        ``None`` when the default applies.
        """
        if name in self.layers and not name.startswith("re:"):
            return name, self.layers[name]
        for key, pattern in self._patterns:
            if pattern.fullmatch(name):
                return key, self.layers[key]
        return None, self.default

    def config_for(self, name: str) -> Optional[LayerConfig]:
        """The :class:`LayerConfig` for layer ``name`` (``None`` = float)."""
        return self.match(name)[1]

    def resolve(self, model: nn.Module) -> Dict[str, LayerConfig]:
        """Map every quantizable layer of ``model`` that the plan quantizes to its config.

        Layers resolved to ``None`` (float) are absent from the result. Raises ``ValueError``
        if an exact key names no quantizable layer or a ``re:`` pattern matches none.
        """
        return {n: c for n, c in self._resolve_all(model).items() if c is not None}

    def _resolve_all(self, model: nn.Module) -> Dict[str, Optional[LayerConfig]]:
        names = list(quantizable_layers(model))
        self.check(names)
        return {n: self.config_for(n) for n in names}

    def check(self, names: List[str], require_quantized: bool = False) -> None:
        """Raise ``ValueError`` if a key names none of the quantizable layer ``names`` or, with
        ``require_quantized``, if the plan keeps every one of them float (a plan that quantizes
        nothing where a quantized model is expected)."""
        name_set = set(names)
        for key in self.layers:
            if key.startswith("re:"):
                pattern = dict(self._patterns)[key]
                ok = any(pattern.fullmatch(n) for n in names)
            else:
                ok = key in name_set
            if not ok:
                shown = ", ".join(names[:50]) + (" ..." if len(names) > 50 else "")
                raise ValueError(
                    f"unknown layer pattern {key!r}: it names no quantizable layer "
                    f"(exact names must equal a module name; 're:' patterns must "
                    f"re.fullmatch one); quantizable layers are: [{shown}]"
                )
        if require_quantized and names and all(self.config_for(n) is None for n in names):
            raise ValueError(
                f"the plan quantizes none of the model's {len(names)} quantizable layers "
                f"(every key is null and 'default' is null or missing); give 'default' a "
                f"LayerConfig (e.g. {{\"weight_bits\": 4}}) or quantize some layers"
            )

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> Dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_FORMAT_VERSION,
            "layers": {k: (None if v is None else v.to_dict()) for k, v in self.layers.items()},
            "default": None if self.default is None else self.default.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Plan":
        """Inverse of :meth:`to_dict`, strict: the keys are ``layers`` (required), ``default``
        (null or missing: unnamed layers stay float), ``format`` (``"k2quant-plan"`` if given)
        and ``version`` (:data:`PLAN_FORMAT_VERSION` if given); any other key, and any unknown
        LayerConfig key, raises ``ValueError`` naming it (a misspelt ``default`` must not
        silently leave the model float)."""
        if not isinstance(d, Mapping) or "layers" not in d:
            raise ValueError(
                "Plan.from_dict expects a dict with keys 'layers' and 'default' "
                f"(as written by Plan.to_dict); received {d!r:.200}"
            )
        unknown = sorted(set(d) - set(PLAN_KEYS))
        if unknown:
            raise ValueError(
                f"unknown plan key(s) {unknown}; a plan has only the keys {list(PLAN_KEYS)}"
            )
        fmt = d.get("format", PLAN_FORMAT)
        if fmt != PLAN_FORMAT:
            raise ValueError(f"'format' is {fmt!r}, expected {PLAN_FORMAT!r} (this is not a "
                             f"k2quant plan)")
        version = d.get("version", PLAN_FORMAT_VERSION)
        if version != PLAN_FORMAT_VERSION or isinstance(version, bool):
            raise ValueError(
                f"unsupported plan format version {version!r}; this k2quant reads version "
                f"{PLAN_FORMAT_VERSION}. Upgrade k2quant or re-create the plan."
            )
        if not isinstance(d["layers"], Mapping):
            raise ValueError(f"'layers' must be an object {{layer name or 're:<regex>': "
                             f"LayerConfig or null}}; received {type(d['layers']).__name__}")
        return cls(d["layers"], d.get("default"))

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))

    def save(self, path: PathLike) -> None:
        """Write the plan as JSON (atomic rename)."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: PathLike) -> "Plan":
        """Read a plan JSON file (UTF-8). Every error is a one-line ``ValueError`` (or
        ``FileNotFoundError``) that names the file."""
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"plan file {path} does not exist") from None
        except IsADirectoryError:
            raise ValueError(f"plan file {path} is a directory") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                             f"{e.start}); plans are UTF-8 JSON") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a JSON plan file ({e})") from None
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Plan):
            return NotImplemented
        return list(self.layers.items()) == list(other.layers.items()) and (
            self.default == other.default
        )

    def __repr__(self) -> str:
        return f"Plan(layers={self.layers!r}, default={self.default!r})"


# ---------------------------------------------------------------------- model-level helpers
def _iter_quantizable(
    model: nn.Module, prefix: str, seen: set
) -> Iterator[Tuple[str, nn.Module]]:
    from k2quant.nn import QuantModule, is_quantizable

    if id(model) in seen:
        return  # a module reachable under several names is listed under its first one
    seen.add(id(model))
    if isinstance(model, QuantModule) or is_quantizable(model):
        yield prefix, model
        return  # never look inside a layer we quantize
    for child_name, child in model.named_children():
        child_prefix = f"{prefix}.{child_name}" if prefix else child_name
        yield from _iter_quantizable(child, child_prefix, seen)


def quantizable_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """Fully-qualified name -> module for every quantizable layer of ``model``.

    Quantizable: exact ``nn.Linear``, ``nn.Conv1d``, ``nn.Embedding``, ``nn.LSTM`` and any
    :class:`k2quant.nn.QuantModule` (whose insides are not searched). The root module, if
    quantizable itself, has name ``""``. A module registered under several names is listed
    once, under the first name (as ``named_modules()`` does).
    """
    return dict(_iter_quantizable(model, "", set()))


def _replace_modules(model: nn.Module, swaps: Dict[int, nn.Module]) -> None:
    """Replace every child ``c`` of every module with ``swaps[id(c)]`` (handles aliases)."""
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):  # named_children() dedups
            if child is not None and id(child) in swaps:
                setattr(parent, child_name, swaps[id(child)])


def quantize_(model: nn.Module, plan: Plan) -> nn.Module:
    """Swap the quantizable layers of ``model`` for quantization-aware modules, in place.

    Works on any ``nn.Module`` tree (nested ``Sequential``/``ModuleList``/``ModuleDict``).
    Each float ``nn.Linear``/``nn.Conv1d``/``nn.Embedding``/``nn.LSTM`` whose config (see
    :class:`Plan` for the precedence) is a :class:`LayerConfig` becomes a
    ``QuantLinear``/``QuantConv1d``/``QuantEmbedding``/``QuantLSTM`` that shares its float
    ``nn.Parameter`` objects (same device and dtype; tied weights stay tied); float layers
    resolved to ``None`` are untouched. A module registered under several names is swapped
    everywhere for one quant module. Other modules (BatchNorm, activations, subclasses of the
    supported types) are left as they are.

    Layers that already are :class:`k2quant.nn.QuantModule`:

    * resolved to the same config: left alone (learned quantizer state is kept);
    * resolved to a different config: rebuilt from their float weights (quantizer state is
      re-initialised);
    * resolved to ``None`` by an explicit plan key: turned back into the float module;
      matched by no key with ``default=None``: left alone;
    * frozen (after :func:`convert`) and asked to change: ``ValueError`` (re-quantize from the
      float model instead).

    The plan describing the result is stored as ``model.k2quant_plan``: a :class:`Plan` with
    one exact key per quantized layer (so exporters can rebuild the model from a skeleton with
    ``quantize_(skeleton, model.k2quant_plan)``); the plan passed in is kept as
    ``model.k2quant_source_plan``.

    Raises:
      ValueError: unknown layer pattern (see :meth:`Plan.resolve`), NaN/Inf weights (the
        message names the layer), unsupported layer options (e.g. ``LSTM(proj_size>0)``).

    Returns:
      ``model`` (or the new module if ``model`` itself is a quantizable layer: use the
      return value).
    """
    from k2quant.nn import QuantModule, quant_class_for

    if not isinstance(plan, Plan):
        raise ValueError(
            f"quantize_(model, plan): plan must be a k2quant.plan.Plan; received "
            f"{type(plan).__name__}. Build one with Plan({{...}}, default=LayerConfig(...))."
        )
    layers = quantizable_layers(model)
    plan.check(list(layers))
    swaps: Dict[int, nn.Module] = {}
    for name, module in layers.items():
        key, cfg = plan.match(name)
        new: Optional[nn.Module] = None
        if isinstance(module, QuantModule):
            if cfg is None:
                if key is None:
                    continue  # not mentioned by the plan: leave alone
                if module.frozen:
                    raise ValueError(
                        f"layer {name!r} is frozen (convert() was called) and the plan asks "
                        f"for it to be float; re-quantize from the float model instead"
                    )
                new = module.to_float()
            elif cfg == module.layer_config:
                continue
            else:
                if module.frozen:
                    raise ValueError(
                        f"layer {name!r} is frozen (convert() was called) with config "
                        f"{module.layer_config}; the plan asks for {cfg}. Re-quantize from "
                        f"the float model instead"
                    )
                new = type(module).from_float(module.to_float(), cfg, name=name)
                new.train(module.training)
        else:
            if cfg is None:
                continue
            new = quant_class_for(module).from_float(module, cfg, name=name)
            new.train(module.training)
        swaps[id(module)] = new
    _replace_modules(model, swaps)
    root = swaps.get(id(model), model)
    resolved = {
        n: m.layer_config for n, m in quantizable_layers(root).items() if isinstance(m, QuantModule)
    }
    root.k2quant_plan = Plan(resolved, default=None)
    root.k2quant_source_plan = plan
    return root


def convert(model: nn.Module) -> nn.Module:
    """Freeze every :class:`k2quant.nn.QuantModule` of ``model`` (in place, eval mode).

    Each quantized float weight is replaced by ``<w>_codes`` (uint8), ``<w>_scale``,
    ``<w>_zero_point`` (and ``<w>_codebook``) buffers; outputs are bit-for-bit those of the
    fake-quant model in eval mode. Already frozen modules are left as they are. Works on a
    freshly built, never-run model (buffers get their final shapes, so a state dict of a
    converted model loads into it).
    """
    from k2quant.nn import QuantModule

    model.eval()
    n = 0
    for module in model.modules():
        if isinstance(module, QuantModule):
            if not module.frozen:
                module.freeze()
            n += 1
    if n == 0:
        logging.warning("convert(): the model has no k2quant.nn.QuantModule; call quantize_ first")
    return model


def model_size_bytes(model: nn.Module) -> float:
    """Theoretical model size in bytes.

    ``sum_i n_i * b_i / 8`` over the quantized weight tensors (``n_i`` elements at ``b_i``
    bits; each LSTM gate matrix counts separately) plus 4 bytes per element of every other
    floating-point parameter (biases, BatchNorm affine, float layers, float LSTM gates).
    Quantizer parameters (step sizes, clipping values), per-channel scales and buffers
    (BatchNorm running statistics) are overhead and not counted. Gives the same value before
    and after :func:`convert`.
    """
    from k2quant.nn import QuantModule

    total_bits = 0.0
    skip = set()
    for module in model.modules():
        if isinstance(module, QuantModule):
            total_bits += module.size_bits()
            skip.update(id(p) for p in module.parameters())
    for p in model.parameters():
        if id(p) in skip or not p.is_floating_point():
            continue
        total_bits += 32.0 * p.numel()
    return total_bits / 8.0
