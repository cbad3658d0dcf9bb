"""Quantization-aware LSTM with one quantizer per location (4-bit LSTM, arXiv 2108.12074).

Per layer ``l`` and direction (suffix ``""`` or ``"_reverse"``), the quantizer keys are:

* ``input_l{l}``: the layer input ``x_t`` (shared by both directions), per tensor;
* ``hidden_l{l}{sfx}``: the recurrent input ``h_{t-1}`` before the hidden-to-hidden product;
* ``cell_l{l}{sfx}``: the cell state ``c_t`` (the quantized value is carried to ``t+1`` and
  used for ``h_t = o_t * tanh(c_t)``);
* ``weight_ih_l{l}{sfx}_{g}`` and ``weight_hh_l{l}{sfx}_{g}`` for each gate ``g`` in
  ``i, f, g, o``: rows ``[k*H, (k+1)*H)`` of PyTorch's ``weight_ih_l{l}{sfx}`` /
  ``weight_hh_l{l}{sfx}``, each with its own quantizer (per output row by default).

Their kinds/bits come from ``LayerConfig.locations`` (``input``, ``hidden``, ``cell``,
``gate_weights``, ``gate_weights_{i,f,g,o}``), defaulting to the layer's activation settings
(``act_bits=None`` = float) for ``input``/``hidden``/``cell`` and to the weight settings for
the gates. Biases stay float.
"""
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from k2quant.plan import LayerConfig

from .base import QuantModule

GATES = ("i", "f", "g", "o")  # PyTorch's row order in weight_ih/weight_hh


class QuantLSTM(QuantModule):
    """Drop-in ``nn.LSTM`` (no ``proj_size``) with fake-quantized weights and states.

    Args:
      input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional: as
        ``nn.LSTM``. Parameters have ``nn.LSTM``'s names and layout (``weight_ih_l0`` of shape
        ``(4*hidden_size, input_size)``, ``weight_hh_l0``, ``bias_ih_l0``, ``bias_hh_l0``,
        ``..._reverse``), so ``from_float`` copies them and ``to_float`` gives them back.
      layer_config: see the module docstring for the per-location quantizers.
      name: fully-qualified module name (quantizer names and error messages).

    Forward:
      input: ``(T, N, input_size)`` (``(N, T, input_size)`` if ``batch_first``) or unbatched
        ``(T, input_size)``, float32. ``PackedSequence`` is not supported (pad instead).
      hx: optional ``(h_0, c_0)``, each ``(num_layers * num_directions, N, hidden_size)``
        (``(num_layers * num_directions, hidden_size)`` unbatched); zeros by default.
      Returns ``(output, (h_n, c_n))`` like ``nn.LSTM``: output ``(T, N, D * hidden_size)``
      (batch-first if ``batch_first``), ``h_n``/``c_n`` of ``hx``'s shape.

    Layers that quantize ``h_{t-1}`` or ``c_t`` run the recurrence step by step in Python (the
    fused kernels cannot quantize states), which is slower than ``nn.LSTM``; input
    projections are computed for all steps at once. Layers without state quantizers (e.g.
    ``act_bits=None``, weight-only) call PyTorch's fused LSTM on the quantized weights.
    """

    float_class = nn.LSTM

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        layer_config: Optional[LayerConfig] = None,
        name: str = "",
    ) -> None:
        super().__init__(layer_config, name)
        ref = nn.LSTM(
            input_size,
            hidden_size,
            num_layers=num_layers,
            bias=bias,
            batch_first=batch_first,
            dropout=dropout,
            bidirectional=bidirectional,
        )  # validates arguments; nn.LSTM's initialisation
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = 0
        #: Layers without hidden/cell quantizers run PyTorch's fused LSTM kernel on the
        #: quantized weights; False forces the step-by-step loop (for testing).
        self.use_fused = True
        for pname, p in ref.named_parameters():
            setattr(self, pname, p)
        cfg = self.layer_config
        H = hidden_size
        for layer in range(num_layers):
            self._add_act_quantizer(f"input_l{layer}", cfg.location_spec("input"))
            for sfx in self._suffixes():
                self._add_act_quantizer(f"hidden_l{layer}{sfx}", cfg.location_spec("hidden"))
                self._add_act_quantizer(f"cell_l{layer}{sfx}", cfg.location_spec("cell"))
                for kind in ("ih", "hh"):
                    pname = f"weight_{kind}_l{layer}{sfx}"
                    for k, gate in enumerate(GATES):
                        self._add_weight_quantizer(
                            f"{pname}_{gate}",
                            pname,
                            cfg.location_spec(f"gate_weights_{gate}"),
                            rows=(k * H, (k + 1) * H),
                            ch_axis=0,
                        )
        self._init_weight_quantizers()

    def _suffixes(self) -> Tuple[str, ...]:
        return ("", "_reverse") if self.bidirectional else ("",)

    @classmethod
    def _shape_kwargs(cls, m: nn.LSTM) -> Dict[str, Any]:
        if getattr(m, "proj_size", 0):
            raise ValueError(
                f"QuantLSTM: nn.LSTM(proj_size={m.proj_size}) is not supported; expected "
                f"proj_size=0. Keep this layer float in the plan (value None)."
            )
        return {
            "input_size": m.input_size,
            "hidden_size": m.hidden_size,
            "num_layers": m.num_layers,
            "bias": m.bias,
            "batch_first": m.batch_first,
            "dropout": float(m.dropout),
            "bidirectional": m.bidirectional,
        }

    def _float_kwargs(self) -> Dict[str, Any]:
        return {
            "input_size": self.input_size,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "bias": self.bias,
            "batch_first": self.batch_first,
            "dropout": self.dropout,
            "bidirectional": self.bidirectional,
        }

    def _quantizes_states(self, layer: int) -> bool:
        """True if layer ``layer`` fake-quantizes h_{t-1} or c_t (needs the step loop)."""
        if not self.quant_acts_enabled:
            return False
        keys = [f"{loc}_l{layer}{sfx}" for loc in ("hidden", "cell") for sfx in self._suffixes()]
        return any(k in self.act_quantizers for k in keys)

    def flatten_parameters(self) -> None:
        """No-op (API compatibility with ``nn.LSTM``)."""

    def _gate_weight(self, pname: str) -> Tensor:
        """``(4H, K)`` weight ``pname`` with each gate block fake-quantized (or dequantized)."""
        keys = [f"{pname}_{g}" for g in GATES]
        if not any(k in self._slots for k in keys):
            return getattr(self, pname)
        H = self.hidden_size
        blocks = []
        for k, key in enumerate(keys):
            if key in self._slots:
                blocks.append(self.quant_weight(key))
            else:
                blocks.append(getattr(self, pname)[k * H : (k + 1) * H])
        return torch.cat(blocks, dim=0)

    def forward(
        self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None
    ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        if isinstance(input, PackedSequence):
            raise ValueError(
                f"{self._qname('forward')}: PackedSequence input is not supported by QuantLSTM; "
                f"expected a padded tensor (use torch.nn.utils.rnn.pad_packed_sequence)"
            )
        if input.dim() not in (2, 3):
            raise ValueError(
                f"{self._qname('forward')}: expected input of shape (T, N, {self.input_size}) "
                f"(batch_first: (N, T, {self.input_size})) or unbatched (T, {self.input_size}); "
                f"received shape {tuple(input.shape)}"
            )
        if input.shape[-1] != self.input_size:
            raise ValueError(
                f"{self._qname('forward')}: expected input.size(-1) == input_size="
                f"{self.input_size}; received shape {tuple(input.shape)}"
            )
        batched = input.dim() == 3
        if not batched:
            x = input.unsqueeze(1)  # (T, 1, C)
        elif self.batch_first:
            x = input.transpose(0, 1)
        else:
            x = input
        T, N = x.shape[0], x.shape[1]
        D = 2 if self.bidirectional else 1
        H = self.hidden_size
        state_shape = (self.num_layers * D, N, H)
        if hx is None:
            h0 = x.new_zeros(state_shape)
            c0 = x.new_zeros(state_shape)
        else:
            h0, c0 = hx
            if not batched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
            for nm, t in (("h_0", h0), ("c_0", c0)):
                if tuple(t.shape) != state_shape:
                    raise ValueError(
                        f"{self._qname('forward')}: expected {nm} of shape {state_shape}; "
                        f"received {tuple(t.shape)}"
                    )

        layer_input = x
        h_n: List[Tensor] = []
        c_n: List[Tensor] = []
        for layer in range(self.num_layers):
            xq = self.quant_act(f"input_l{layer}", layer_input)
            if self.use_fused and not self._quantizes_states(layer):
                # Weight-only layer: PyTorch's fused kernel with the (fake-)quantized weights.
                flat: List[Tensor] = []
                for sfx in self._suffixes():
                    flat += [
                        self._gate_weight(f"weight_ih_l{layer}{sfx}"),
                        self._gate_weight(f"weight_hh_l{layer}{sfx}"),
                    ]
                    if self.bias:
                        flat += [
                            getattr(self, f"bias_ih_l{layer}{sfx}"),
                            getattr(self, f"bias_hh_l{layer}{sfx}"),
                        ]
                states = (h0[layer * D : (layer + 1) * D], c0[layer * D : (layer + 1) * D])
                layer_input, hn, cn = torch.lstm(
                    xq, states, flat, self.bias, 1, 0.0, self.training, self.bidirectional, False
                )
                h_n.extend(hn.unbind(0))
                c_n.extend(cn.unbind(0))
                if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                    layer_input = F.dropout(layer_input, p=self.dropout, training=True)
                continue
            outs = []
            for d, sfx in enumerate(self._suffixes()):
                w_ih = self._gate_weight(f"weight_ih_l{layer}{sfx}")
                w_hh = self._gate_weight(f"weight_hh_l{layer}{sfx}")
                b_ih = getattr(self, f"bias_ih_l{layer}{sfx}") if self.bias else None
                b_hh = getattr(self, f"bias_hh_l{layer}{sfx}") if self.bias else None
                xs = xq.flip(0) if d == 1 else xq
                gx = F.linear(xs, w_ih, b_ih)  # (T, N, 4H): input projections of all steps
                h = h0[layer * D + d]
                c = c0[layer * D + d]
                hid_key, cell_key = f"hidden_l{layer}{sfx}", f"cell_l{layer}{sfx}"
                ys = []
                for t in range(T):
                    # A zero initial state is exactly representable on every grid; skipping it
                    # keeps observers from initialising their range on an all-zero tensor.
                    hq = h if (t == 0 and hx is None) else self.quant_act(hid_key, h)
                    gates = gx[t] + F.linear(hq, w_hh, b_hh)
                    i, f, g, o = gates.chunk(4, dim=1)
                    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    c = self.quant_act(cell_key, c)
                    h = torch.sigmoid(o) * torch.tanh(c)
                    ys.append(h)
                y = torch.stack(ys, 0) if ys else x.new_zeros((0, N, H))
                outs.append(y.flip(0) if d == 1 else y)
                h_n.append(h)
                c_n.append(c)
            layer_input = outs[0] if D == 1 else torch.cat(outs, dim=2)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, p=self.dropout, training=True)

        output = layer_input
        hn, cn = torch.stack(h_n, 0), torch.stack(c_n, 0)
        if not batched:
            return output.squeeze(1), (hn.squeeze(1), cn.squeeze(1))
        if self.batch_first:
            output = output.transpose(0, 1)
        return output, (hn, cn)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        return s + ", " + super().extra_repr()
