"""`QuantModule`: the common machinery of the quantization-aware layers.

A quant module owns float parameters named like its float counterpart (``weight``, ``bias``,
``weight_ih_l0``, ...) and two ``nn.ModuleDict``s of quantizers:

* ``weight_quantizers[key]``: one per quantized weight *slot*. A slot is a whole parameter
  (``"weight"``) or a block of rows of one (the LSTM gate ``"weight_ih_l0_i"`` is rows
  ``[0, H)`` of ``weight_ih_l0``).
* ``act_quantizers[key]``: activation quantizers (``"input"``; LSTM: ``"input_l0"``,
  ``"hidden_l0"``, ``"cell_l0"``, ...).

Quantizer ``name`` attributes are ``"<module name>.<key>"`` so quantizer errors name the layer.

Life cycle: ``from_float`` (fake-quant, trainable) -> ``freeze()`` (called by
``k2quant.plan.convert``) which replaces each slot by buffers ``<key>_codes`` (uint8, same shape
as the slot), ``<key>_scale``, ``<key>_zero_point`` and, for codebook quantizers,
``<key>_codebook``, and deletes float parameters whose rows are all quantized. A frozen module
dequantizes its codes with the quantizer's ``dequantize`` in every forward, which reproduces
the eval-mode fake-quant outputs bit for bit.
"""
import threading
from typing import Any, Dict, Iterator, NamedTuple, Optional, Tuple, Type

import torch
from torch import Tensor, nn

from k2quant.plan import LayerConfig, QuantSpec


class _Slot(NamedTuple):
    param: str  # name of the float parameter (direct attribute of the module)
    rows: Optional[Tuple[int, int]]  # [start, stop) rows on dim 0, None = the whole tensor


class _FrozenMeta(NamedTuple):
    bits: int
    ch_axis: Optional[int]
    has_zero_point: bool
    has_codebook: bool


_FROZEN_SUFFIXES = ("_scale", "_zero_point", "_codebook")
_DEFER_INIT = threading.local()  # > 0 while from_float builds a module (see from_float)


def build_quantizer(spec: QuantSpec, ch_axis: int, name: str) -> nn.Module:
    """Build one quantizer with :func:`k2quant.quant.make_quantizer` and set its ``name``.

    Args:
      spec: kind, bits, granularity, signed, options.
      ch_axis: channel axis of the tensor it will quantize (used with ``channel`` granularity).
      name: ``"<module name>.<tensor>"``; used in the quantizer's error messages.
    """
    from k2quant.quant import make_quantizer

    try:
        q = make_quantizer(
            spec.kind,
            spec.bits,
            granularity=spec.granularity,
            ch_axis=ch_axis,
            signed=spec.signed,
            name=name,
            **spec.options,
        )
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"{name or '<layer>'}: cannot build a {spec.bits}-bit {spec.kind!r} quantizer "
            f"(granularity={spec.granularity!r}, signed={spec.signed}, options={spec.options}): "
            f"{e}. Fix the LayerConfig of this layer in the plan."
        ) from e
    return q


def check_finite_weights(module: nn.Module, name: str) -> None:
    """Raise ``ValueError`` naming layer ``name`` if a parameter of ``module`` has NaN/Inf."""
    for pname, p in module.named_parameters(recurse=False):
        if p.is_floating_point():
            bad = (~torch.isfinite(p.detach())).sum().item()
            if bad:
                raise ValueError(
                    f"layer {name or '<root>'!r}: parameter {pname!r} (shape "
                    f"{tuple(p.shape)}) has {bad} NaN/Inf value(s); expected finite weights. "
                    f"Check the checkpoint or the training run for divergence, or keep this "
                    f"layer float with Plan({{{name!r}: None}})."
                )


class QuantModule(nn.Module):
    """Base class of the quantization-aware layers (see the module docstring).

    Subclasses set ``float_class`` and implement ``__init__`` (shape args, ``layer_config``,
    ``name``), ``_float_kwargs`` (constructor kwargs of the float module) and ``forward``;
    they declare quantized weights with :meth:`_add_weight_quantizer` and activation
    quantizers with :meth:`_add_act_quantizer`, and read weights through
    :meth:`quant_weight` and activations through :meth:`quant_act`.

    Attributes:
      layer_config: the :class:`~k2quant.plan.LayerConfig` it was built with.
      layer_name: fully-qualified module name (``""`` if unknown).
      frozen: True after :meth:`freeze`.
    """

    float_class: Type[nn.Module] = nn.Module

    def __init__(self, layer_config: Optional[LayerConfig] = None, name: str = "") -> None:
        super().__init__()
        if layer_config is None:
            layer_config = LayerConfig()
        if not isinstance(layer_config, LayerConfig):
            raise ValueError(
                f"{type(self).__name__}: layer_config must be a k2quant.plan.LayerConfig; "
                f"received {type(layer_config).__name__}"
            )
        self.layer_config = layer_config
        self.layer_name = name
        self.weight_quantizers = nn.ModuleDict()
        self.act_quantizers = nn.ModuleDict()
        self.frozen = False
        self.quant_weights_enabled = True
        self.quant_acts_enabled = True
        self._slots: Dict[str, _Slot] = {}
        self._frozen_meta: Dict[str, _FrozenMeta] = {}

    # ------------------------------------------------------------------ construction helpers
    def _qname(self, key: str) -> str:
        return f"{self.layer_name}.{key}" if self.layer_name else key

    def _add_weight_quantizer(
        self,
        key: str,
        param: str,
        spec: Optional[QuantSpec],
        rows: Optional[Tuple[int, int]] = None,
        ch_axis: int = 0,
    ) -> None:
        """Quantize parameter ``param`` (or its ``rows``) with ``spec`` (None = keep float)."""
        if spec is None:
            return
        self.weight_quantizers[key] = build_quantizer(spec, ch_axis, self._qname(key))
        self._slots[key] = _Slot(param, rows)

    def _add_act_quantizer(self, key: str, spec: Optional[QuantSpec]) -> None:
        """Quantize activation ``key`` with ``spec`` (per tensor; None = keep float)."""
        if spec is None:
            return
        self.act_quantizers[key] = build_quantizer(spec, 0, self._qname(key))

    def _float_kwargs(self) -> Dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def _shape_kwargs(cls, float_module: nn.Module) -> Dict[str, Any]:
        """Constructor kwargs of ``cls`` read from a float module (shapes and options)."""
        raise NotImplementedError

    @classmethod
    def from_float(
        cls, float_module: nn.Module, layer_config: LayerConfig, name: str = ""
    ) -> "QuantModule":
        """Build a fake-quant module from ``float_module``.

        The new module *shares* the float module's ``nn.Parameter`` objects (no copy), so
        weights tied between layers (e.g. an LM's embedding and output) stay tied during
        quantization-aware training; use ``copy.deepcopy(float_module)`` to keep an
        independent float copy.

        Args:
          float_module: an instance of ``cls.float_class``.
          layer_config: quantizer settings.
          name: fully-qualified module name, used in quantizer names and error messages.

        Raises:
          TypeError: ``float_module`` has the wrong type.
          ValueError: NaN/Inf weights (naming the layer), unsupported options, bad config.
        """
        if not isinstance(float_module, cls.float_class):
            raise TypeError(
                f"{cls.__name__}.from_float expects an {cls.float_class.__module__}."
                f"{cls.float_class.__name__}; received {type(float_module).__name__}"
            )
        check_finite_weights(float_module, name)
        _DEFER_INIT.active = getattr(_DEFER_INIT, "active", 0) + 1
        try:  # the constructor's random weights are replaced below: initialise only once
            qm = cls(**cls._shape_kwargs(float_module), layer_config=layer_config, name=name)
        finally:
            _DEFER_INIT.active -= 1
        ref = next(float_module.parameters(), None)
        for pname, p in float_module.named_parameters(recurse=False):
            mine = getattr(qm, pname, None)
            if not isinstance(mine, nn.Parameter) or mine.shape != p.shape:
                raise ValueError(
                    f"{cls.__name__}.from_float({name!r}): parameter {pname!r} of shape "
                    f"{tuple(p.shape)} has no counterpart of that shape (got "
                    f"{None if mine is None else tuple(mine.shape)})"
                )
            setattr(qm, pname, p)  # shared, not copied: tied weights stay tied
        if ref is not None:
            # quantizers follow the weights' device; their own parameters stay float32
            qm.weight_quantizers.to(ref.device)
            qm.act_quantizers.to(ref.device)
        qm._init_weight_quantizers()
        qm.train(float_module.training)
        return qm

    def _init_weight_quantizers(self) -> None:
        """Initialise every weight quantizer from its current weights.

        Creates learned per-channel parameters (LSQ steps, ...) right away, so an optimizer
        built after ``quantize_`` sees them. Subclasses call this at the end of ``__init__``.
        """
        if getattr(_DEFER_INIT, "active", 0):
            return
        for key in self._slots:
            self.weight_quantizers[key].init_from(self._float_slot(key).detach())

    def to_float(self) -> nn.Module:
        """The equivalent float module.

        Not frozen: the float (not fake-quantized) weights. Frozen: the dequantized weights.
        """
        m = self.float_class(**self._float_kwargs())
        with torch.no_grad():
            for pname, p in m.named_parameters(recurse=False):
                p.copy_(self._full_param(pname))
        ref = next(self.parameters(), None)
        if ref is None and self._slots:
            ref = getattr(self, f"{next(iter(self._slots))}_codes", None)
        if ref is not None:
            m.to(ref.device)
        m.train(self.training)
        return m

    # ------------------------------------------------------------------ weights / activations
    def _float_slot(self, key: str) -> Tensor:
        slot = self._slots[key]
        p = getattr(self, slot.param)
        return p if slot.rows is None else p[slot.rows[0] : slot.rows[1]]

    def _frozen_params(self, key: str):
        from k2quant.quant import QParams

        meta = self._frozen_meta[key]
        return QParams(
            bits=meta.bits,
            scale=getattr(self, f"{key}_scale"),
            zero_point=getattr(self, f"{key}_zero_point") if meta.has_zero_point else None,
            codebook=getattr(self, f"{key}_codebook") if meta.has_codebook else None,
            ch_axis=meta.ch_axis,
        )

    def quant_weight(self, key: str) -> Tensor:
        """The weight slot ``key`` as used by the forward.

        Fake-quant ``q(w)`` (float32, gradients via the quantizer's STE), the float weight if
        weight quantization is disabled, or, when frozen, ``dequantize(codes, params)``.
        """
        if self.frozen:
            return self.weight_quantizers[key].dequantize(
                getattr(self, f"{key}_codes"), self._frozen_params(key)
            )
        w = self._float_slot(key)
        if not self.quant_weights_enabled:
            return w
        return self.weight_quantizers[key](w)

    def quant_act(self, key: str, x: Tensor) -> Tensor:
        """Fake-quantize activation ``x`` with quantizer ``key`` (identity if none/disabled)."""
        if not self.quant_acts_enabled or key not in self.act_quantizers:
            return x
        return self.act_quantizers[key](x)

    def _full_param(self, pname: str) -> Tensor:
        """Parameter ``pname`` in full, dequantized where frozen (no gradient)."""
        with torch.no_grad():
            if pname in self._parameters and self._parameters[pname] is not None:
                full = self._parameters[pname].detach().clone()
            else:
                full = None
            for key, slot in self._slots.items():
                if slot.param != pname or not self.frozen:
                    continue
                w = self.quant_weight(key)
                if slot.rows is None:
                    full = w.clone()
                else:
                    if full is None:
                        full = torch.empty(
                            (self._param_rows(pname),) + tuple(w.shape[1:]),
                            dtype=w.dtype,
                            device=w.device,
                        )
                    full[slot.rows[0] : slot.rows[1]] = w
            if full is None:
                raise KeyError(f"{type(self).__name__} has no parameter {pname!r}")
            return full

    def _param_rows(self, pname: str) -> int:
        return max(s.rows[1] for s in self._slots.values() if s.param == pname and s.rows)

    def set_quant_enabled(
        self, weights: Optional[bool] = None, acts: Optional[bool] = None
    ) -> "QuantModule":
        """Switch weight and/or activation fake-quantization on or off (``None`` = unchanged).

        With both off the module computes exactly what its float counterpart computes. Weight
        quantization cannot be switched off once frozen.
        """
        if weights is not None:
            if self.frozen and not weights:
                raise RuntimeError(
                    f"{self._qname('weights')}: the module is frozen (integer weights); weight "
                    f"quantization cannot be disabled. Use to_float() for a float copy."
                )
            self.quant_weights_enabled = bool(weights)
        if acts is not None:
            self.quant_acts_enabled = bool(acts)
        return self

    def quantizers(self) -> Iterator[nn.Module]:
        """All weight and activation quantizers of this module."""
        yield from self.weight_quantizers.values()
        yield from self.act_quantizers.values()

    # ------------------------------------------------------------------ freezing
    @torch.no_grad()
    def freeze(self) -> "QuantModule":
        """Replace quantized float weights by integer codes (see the module docstring).

        Registers, per weight slot ``key``: ``<key>_codes`` (torch.uint8, shape of the slot),
        ``<key>_scale`` and ``<key>_zero_point`` (float32, broadcastable to the slot) and, for
        codebook quantizers, ``<key>_codebook``. Float parameters whose rows are all quantized
        are deleted. Idempotent. Works on a never-run module (learned quantizers initialise
        from the current weights, so every buffer gets its final shape).
        """
        if self.frozen:
            return self
        if not self.quant_weights_enabled:
            raise RuntimeError(
                f"{self._qname('weights')}: weight quantization is disabled; call "
                f"set_quant_enabled(weights=True) before freeze()/convert()"
            )
        for key in self._slots:
            q = self.weight_quantizers[key]
            w = self._float_slot(key).detach()
            was_training = q.training
            q.eval()
            try:
                codes, params = q.quantize(w)
            finally:
                q.train(was_training)
            if codes.dtype != torch.uint8 or codes.shape != w.shape:
                raise RuntimeError(
                    f"{self._qname(key)}: quantizer returned codes of dtype {codes.dtype} and "
                    f"shape {tuple(codes.shape)}; expected torch.uint8 of shape {tuple(w.shape)}"
                )
            self.register_buffer(f"{key}_codes", codes.contiguous())
            self.register_buffer(f"{key}_scale", torch.as_tensor(params.scale).clone())
            has_zp = params.zero_point is not None
            if has_zp:
                zp = torch.as_tensor(params.zero_point).clone()
                self.register_buffer(f"{key}_zero_point", zp)
            has_cb = params.codebook is not None
            if has_cb:
                self.register_buffer(f"{key}_codebook", params.codebook.clone())
            self._frozen_meta[key] = _FrozenMeta(int(params.bits), params.ch_axis, has_zp, has_cb)
            # The frozen buffers hold everything dequantize() needs; the quantizer's own learned
            # state (LSQ step, centroids, observer ranges, ...) would be a second copy of the
            # scale in checkpoints and packed files, so it goes.
            q._parameters.clear()
            q._buffers.clear()
        for pname in {s.param for s in self._slots.values()}:
            p = getattr(self, pname)
            covered = sum(
                (p.shape[0] if s.rows is None else s.rows[1] - s.rows[0])
                for s in self._slots.values()
                if s.param == pname
            )
            if covered == p.shape[0]:
                delattr(self, pname)
        self.frozen = True
        return self

    def quantized_tensors(self) -> Dict[str, int]:
        """``{"<key>_codes": bits}`` for every quantized weight slot (names local to the module).

        These are the buffers :meth:`freeze` creates (they exist only once frozen); the
        packed exporter stores exactly these at their bit widths.
        """
        out = {}
        for key in self._slots:
            if self.frozen:
                bits = self._frozen_meta[key].bits
            else:
                bits = int(self.weight_quantizers[key].bits)
            out[f"{key}_codes"] = bits
        return out

    def size_bits(self) -> float:
        """Theoretical size of this layer's weights in bits.

        Quantized slots at their bit widths plus 32 bits per element of the other float
        parameters (see :func:`k2quant.plan.model_size_bytes`).
        """
        bits = self.quantized_tensors()
        total = 0.0
        covered: Dict[str, int] = {}
        for key, slot in self._slots.items():
            if self.frozen:
                n = getattr(self, f"{key}_codes").numel()
            else:
                n = self._float_slot(key).numel()
            total += n * bits[f"{key}_codes"]
            covered[slot.param] = covered.get(slot.param, 0) + n
        # Fully quantized parameters are gone once frozen; partially quantized ones (LSTM with
        # some float gates) stay whole, so the same formula holds before and after freeze().
        for pname, p in self._parameters.items():
            if p is not None and p.is_floating_point():
                total += 32.0 * (p.numel() - covered.get(pname, 0))
        return total

    # ------------------------------------------------------------------ state dict
    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        where = prefix.rstrip(".") or self.layer_name or type(self).__name__
        if not self.frozen:
            frozen_keys = [k for k in self._slots if f"{prefix}{k}_codes" in state_dict]
            if frozen_keys:
                error_msgs.append(
                    f"{where}: the state dict is of a converted (frozen) model (it has "
                    f"{prefix}{frozen_keys[0]}_codes) but this module is not frozen; call "
                    f"k2quant.plan.convert(model) before load_state_dict"
                )
        else:
            float_keys = [
                s.param
                for s in self._slots.values()
                if s.param not in self._parameters and f"{prefix}{s.param}" in state_dict
            ]
            if float_keys:
                error_msgs.append(
                    f"{where}: this module is frozen (integer weights) but the state dict has "
                    f"the float weight {prefix}{float_keys[0]}; load float state dicts before "
                    f"k2quant.plan.convert(model), or convert the source model first"
                )
        # (Quantizers allocate their lazily created per-channel tensors themselves.) Frozen
        # per-slot scales/codebooks take the incoming shapes.
        if self.frozen:
            for key in self._slots:
                for sfx in _FROZEN_SUFFIXES:
                    name = f"{key}{sfx}"
                    t = self._buffers.get(name)
                    src = state_dict.get(prefix + name)
                    if t is not None and isinstance(src, Tensor) and src.shape != t.shape:
                        self._buffers[name] = torch.empty(src.shape, dtype=t.dtype, device=t.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        parts = [f"name={self.layer_name!r}"] if self.layer_name else []
        parts.append(f"frozen={self.frozen}")
        return ", ".join(parts)

