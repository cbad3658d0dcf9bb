"""Quantization-aware ``nn.Linear``, ``nn.Conv1d`` and ``nn.Embedding``."""
from typing import Any, Dict, Optional, Tuple, Union

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _single

from k2quant.plan import LayerConfig

from .base import QuantModule


def _adopt_parameters(qm: QuantModule, ref: nn.Module) -> None:
    """Take ``ref``'s freshly initialised ``weight`` and ``bias`` and add the ``"weight"`` and
    ``"input"`` quantizers (:class:`QuantLinear`, :class:`QuantConv1d`)."""
    qm.weight = ref.weight
    qm.bias = ref.bias
    qm._add_weight_quantizer("weight", "weight", qm.layer_config.weight_spec())
    qm._add_act_quantizer("input", qm.layer_config.act_spec())
    qm._init_weight_quantizers()


class QuantLinear(QuantModule):
    """``nn.Linear`` with a fake-quantized weight and optionally fake-quantized input.

    Parameters ``weight`` (float32, ``(out_features, in_features)``) and ``bias``
    (``(out_features,)`` or None) as in ``nn.Linear``. Weight quantizer ``"weight"``
    (per output channel, ``ch_axis=0``, unless ``granularity="tensor"``); input quantizer
    ``"input"`` (per tensor) if ``layer_config.act_bits`` is set. The bias stays float.

    Shapes: input ``(*, in_features)`` float32 -> output ``(*, out_features)`` float32.
    """

    float_class = nn.Linear

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        layer_config: Optional[LayerConfig] = None,
        name: str = "",
    ) -> None:
        super().__init__(layer_config, name)
        ref = nn.Linear(in_features, out_features, bias=bias)  # nn.Linear's initialisation
        self.in_features = in_features
        self.out_features = out_features
        _adopt_parameters(self, ref)

    @classmethod
    def _shape_kwargs(cls, m: nn.Linear) -> Dict[str, Any]:
        return {
            "in_features": m.in_features,
            "out_features": m.out_features,
            "bias": m.bias is not None,
        }

    def _float_kwargs(self) -> Dict[str, Any]:
        return self._shape_kwargs(self)  # same attribute names as the float module

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quant_act("input", x), self.quant_weight("weight"), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, " + super().extra_repr()
        )


class QuantConv1d(QuantModule):
    """``nn.Conv1d`` with a fake-quantized weight and optionally fake-quantized input.

    Same constructor arguments and parameters as ``nn.Conv1d`` (``weight`` of shape
    ``(out_channels, in_channels // groups, kernel_size)``, ``bias``), stride, padding
    (int, tuple, ``"same"``, ``"valid"``), dilation, groups and ``padding_mode``. The weight is
    quantized per output channel (``ch_axis=0``) unless ``granularity="tensor"``.

    Shapes: input ``(N, C_in, L)`` or ``(C_in, L)`` float32 -> ``(N, C_out, L_out)``.
    """

    float_class = nn.Conv1d

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Union[int, Tuple[int]],
        stride: Union[int, Tuple[int]] = 1,
        padding: Union[str, int, Tuple[int]] = 0,
        dilation: Union[int, Tuple[int]] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        layer_config: Optional[LayerConfig] = None,
        name: str = "",
    ) -> None:
        super().__init__(layer_config, name)
        ref = nn.Conv1d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
        )  # validates the arguments and initialises like nn.Conv1d
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = ref.kernel_size
        self.stride = ref.stride
        self.padding = ref.padding
        self.dilation = ref.dilation
        self.groups = groups
        self.padding_mode = padding_mode
        self._reversed_padding_repeated_twice = list(ref._reversed_padding_repeated_twice)
        _adopt_parameters(self, ref)

    @classmethod
    def _shape_kwargs(cls, m: nn.Conv1d) -> Dict[str, Any]:
        return {
            "in_channels": m.in_channels,
            "out_channels": m.out_channels,
            "kernel_size": m.kernel_size,
            "stride": m.stride,
            "padding": m.padding,
            "dilation": m.dilation,
            "groups": m.groups,
            "bias": m.bias is not None,
            "padding_mode": m.padding_mode,
        }

    def _float_kwargs(self) -> Dict[str, Any]:
        return self._shape_kwargs(self)  # same attribute names as the float module

    def forward(self, x: Tensor) -> Tensor:
        x = self.quant_act("input", x)
        w = self.quant_weight("weight")
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv1d(x, w, self.bias, self.stride, _single(0), self.dilation, self.groups)
        return F.conv1d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, bias={self.bias is not None}"
        )
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s + ", " + super().extra_repr()


class QuantEmbedding(QuantModule):
    """``nn.Embedding`` with a fake-quantized table, one scale per row by default.

    Parameter ``weight`` of shape ``(num_embeddings, embedding_dim)``; quantizer ``"weight"``
    with ``ch_axis=0`` (per row) unless ``granularity="tensor"``. ``act_bits`` is ignored (the
    input is integer ids). ``max_norm`` (in-place renormalisation of the table) and
    ``sparse=True`` are not supported.

    Shapes: input ``(*)`` int64 ids -> output ``(*, embedding_dim)`` float32. A frozen module
    dequantizes the whole table in each forward.
    """

    float_class = nn.Embedding

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: Optional[int] = None,
        scale_grad_by_freq: bool = False,
        layer_config: Optional[LayerConfig] = None,
        name: str = "",
    ) -> None:
        super().__init__(layer_config, name)
        ref = nn.Embedding(
            num_embeddings,
            embedding_dim,
            padding_idx=padding_idx,
            scale_grad_by_freq=scale_grad_by_freq,
        )
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = ref.padding_idx
        self.scale_grad_by_freq = scale_grad_by_freq
        self.weight = ref.weight
        self._add_weight_quantizer("weight", "weight", self.layer_config.weight_spec())
        self._init_weight_quantizers()

    @classmethod
    def _shape_kwargs(cls, m: nn.Embedding) -> Dict[str, Any]:
        if m.max_norm is not None:
            raise ValueError(
                f"QuantEmbedding: nn.Embedding(max_norm={m.max_norm}) renormalises the table in "
                f"place and cannot be quantized; expected max_norm=None. Keep this layer float "
                f"in the plan (value None) or drop max_norm."
            )
        if m.sparse:
            raise ValueError(
                "QuantEmbedding: nn.Embedding(sparse=True) is not supported (gradients flow "
                "through the quantizer as dense tensors); expected sparse=False. Keep this "
                "layer float in the plan (value None) or use sparse=False."
            )
        return {
            "num_embeddings": m.num_embeddings,
            "embedding_dim": m.embedding_dim,
            "padding_idx": m.padding_idx,
            "scale_grad_by_freq": m.scale_grad_by_freq,
        }

    def _float_kwargs(self) -> Dict[str, Any]:
        return {
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "padding_idx": self.padding_idx,
            "scale_grad_by_freq": self.scale_grad_by_freq,
        }

    def effective_weight(self) -> Tensor:
        """The table as the forward uses it: (num_embeddings, embedding_dim) float32.

        Fake-quantized while training, dequantized codes once frozen. Models with tied
        input/output embeddings compute their output logits with it, so the output layer is
        quantized exactly like the embedding.
        """
        return self.quant_weight("weight")

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(
            ids, self.effective_weight(), self.padding_idx, None, 2.0, self.scale_grad_by_freq
        )

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        return s + ", " + super().extra_repr()
