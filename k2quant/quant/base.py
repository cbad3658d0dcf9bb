"""Quantizer base class, quantization parameters, straight-through helpers and validation.

Every quantizer in :mod:`k2quant.quant` is an :class:`torch.nn.Module` deriving from
:class:`Quantizer` and offers three views of the same computation:

.. code-block:: python

    y = q(x)                        # fake-quant forward, differentiable (STE)
    codes, params = q.quantize(x)   # codes: torch.uint8, same shape as x, in [0, 2**bits - 1]
    x_hat = q.dequantize(codes, params)
    # eval mode, float32 x:  torch.equal(q(x), x_hat)   (bit for bit)

Uniform-family quantizers (``uniform``, ``lsq``, ``pact``, ``sawb``, ``binary``, ``ternary``)
dequantize as ``(codes.float() - zero_point) * scale``; codebook quantizers (``general``)
dequantize by indexing ``params.codebook``. To make the contract hold bit for bit, the
fake-quant forward computes its values with the very same float operations
(:func:`affine_codes` then :func:`affine_dequantize`, or :func:`codebook_lookup`); the
straight-through estimators are custom autograd Functions whose forwards return exactly
``round(x)`` / ``x`` so that they never perturb the values.

Learned per-channel parameters (LSQ step, PACT alpha, general-quantizer centroids, observer
statistics) need the channel count, which is only known from the data. They are created
lazily by :meth:`Quantizer.init_from` (called automatically on the first forward or
:meth:`Quantizer.quantize`) and registered as ``nn.Parameter`` / buffers at that moment.

Caution:
    Build the optimizer *after* the quantizer has been initialised (run ``q.init_from(w)`` or
    one forward pass), otherwise lazily created per-channel parameters are not in it.
    Loading a ``state_dict`` allocates lazy parameters with the saved shapes, so a fresh
    quantizer can load a trained one's state directly.
"""
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

MIN_BITS = 1
MAX_BITS = 8
GRANULARITIES = ("tensor", "channel")

# Smallest scale we ever divide by: keeps all-zero tensors finite (codes map to the zero point).
EPS_SCALE = 1e-12


# --------------------------------------------------------------------------------------------
# QParams and the (module-free) dequantization used by frozen modules
# --------------------------------------------------------------------------------------------
@dataclass
class QParams:
    """Parameters needed to map integer codes back to real values.

    Attributes:
        bits: bit width, 1..8; codes lie in ``[0, 2**bits - 1]``.
        scale: float32 tensor. Per tensor: 0-d. Per channel: shape ``(1, .., C, .., 1)`` with
            ``C`` on ``ch_axis`` so that it broadcasts against the codes.
        zero_point: float32 tensor shaped like ``scale``. May be a half-integer (e.g. 0.5 for
            the 1-bit symmetric grid, whose values are ``+-scale/2``). Quantizers always set it;
            :func:`dequantize` treats ``None`` as 0 (same values bit for bit).
        codebook: ``None`` for uniform-family quantizers. For codebook quantizers a float32
            tensor of sorted centroids: shape ``(2**bits,)`` per tensor or ``(C, 2**bits)``
            per channel; ``codes`` are indices into it.
        ch_axis: the (non-negative) channel axis for per-channel parameters, else ``None``.
    """

    bits: int
    scale: Tensor
    zero_point: Tensor
    codebook: Optional[Tensor] = None
    ch_axis: Optional[int] = None

    def to(self, device: Any) -> "QParams":
        """Return a copy with all tensors moved to ``device``."""
        return QParams(
            bits=self.bits,
            scale=self.scale.to(device),
            zero_point=self.zero_point.to(device),
            codebook=None if self.codebook is None else self.codebook.to(device),
            ch_axis=self.ch_axis,
        )


def dequantize(codes: Tensor, params: QParams) -> Tensor:
    """Map integer ``codes`` back to float32 values (no module needed).

    Args:
        codes: ``torch.uint8`` tensor of any shape (the shape of the quantized tensor).
        params: the :class:`QParams` returned with the codes by ``Quantizer.quantize``.

    Returns:
        float32 tensor, same shape as ``codes``:
        ``(codes.float() - zero_point) * scale`` (uniform family) or the codebook entries
        ``codebook[codes]`` (per tensor) / ``codebook[c, codes[.., c, ..]]`` (per channel).
    """
    if not isinstance(codes, Tensor) or codes.dtype != torch.uint8:
        got = codes.dtype if isinstance(codes, Tensor) else type(codes).__name__
        raise ValueError(f"dequantize: expected codes of dtype torch.uint8, got {got}")
    if params.codebook is not None:
        return codebook_lookup(codes.long(), params.codebook, params.ch_axis)
    if params.zero_point is None:  # tolerated: same values as a zero point of 0
        return codes.to(torch.float32) * params.scale
    return affine_dequantize(codes.to(torch.float32), params.scale, params.zero_point)


# --------------------------------------------------------------------------------------------
# Straight-through estimators (custom autograd Functions, value-exact forwards)
# --------------------------------------------------------------------------------------------
class _RoundSTE(torch.autograd.Function):
    """Forward: ``torch.round(x)`` (half to even). Backward: identity."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad


class _GradScale(torch.autograd.Function):
    """Forward: returns a copy of ``x`` (same values). Backward: ``grad * scale``."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad * ctx.scale, None


class _StraightThrough(torch.autograd.Function):
    """Forward: returns a copy of ``value``. Backward: the incoming gradient goes unchanged to
    ``value`` and, multiplied by ``mask`` (if given), to ``x`` -- as if the operation were the
    identity on ``x`` (inside the mask)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, value: Tensor, x: Tensor, mask: Optional[Tensor]
    ) -> Tensor:
        ctx.save_for_backward(mask)
        ctx.has_mask = mask is not None
        return value.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        gx = grad * mask.to(grad.dtype) if ctx.has_mask else grad
        return grad, gx, None


def round_ste(x: Tensor) -> Tensor:
    """``torch.round(x)`` with a straight-through (identity) gradient. Values are exact."""
    return _RoundSTE.apply(x)


def grad_scale(x: Tensor, scale: float) -> Tensor:
    """Identity in the forward (same values), gradient multiplied by ``scale`` (LSQ's ``g``)."""
    return _GradScale.apply(x, float(scale))


def straight_through(value: Tensor, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Return ``value`` (exactly); its gradient also flows to ``x`` (times ``mask`` if given).

    ``value``, ``x`` and ``mask`` (bool/float) must have the same shape. Unlike
    ``x + (value - x).detach()`` this returns ``value`` bit for bit.
    """
    return _StraightThrough.apply(value, x, mask)


# --------------------------------------------------------------------------------------------
# Shared value computations (used by both forward and quantize/dequantize)
# --------------------------------------------------------------------------------------------
def affine_codes(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: float, qmax: float) -> Tensor:
    """Integer codes (as floats) ``round(clamp(x / scale + zero_point, qmin, qmax))``.

    Differentiable: STE through the round, zero gradient where the clamp is active.
    ``qmin``/``qmax`` are integers; the result is an exact integer-valued float tensor.
    """
    return round_ste(torch.clamp(x / scale + zero_point, qmin, qmax))


def affine_dequantize(codes: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """``(codes - zero_point) * scale``: the single dequantization formula of the uniform family."""
    return (codes - zero_point) * scale


def codebook_lookup(codes: Tensor, codebook: Tensor, ch_axis: Optional[int]) -> Tensor:
    """Gather codebook entries.

    Args:
        codes: int64 tensor of indices, any shape.
        codebook: ``(K,)`` (per tensor) or ``(C, K)`` (per channel; ``C == codes.shape[ch_axis]``).
        ch_axis: channel axis of ``codes`` for a ``(C, K)`` codebook.

    Returns:
        Tensor of the codebook dtype, same shape as ``codes``. Differentiable wrt ``codebook``.
    """
    if codebook.dim() == 1:
        return codebook[codes]
    if ch_axis is None:
        raise ValueError("codebook_lookup: a (C, K) codebook needs ch_axis")
    moved = codes.movedim(ch_axis, 0)
    flat = moved.reshape(moved.shape[0], -1)
    vals = torch.gather(codebook, 1, flat)
    return vals.reshape(moved.shape).movedim(0, ch_axis)


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------
def _where(name: Optional[str], kind: str) -> str:
    return f"{kind} quantizer" + (f" '{name}'" if name else "")


def validate_bits(
    bits: Any, allowed: Optional[Sequence[int]] = None, who: str = "quantizer"
) -> int:
    """Return ``bits`` if it is an int in 1..8 (and in ``allowed`` if given), else ValueError."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise ValueError(
            f"{who}: bits must be an int in {MIN_BITS}..{MAX_BITS}, got {bits!r} "
            f"({type(bits).__name__}); pass e.g. bits=4"
        )
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(
            f"{who}: bits must be in {MIN_BITS}..{MAX_BITS}, got bits={bits}; "
            f"choose a bit width between {MIN_BITS} and {MAX_BITS}"
        )
    if allowed is not None and bits not in allowed:
        raise ValueError(
            f"{who}: bits must be one of {list(allowed)} for this quantizer, got bits={bits}"
        )
    return bits


def check_finite(x: Tensor, who: str = "quantizer") -> None:
    """Raise ValueError if ``x`` contains NaN or Inf (the message counts them)."""
    if not torch.isfinite(x).all():
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(
            f"{who}: input contains NaN/Inf ({n_nan} NaN, {n_inf} Inf out of {x.numel()} "
            f"elements, shape {tuple(x.shape)}); the tensor to quantize must be finite - check "
            "for diverged training or a bad checkpoint"
        )


# --------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------
class Quantizer(nn.Module):
    """Base class of all quantizers.

    Args:
        bits: bit width, int in 1..8 (some kinds restrict it further).
        granularity: ``"tensor"`` (one set of parameters) or ``"channel"`` (one per slice
            along ``ch_axis``, e.g. per output channel of a weight).
        ch_axis: channel axis for ``granularity="channel"``; negative values count from the end.
            Checked against ``x.dim()`` at use time.
        signed: ``True`` for data with both signs (weights), ``False`` for non-negative data
            (activations after ReLU): unsigned grids start at 0.
        name: optional label (e.g. ``"tdnnf.3.linear.weight"``), set by the owning module and
            included in error messages.

    Subclasses set the class attributes ``kind`` and (optionally) ``allowed_bits`` and
    implement :meth:`_forward` (fake quant, differentiable) and :meth:`_quantize`
    (codes + QParams; runs under ``torch.no_grad``). Learned quantizers also implement
    :meth:`_init_from` and list lazily created parameters/buffers in ``_lazy_params`` /
    ``_lazy_buffers``.

    Attributes:
        initialized: bool buffer (saved in the state dict); ``False`` until data-dependent
            parameters have been set by :meth:`init_from`.
    """

    kind: str = "base"
    allowed_bits: Optional[Tuple[int, ...]] = None
    _lazy_params: Tuple[str, ...] = ()
    _lazy_buffers: Tuple[str, ...] = ()

    def __init__(
        self,
        bits: int,
        granularity: str = "tensor",
        ch_axis: int = 0,
        signed: bool = True,
        name: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.bits = validate_bits(bits, self.allowed_bits, who=_where(name, self.kind))
        if granularity not in GRANULARITIES:
            raise ValueError(
                f"{_where(name, self.kind)}: granularity must be one of {list(GRANULARITIES)}, "
                f"got {granularity!r}"
            )
        if isinstance(ch_axis, bool) or not isinstance(ch_axis, int):
            raise ValueError(
                f"{_where(name, self.kind)}: ch_axis must be an int, got {ch_axis!r}"
            )
        if not isinstance(signed, bool):
            raise ValueError(f"{_where(name, self.kind)}: signed must be a bool, got {signed!r}")
        self.granularity = granularity
        self.ch_axis = ch_axis
        self.signed = signed
        self.register_buffer("initialized", torch.tensor(False))

    # ---- public API --------------------------------------------------------------------
    @property
    def qmax(self) -> int:
        """Largest code, ``2**bits - 1``."""
        return 2 ** self.bits - 1

    @property
    def per_channel(self) -> bool:
        return self.granularity == "channel"

    def forward(self, x: Tensor) -> Tensor:
        """Fake-quantize ``x`` (float tensor, any shape; per channel needs ``x.dim() >= 1``).

        Returns a tensor of the same shape and dtype, differentiable as documented by the kind.
        Initialises data-dependent parameters from ``x`` on first use.
        """
        self._check_input(x)
        if not bool(self.initialized):
            self._lazy_init(x)
        return self._forward(x)

    def quantize(self, x: Tensor) -> Tuple[Tensor, QParams]:
        """Quantize ``x`` to integer codes.

        Returns:
            ``(codes, params)``: ``codes`` is ``torch.uint8`` with ``x``'s shape and values in
            ``[0, 2**bits - 1]``; ``params`` is a :class:`QParams` (float32 tensors, detached).
            Never updates running statistics.
        """
        self._check_input(x)
        with torch.no_grad():
            if not bool(self.initialized):
                self._lazy_init(x)
            codes, params = self._quantize(x)
        return codes.to(torch.uint8), params

    def dequantize(self, codes: Tensor, params: QParams) -> Tensor:
        """Inverse of :meth:`quantize`: float32 tensor with the shape of ``codes``."""
        if params.bits != self.bits:
            raise ValueError(
                f"{self._who()}: params.bits={params.bits} does not match the quantizer's "
                f"bits={self.bits}"
            )
        return dequantize(codes, params)

    @torch.no_grad()
    def init_from(self, x: Tensor) -> "Quantizer":
        """Initialise data-dependent parameters from ``x`` (creates lazy per-channel ones).

        Stateless quantizers only record that they are initialised. Returns ``self``.
        """
        self._check_input(x)
        self._lazy_init(x)
        return self

    @torch.no_grad()
    def _lazy_init(self, x: Tensor) -> None:
        """:meth:`init_from` without re-validating ``x`` (the caller already did)."""
        self._init_from(x.detach())
        self.initialized.fill_(True)

    def options(self) -> Dict[str, Any]:
        """JSON-able constructor options: ``make_quantizer(**q.options())`` re-creates ``q``."""
        opts: Dict[str, Any] = {
            "kind": self.kind,
            "bits": self.bits,
            "granularity": self.granularity,
            "ch_axis": self.ch_axis,
            "signed": self.signed,
        }
        opts.update(self._extra_options())
        return opts

    def extra_repr(self) -> str:
        opts = self.options()
        opts.pop("kind")
        s = ", ".join(f"{k}={v!r}" for k, v in opts.items())
        if self.name:
            s += f", name={self.name!r}"
        return s

    # ---- hooks for subclasses ------------------------------------------------------------
    def _forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _quantize(self, x: Tensor) -> Tuple[Tensor, QParams]:
        raise NotImplementedError

    def _init_from(self, x: Tensor) -> None:
        """Default: nothing to learn."""

    def _extra_options(self) -> Dict[str, Any]:
        return {}

    # ---- helpers for subclasses ------------------------------------------------------------
    def _who(self) -> str:
        return _where(self.name, self.kind)

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise ValueError(f"{self._who()}: expected a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(
                f"{self._who()}: expected a floating-point tensor, got dtype {x.dtype}"
            )
        if x.numel() == 0:
            raise ValueError(
                f"{self._who()}: cannot quantize an empty tensor (shape {tuple(x.shape)})"
            )
        check_finite(x, self._who())
        if self.per_channel:
            self._axis(x)

    def _axis(self, x: Tensor) -> int:
        """Non-negative channel axis for ``x`` (ValueError if out of range)."""
        nd = x.dim()
        if not -nd <= self.ch_axis < nd:
            raise ValueError(
                f"{self._who()}: ch_axis={self.ch_axis} is out of range for a tensor with "
                f"{nd} dims (shape {tuple(x.shape)}); expected ch_axis in [{-nd}, {nd - 1}]"
            )
        return self.ch_axis % nd

    def _channels(self, x: Tensor) -> int:
        return x.shape[self._axis(x)]

    def _bshape(self, x: Tensor) -> List[int]:
        """Broadcast shape of per-channel parameters for ``x``: C on ch_axis, 1 elsewhere."""
        shape = [1] * x.dim()
        ax = self._axis(x)
        shape[ax] = x.shape[ax]
        return shape

    def _bcast(self, p: Tensor, x: Tensor) -> Tensor:
        """Reshape a per-tensor ``()`` or per-channel ``(C,)`` parameter to broadcast with x."""
        if not self.per_channel:
            return p.reshape(())
        c = self._channels(x)
        if p.numel() != c:
            raise ValueError(
                f"{self._who()}: has {p.numel()} per-channel parameters but the input has "
                f"{c} channels on axis {self._axis(x)} (shape {tuple(x.shape)}); a per-channel "
                "quantizer is bound to the tensor it was initialised on"
            )
        return p.reshape(self._bshape(x))

    def _rows(self, x: Tensor) -> Tensor:
        """``x`` as a 2-D ``(C, M)`` view (per channel) or ``(1, numel)`` (per tensor)."""
        if not self.per_channel:
            return x.reshape(1, -1)
        moved = x.movedim(self._axis(x), 0)
        return moved.reshape(moved.shape[0], -1)

    def _unrows(self, rows: Tensor, x: Tensor) -> Tensor:
        """Inverse of :meth:`_rows`: a ``(C, M)``/``(1, numel)`` tensor back to ``x``'s shape."""
        if not self.per_channel:
            return rows.reshape(x.shape)
        ax = self._axis(x)
        moved_shape = x.movedim(ax, 0).shape
        return rows.reshape(moved_shape).movedim(0, ax)

    def _reduce(self, t: Tensor) -> Tensor:
        """Flatten a ``(C,)``/``(1,)`` per-row statistic to ``(C,)`` or ``()``."""
        return t.reshape(-1) if self.per_channel else t.reshape(())

    def _elements_per_param(self, x: Tensor) -> int:
        return x.numel() // self._channels(x) if self.per_channel else x.numel()

    def _set_param(self, name: str, value: Tensor) -> None:
        """Create or overwrite the ``nn.Parameter`` ``name`` with ``value`` (shape may change)."""
        current = getattr(self, name, None)
        value = value.detach().to(torch.float32)
        if isinstance(current, nn.Parameter) and current.shape == value.shape:
            current.data.copy_(value)
        else:
            self.register_parameter(name, nn.Parameter(value.clone()))

    def _set_buffer(self, name: str, value: Tensor) -> None:
        current = getattr(self, name, None)
        value = value.detach().to(torch.float32)
        if isinstance(current, Tensor) and current.shape == value.shape:
            current.copy_(value)
        else:
            self.register_buffer(name, value.clone())

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Allocate lazily created parameters/buffers with the saved shapes before loading
        # (on this module's device; the values are then copied by the default loader).
        # (a frozen layer's weight quantizers hold no state at all: see QuantModule.freeze)
        init = self._buffers.get("initialized")
        device = init.device if init is not None else torch.device("cpu")
        for pname in self._lazy_params:
            key = prefix + pname
            if key in state_dict:
                cur = getattr(self, pname, None)
                if cur is None or cur.shape != state_dict[key].shape:
                    ref = state_dict[key]
                    self.register_parameter(
                        pname,
                        nn.Parameter(torch.zeros(ref.shape, dtype=torch.float32, device=device)),
                    )
        for bname in self._lazy_buffers:
            key = prefix + bname
            if key in state_dict:
                cur = getattr(self, bname, None)
                if cur is None or cur.shape != state_dict[key].shape:
                    ref = state_dict[key]
                    self.register_buffer(
                        bname, torch.zeros(ref.shape, dtype=torch.float32, device=device)
                    )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def make_qparams(q: Quantizer, x: Tensor, scale: Tensor, zero_point: Tensor) -> QParams:
    """Build detached float32 :class:`QParams` for quantizer ``q`` and input ``x``.

    ``scale``/``zero_point`` are either 0-d / single-element or already hold one value per
    channel; per channel they are reshaped to the broadcast shape (C on ``ch_axis``).
    """
    def fmt(t: Tensor) -> Tensor:
        t = t.detach().to(torch.float32)
        if not q.per_channel:
            return t.reshape(()).clone()
        shape = q._bshape(x)
        if t.numel() == shape[q._axis(x)]:
            return t.reshape(shape).clone()
        return t.reshape(()).expand(shape).clone()

    return QParams(
        bits=q.bits,
        scale=fmt(scale),
        zero_point=fmt(zero_point),
        codebook=None,
        ch_axis=q._axis(x) if q.per_channel else None,
    )
