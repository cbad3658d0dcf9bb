"""Factored TDNN (TDNN-F) acoustic model with Kaldi's ``tdnnf-layer`` semantics.

Topology (Kaldi ``egs/swbd/s5c/local/chain/tuning/run_tdnn_7q.sh``, xconfig
``composite_layers.py``), with our module names::

    input_bn          BatchNorm1d(feat_dim, affine=False)      (optional; see below)
    tdnn1             affine Conv1d(feat_dim -> hidden, offsets -c..c) -> ReLU -> BN -> dropout
    tdnnfs.{i}        Kaldi tdnnf{i+2}, i = 0 .. len(strides)-1, time-stride s = strides[i]:
      .linear           Conv1d(hidden -> bottleneck_i, offsets (-s, 0), no bias), semi-orthogonal
      .affine           Conv1d(bottleneck_i -> hidden, offsets (0, s), bias)
      ReLU -> .batchnorm -> .dropout;  out = bypass_scale * input + branch
      (s = 0: both convs have kernel 1, i.e. no splicing)
    prefinal_l        Conv1d(hidden -> prefinal_bottleneck, kernel 1, no bias), semi-orthogonal
    prefinal_chain    .affine (small -> hidden) -> ReLU -> .batchnorm1
                      -> .linear (hidden -> small, semi-orthogonal, no bias) -> .batchnorm2
    output            Linear(prefinal_bottleneck -> num_classes) -> log_softmax
    prefinal_xent, output_xent   the same for the optional cross-entropy branch

Every weight is its own ``nn.Conv1d``/``nn.Linear`` leaf so that ``k2quant.plan.quantize_``
can give each its own bit width (e.g. ``tdnnfs.3.linear`` and ``tdnnfs.3.affine``). BatchNorm
layers have no affine parameters (Kaldi's ``BatchNormComponent`` has none).

Differences from Kaldi 7q: the 100-dim i-vector input and the fixed LDA transform are omitted
(``tdnn1`` splices the features itself; ``input_bn`` is a parameter-free per-dimension
normaliser standing in for the LDA/CMVN normalisation); the chain output is log-softmax
normalised (icefall's convention; Kaldi's chain output is unnormalised); l2-regularize,
learning-rate factors and the xent regularisation weight belong to the training loop.

Time and frame subsampling
--------------------------
Kaldi evaluates the network only at the output frames ``t = 0, 3, 6, ...``; layers whose time
offsets are multiples of 3 then need their input only at multiples of 3. We reproduce that
exactly: all layers up to the first index ``i0`` from which every remaining stride is a multiple
of ``subsampling_factor`` (0 counts) run at the input frame rate; the stream is then subsampled
(``x[:, :, ::3]``) and the remaining layers run at the output rate with dilation ``s / 3``.
For the 7q strides ``1,1,1,0,3,...`` the subsampling happens before tdnnf5 (stride 0).
All convolutions are unpadded ("valid"); so, counted in input frames,

* ``left_context = right_context = input_context + sum(strides)`` (34 for 7q, 22 for
  ``small``): output frame ``k`` depends exactly on input frames ``3k - left_context ..
  3k + right_context``;
* ``forward(x)`` (``pad=True``) pads the features by repeating the first frame
  ``left_context`` times and the last frame as needed on the right (Kaldi's decoder does the
  same), and returns ``T' = ceil(T / 3)`` frames; output frame ``k`` is input frame ``3k``.
  ``T' >= num_frames // 3`` for every supervision segment, so icefall's
  ``DenseFsaVec(log_probs, segments // 3, allow_truncate=2)`` always works;
* ``forward(x, pad=False)`` (for streaming with explicit context) expects the context to be
  included: output frame ``k`` is input frame ``left_context + 3k`` and
  ``T' = floor((T - 1 - left_context - right_context) / 3) + 1``.
"""
import copy
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from k2quant.models.dropout import ContinuousDropout, DropoutSchedule
from k2quant.models.orthonormal import constrain_orthonormal_, semi_orthogonal_init_

#: tdnnf2..tdnnf15 time strides of Kaldi's swbd run_tdnn_7q.sh.
KALDI_7Q_STRIDES = (1, 1, 1, 0, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3)
#: Kaldi 7q's --trainer.dropout-schedule.
KALDI_DROPOUT_SCHEDULE = "0,0@0.20,0.5@0.50,0"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class TdnnFConfig:
    """Validated, JSON-able configuration of :class:`TdnnF`.

    Attributes:
      feat_dim: input feature dimension C of (N, T, C).
      num_classes: output dimension (pdfs / tokens of the topology).
      hidden_dim: width of tdnn1 and every tdnnf layer (Kaldi ``dim``).
      bottleneck_dims: bottleneck of each tdnnf layer; an int (same for all) or one int per
        layer. Stored as a list of ``len(strides)`` ints.
      strides: Kaldi ``time-stride`` of each tdnnf layer (>= 0; 0 = no splicing).
      input_context: tdnn1 splices offsets ``-c..c`` (Kaldi 7q: ``Append(-1,0,1)``, c = 1).
      prefinal_bottleneck: ``small-dim`` of the prefinal layers (and ``prefinal_l``).
      bypass_scale: scale of the tdnnf residual path, ``|bypass_scale| <= 1`` (Kaldi 0.66).
      dropout_schedule: Kaldi dropout schedule string, a constant, or ``None`` (no dropout).
      xent: build the cross-entropy branch (``prefinal_xent`` + ``output_xent``).
      orthonormal_every: :meth:`TdnnF.on_step` re-imposes the semi-orthogonal constraint every
        this many steps (Kaldi: on average every 4 minibatches); 0 disables it.
      subsampling_factor: output frame rate divisor (Kaldi ``frame-subsampling-factor``, 3).
      input_batchnorm: normalise the features with a parameter-free BatchNorm first.
    """

    feat_dim: int
    num_classes: int
    hidden_dim: int = 1536
    bottleneck_dims: Union[int, List[int]] = 160
    strides: List[int] = field(default_factory=lambda: list(KALDI_7Q_STRIDES))
    input_context: int = 1
    prefinal_bottleneck: int = 256
    bypass_scale: float = 0.66
    dropout_schedule: Optional[str] = KALDI_DROPOUT_SCHEDULE
    xent: bool = False
    orthonormal_every: int = 4
    subsampling_factor: int = 3
    input_batchnorm: bool = True

    def __post_init__(self) -> None:
        for name, minimum in (
            ("feat_dim", 1),
            ("num_classes", 1),
            ("hidden_dim", 1),
            ("input_context", 0),
            ("prefinal_bottleneck", 1),
            ("orthonormal_every", 0),
            ("subsampling_factor", 1),
        ):
            v = getattr(self, name)
            if not _is_int(v) or v < minimum:
                raise ValueError(f"TdnnFConfig.{name} must be an int >= {minimum}, got {v!r}")
        if not isinstance(self.strides, (list, tuple)) or not all(
            _is_int(s) and s >= 0 for s in self.strides
        ):
            raise ValueError(
                f"TdnnFConfig.strides must be a list of ints >= 0 (Kaldi time-stride per tdnnf "
                f"layer, e.g. [1, 1, 1, 0, 3, 3]), got {self.strides!r}"
            )
        self.strides = [int(s) for s in self.strides]
        n = len(self.strides)
        b = self.bottleneck_dims
        if _is_int(b):
            b = [b] * n
        if not isinstance(b, (list, tuple)) or not all(_is_int(d) for d in b):
            raise ValueError(
                f"TdnnFConfig.bottleneck_dims must be an int or a list of ints, got {b!r}"
            )
        if len(b) != n:
            raise ValueError(
                f"TdnnFConfig.bottleneck_dims has {len(b)} entries but strides has {n} tdnnf "
                f"layers; give one bottleneck per layer or a single int"
            )
        if any(d < 1 for d in b):
            raise ValueError(f"TdnnFConfig.bottleneck_dims must all be >= 1, got {list(b)}")
        self.bottleneck_dims = [int(d) for d in b]
        if (
            isinstance(self.bypass_scale, bool)
            or not isinstance(self.bypass_scale, (int, float))
            or abs(self.bypass_scale) > 1.0
        ):
            raise ValueError(
                f"TdnnFConfig.bypass_scale must be a number with |value| <= 1 (Kaldi default "
                f"0.66), got {self.bypass_scale!r}"
            )
        self.bypass_scale = float(self.bypass_scale)
        for name in ("xent", "input_batchnorm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TdnnFConfig.{name} must be True or False, got "
                                 f"{getattr(self, name)!r}")
        if isinstance(self.dropout_schedule, (int, float)) and not isinstance(
            self.dropout_schedule, bool
        ):
            self.dropout_schedule = str(float(self.dropout_schedule))
        DropoutSchedule(self.dropout_schedule)  # validates

    @property
    def num_layers(self) -> int:
        """Number of tdnnf layers (``len(strides)``)."""
        return len(self.strides)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able dict; ``TdnnFConfig.from_dict(cfg.to_dict()) == cfg``."""
        return copy.deepcopy(asdict(self))

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TdnnFConfig":
        """Build from :meth:`to_dict` output; unknown keys raise ``ValueError``."""
        if not isinstance(d, dict):
            raise ValueError(f"TdnnFConfig.from_dict: expected a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"TdnnFConfig.from_dict: unknown keys {unknown}; valid keys are {sorted(known)}"
            )
        missing = sorted(k for k in ("feat_dim", "num_classes") if k not in d)
        if missing:
            raise ValueError(f"TdnnFConfig.from_dict: missing required keys {missing}")
        return cls(**copy.deepcopy(d))


def kaldi_7q_config(feat_dim: int = 40, num_classes: int = 6034, **overrides) -> TdnnFConfig:
    """Kaldi swbd 7q shape: tdnn1 1536, tdnnf2..15 1536/160, prefinal 1536/256, xent branch.

    Kaldi's 7q script as published uses bottleneck-dim 192 (21.36M params incl. xent with the
    i-vector); bottleneck 160 gives the 18.7M / 16.4M (chain only) of the TDNN-F systems we
    reproduce (GUIDE section 2). 6034 pdfs is the 7q tree. Without the i-vector input the
    chain branch has 16,210,322 parameters (40-dim features, 6034 outputs).
    """
    base = dict(
        feat_dim=feat_dim,
        num_classes=num_classes,
        hidden_dim=1536,
        bottleneck_dims=160,
        strides=list(KALDI_7Q_STRIDES),
        input_context=1,
        prefinal_bottleneck=256,
        bypass_scale=0.66,
        dropout_schedule=KALDI_DROPOUT_SCHEDULE,
        xent=True,
        orthonormal_every=4,
        subsampling_factor=3,
    )
    base.update(overrides)
    return TdnnFConfig(**base)


def small_config(feat_dim: int = 80, num_classes: int = 500, **overrides) -> TdnnFConfig:
    """A ~2.5M-parameter TDNN-F for the small CPU corpora (80-dim fbank).

    hidden 512, bottleneck 96, 10 tdnnf layers with strides 1,1,1,0,3,3,3,3,3,3 (context 22
    frames each side), prefinal 512/256, no xent branch.
    """
    base = dict(
        feat_dim=feat_dim,
        num_classes=num_classes,
        hidden_dim=512,
        bottleneck_dims=96,
        strides=[1, 1, 1, 0, 3, 3, 3, 3, 3, 3],
        input_context=1,
        prefinal_bottleneck=256,
        bypass_scale=0.66,
        dropout_schedule=KALDI_DROPOUT_SCHEDULE,
        xent=False,
        orthonormal_every=4,
        subsampling_factor=3,
    )
    base.update(overrides)
    return TdnnFConfig(**base)


PRESETS = {"kaldi_7q": kaldi_7q_config, "small": small_config}


def get_preset(name: str, feat_dim: int, num_classes: int, **overrides) -> TdnnFConfig:
    """Return the :class:`TdnnFConfig` of preset ``name`` (``kaldi_7q`` or ``small``).

    ``overrides`` replace any config field, e.g. ``get_preset("small", 80, 300, xent=True)``.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown TDNN-F preset {name!r}; known presets: {sorted(PRESETS)}")
    known = {f.name for f in fields(TdnnFConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown TDNN-F config field(s) {unknown}; valid fields are "
                         f"{sorted(known)}")
    return PRESETS[name](feat_dim=feat_dim, num_classes=num_classes, **overrides)


def count_parameters(config: TdnnFConfig, include_xent: bool = True) -> int:
    """Parameters of ``TdnnF(config)`` computed from the config alone (no model is built);
    equals ``TdnnF(config).num_parameters(include_xent)``. Handy for size budgets."""
    if isinstance(config, dict):
        config = TdnnFConfig.from_dict(config)
    H, P, C = config.hidden_dim, config.prefinal_bottleneck, config.num_classes
    n = config.feat_dim * (2 * config.input_context + 1) * H + H  # tdnn1
    for s, b in zip(config.strides, config.bottleneck_dims):
        k = 2 if s > 0 else 1
        n += H * k * b + (b * k * H + H)  # linear (no bias) + affine
    n += H * P  # prefinal_l
    branch = (P * H + H + H * P) + (P * C + C)  # prefinal layer + output
    n += branch * (2 if (config.xent and include_xent) else 1)
    return n


class TdnnLayer(nn.Module):
    """Kaldi ``relu-batchnorm-dropout-layer`` on spliced input (tdnn1).

    ``affine``: Conv1d(in_dim, out_dim, kernel 2c+1) = offsets ``-c..c``; then ReLU, BatchNorm
    (no affine params), continuous dropout. (N, in_dim, T) -> (N, out_dim, T - 2c).
    """

    def __init__(self, in_dim: int, out_dim: int, context: int) -> None:
        super().__init__()
        self.context = context
        self.affine = nn.Conv1d(in_dim, out_dim, kernel_size=2 * context + 1)
        self.batchnorm = nn.BatchNorm1d(out_dim, affine=False)
        self.dropout = ContinuousDropout()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.batchnorm(F.relu(self.affine(x))))


class TdnnfLayer(nn.Module):
    """One Kaldi ``tdnnf-layer`` (factored TDNN with bypass).

    Args:
      dim: input = output dimension D.
      bottleneck_dim: B.
      stride: Kaldi ``time-stride`` s in input frames (0 = no splicing).
      dilation: the offset s expressed in frames of the stream this layer runs on (s, or
        s / subsampling_factor after subsampling); unused when s = 0.
      bypass_scale: residual scale.

    Input (N, D, T) -> output (N, D, T - 2 * dilation) (T unchanged for s = 0); output index j
    corresponds to input index j + dilation::

        z_t = L_0 x_{t-s} + L_1 x_t                 (linear: weight[:, :, 0] is offset -s)
        y_t = b + A_0 z_t + A_1 z_{t+s}             (affine: weight[:, :, 1] is offset +s)
        out_t = bypass_scale * x_t + dropout(BN(ReLU(y_t)))
    """

    def __init__(
        self, dim: int, bottleneck_dim: int, stride: int, dilation: int, bypass_scale: float
    ) -> None:
        super().__init__()
        self.stride = stride
        self.dilation = dilation if stride > 0 else 0
        self.bypass_scale = bypass_scale
        k = 2 if stride > 0 else 1
        d = max(self.dilation, 1)
        self.linear = nn.Conv1d(dim, bottleneck_dim, kernel_size=k, dilation=d, bias=False)
        self.affine = nn.Conv1d(bottleneck_dim, dim, kernel_size=k, dilation=d)
        self.batchnorm = nn.BatchNorm1d(dim, affine=False)
        self.dropout = ContinuousDropout()
        semi_orthogonal_init_(self.linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dropout(self.batchnorm(F.relu(self.affine(self.linear(x)))))
        c = self.dilation
        bypass = x[:, :, c : x.shape[2] - c] if c > 0 else x
        return self.bypass_scale * bypass + y


class PrefinalLayer(nn.Module):
    """Kaldi ``prefinal-layer``: affine (small -> big) -> ReLU -> BN -> linear (big -> small,
    semi-orthogonal, no bias) -> BN. Shapes (N, small, T) -> (N, small, T), all kernel 1."""

    def __init__(self, big_dim: int, small_dim: int) -> None:
        super().__init__()
        self.affine = nn.Conv1d(small_dim, big_dim, kernel_size=1)
        self.batchnorm1 = nn.BatchNorm1d(big_dim, affine=False)
        self.linear = nn.Conv1d(big_dim, small_dim, kernel_size=1, bias=False)
        self.batchnorm2 = nn.BatchNorm1d(small_dim, affine=False)
        semi_orthogonal_init_(self.linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.batchnorm1(F.relu(self.affine(x)))
        return self.batchnorm2(self.linear(x))


class TdnnF(nn.Module):
    """TDNN-F acoustic model (see the module docstring for topology, context and T').

    ``forward(x)``: x (N, T, feat_dim) float32 -> log-probs (N, ceil(T / 3), num_classes).

    Attributes:
      config: the :class:`TdnnFConfig` (kept up to date by :func:`refactor_bottleneck`).
      subsampling_factor: 3 (from the config).
      left_context, right_context: input frames of context each output frame consumes.
    """

    def __init__(self, config: TdnnFConfig) -> None:
        super().__init__()
        if isinstance(config, dict):
            config = TdnnFConfig.from_dict(config)
        if not isinstance(config, TdnnFConfig):
            raise ValueError(f"TdnnF: expected a TdnnFConfig or dict, got {type(config).__name__}")
        self.config = copy.deepcopy(config)
        cfg = self.config
        sf = cfg.subsampling_factor
        self.subsampling_factor = sf
        strides = cfg.strides
        n = len(strides)
        # first layer from which every stride is a multiple of sf: subsample before it
        i0 = n
        while i0 > 0 and strides[i0 - 1] % sf == 0:
            i0 -= 1
        self.subsample_index = i0
        self.left_context = cfg.input_context + sum(strides)
        self.right_context = self.left_context

        self.input_bn = (
            nn.BatchNorm1d(cfg.feat_dim, affine=False) if cfg.input_batchnorm else None
        )
        self.tdnn1 = TdnnLayer(cfg.feat_dim, cfg.hidden_dim, cfg.input_context)
        self.tdnnfs = nn.ModuleList(
            TdnnfLayer(
                cfg.hidden_dim,
                cfg.bottleneck_dims[i],
                s,
                s if i < i0 else s // sf,
                cfg.bypass_scale,
            )
            for i, s in enumerate(strides)
        )
        self.prefinal_l = nn.Conv1d(
            cfg.hidden_dim, cfg.prefinal_bottleneck, kernel_size=1, bias=False
        )
        semi_orthogonal_init_(self.prefinal_l.weight)
        self.prefinal_chain = PrefinalLayer(cfg.hidden_dim, cfg.prefinal_bottleneck)
        self.output = nn.Linear(cfg.prefinal_bottleneck, cfg.num_classes)
        if cfg.xent:
            self.prefinal_xent = PrefinalLayer(cfg.hidden_dim, cfg.prefinal_bottleneck)
            self.output_xent = nn.Linear(cfg.prefinal_bottleneck, cfg.num_classes)
        else:
            self.prefinal_xent = None
            self.output_xent = None
        self._schedule = DropoutSchedule(cfg.dropout_schedule)
        self._dropout_p = 0.0
        self.set_dropout_proportion(self._schedule(0.0))

    # ----------------------------------------------------------------------- description
    def model_spec(self) -> Dict[str, Any]:
        """``{"arch": "tdnnf", "config": config.to_dict()}`` for ``k2quant.models.build_model``."""
        return {"arch": "tdnnf", "config": self.config.to_dict()}

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def feat_dim(self) -> int:
        return self.config.feat_dim

    def tdnnf_layer_names(self) -> List[str]:
        """Names of the factored layers, ``["tdnnfs.0", ...]`` (tdnnfs.i is Kaldi tdnnf{i+2});
        each has the leaves ``<name>.linear`` and ``<name>.affine``."""
        return [f"tdnnfs.{i}" for i in range(len(self.tdnnfs))]

    def factored_pairs(self) -> List[Tuple[str, str]]:
        """``[("tdnnfs.0.linear", "tdnnfs.0.affine"), ...]``: the two leaves of each layer."""
        return [(f"{n}.linear", f"{n}.affine") for n in self.tdnnf_layer_names()]

    def semi_orthogonal_layer_names(self) -> List[str]:
        """Modules constrained by :meth:`constrain_orthonormal` (Kaldi
        ``orthonormal-constraint=-1``): every ``tdnnfs.i.linear``, ``prefinal_l`` and the
        ``.linear`` of each prefinal layer."""
        names = [f"{n}.linear" for n in self.tdnnf_layer_names()]
        names += ["prefinal_l", "prefinal_chain.linear"]
        if self.prefinal_xent is not None:
            names.append("prefinal_xent.linear")
        return names

    def num_parameters(self, include_xent: bool = True) -> int:
        """Number of trainable parameters (optionally without the xent branch)."""
        total = 0
        for name, p in self.named_parameters():
            if not include_xent and name.split(".")[0] in ("prefinal_xent", "output_xent"):
                continue
            total += p.numel()
        return total

    def output_lengths(self, lengths):
        """Output frames for ``lengths`` input frames with ``pad=True``: ``ceil(T / 3)``.

        Accepts an int or an integer tensor (N,)."""
        sf = self.subsampling_factor
        return (lengths + sf - 1) // sf

    # -------------------------------------------------------------------- forward
    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise ValueError(
                f"TdnnF: expected features as a torch.Tensor (N, T, {self.config.feat_dim}), "
                f"got {type(x).__name__}"
            )
        if x.dim() != 3 or x.shape[2] != self.config.feat_dim:
            raise ValueError(
                f"TdnnF: expected features (N, T, {self.config.feat_dim}), got "
                f"{tuple(x.shape)}; check the feature extractor's dimension or the model's "
                f"feat_dim"
            )
        if not x.is_floating_point():
            raise ValueError(f"TdnnF: expected float32 features, got {x.dtype}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"TdnnF: expected N >= 1 and T >= 1, got {tuple(x.shape)}")

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, T) -> (N, C, left_context + 3 (T' - 1) + right_context + 1), edge-replicated."""
        T = x.shape[2]
        sf = self.subsampling_factor
        t_out = (T + sf - 1) // sf
        right = sf * (t_out - 1) + self.right_context - (T - 1)
        if right < 0:  # can only happen when right_context < sf - 1
            x = x[:, :, : T + right]
            right = 0
        if self.left_context == 0 and right == 0:
            return x
        return F.pad(x, (self.left_context, right), mode="replicate")

    def encode(self, x: torch.Tensor, pad: bool = True) -> torch.Tensor:
        """Shared trunk: features (N, T, C) -> ``prefinal_l`` output (N, prefinal, T')."""
        self._check_input(x)
        T = x.shape[1]
        x = x.transpose(1, 2)  # (N, C, T)
        if pad:
            x = self._pad(x)
        elif T < self.left_context + self.right_context + 1:
            raise ValueError(
                f"TdnnF(pad=False): need at least left_context + right_context + 1 = "
                f"{self.left_context + self.right_context + 1} frames, got T={T}"
            )
        if self.input_bn is not None:
            x = self.input_bn(x)
        x = self.tdnn1(x)
        sf = self.subsampling_factor
        for i, layer in enumerate(self.tdnnfs):
            if i == self.subsample_index and sf > 1:
                x = x[:, :, ::sf]
            x = layer(x)
        if self.subsample_index == len(self.tdnnfs) and sf > 1:
            x = x[:, :, ::sf]
        return self.prefinal_l(x)

    def forward(
        self, x: torch.Tensor, return_xent: bool = False, pad: bool = True
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Compute log-probabilities.

        Args:
          x: 3-D float32 tensor (N, T, feat_dim) of features.
          return_xent: also return the xent branch's log-probs (needs ``config.xent``).
          pad: True (default): edge-pad so that ``T' = ceil(T / 3)`` and output frame k is
            input frame 3k. False: x already carries ``left_context``/``right_context``
            frames; output frame k is input frame ``left_context + 3k``.

        Returns:
          log-probs (N, T', num_classes) float32 (log_softmax over the last dim), or the pair
          (chain log-probs, xent log-probs) if ``return_xent``.
        """
        if return_xent and self.prefinal_xent is None:
            raise ValueError(
                "TdnnF.forward(return_xent=True): this model has no xent branch; build it with "
                "TdnnFConfig(xent=True)"
            )
        h = self.encode(x, pad=pad)
        chain = self.prefinal_chain(h).transpose(1, 2)
        chain = F.log_softmax(self.output(chain), dim=-1)
        if not return_xent:
            return chain
        xent = self.prefinal_xent(h).transpose(1, 2)
        return chain, F.log_softmax(self.output_xent(xent), dim=-1)

    # ------------------------------------------------------------------ training helpers
    def constrain_orthonormal(self) -> int:
        """One Kaldi semi-orthogonal update of every layer in
        :meth:`semi_orthogonal_layer_names` (floating scale). Call after ``optimizer.step()``.

        Layers whose weight is not a float tensor (frozen quantized layers) are skipped;
        fake-quant layers have their float shadow weights constrained. Returns the number of
        layers updated."""
        count = 0
        for name in self.semi_orthogonal_layer_names():
            module = self.get_submodule(name)
            if getattr(module, "frozen", False):  # k2quant.nn module after convert()
                continue
            w = getattr(module, "weight", None)
            if isinstance(w, torch.Tensor) and w.is_floating_point():
                constrain_orthonormal_(w.data)
                count += 1
        return count

    def on_step(self, step: int) -> bool:
        """Call once per optimizer step (``step`` counts from 0 or 1): re-imposes the
        semi-orthogonal constraint every ``config.orthonormal_every`` steps. Returns whether
        it did."""
        k = self.config.orthonormal_every
        if k > 0 and step % k == 0:
            self.constrain_orthonormal()
            return True
        return False

    @property
    def dropout_proportion(self) -> float:
        """Current dropout proportion p of every ContinuousDropout (0 in eval mode has no
        effect anyway)."""
        return self._dropout_p

    def set_dropout_proportion(self, p: float) -> None:
        """Set the dropout proportion (scale ~ Uniform[1-2p, 1+2p]) of tdnn1 and every tdnnf."""
        p = ContinuousDropout(p).p  # validates: a number in [0, 1)
        for m in self.modules():
            if isinstance(m, ContinuousDropout):
                m.p = p
        self._dropout_p = p

    def set_training_progress(self, fraction: float) -> float:
        """Set dropout from ``config.dropout_schedule`` at ``fraction`` in [0, 1] of training
        (Kaldi: data processed / total). Returns the proportion now in use."""
        p = self._schedule(fraction)
        self.set_dropout_proportion(p)
        return p

    def refactor_bottleneck(self, layer: Union[str, int], new_dim: int) -> Dict[str, Any]:
        """Method form of :func:`refactor_bottleneck`."""
        return refactor_bottleneck(self, layer, new_dim)


def _layer_index(model: TdnnF, layer: Union[str, int]) -> int:
    names = model.tdnnf_layer_names()
    if _is_int(layer) and 0 <= layer < len(names):
        return int(layer)
    if isinstance(layer, str) and layer in names:
        return names.index(layer)
    raise ValueError(
        f"refactor_bottleneck: unknown TDNN-F layer {layer!r}; expected one of {names} or an "
        f"index 0..{len(names) - 1}"
    )


def refactor_bottleneck(model: TdnnF, layer: Union[str, int], new_dim: int) -> Dict[str, Any]:
    """Re-factorise one TDNN-F layer to bottleneck ``new_dim`` (in place), keeping the
    semi-orthogonal constraint.

    The layer maps ``x`` to ``y_t = b + A_0 z_t + A_1 z_{t+s}``, ``z_t = L_0 x_{t-s} + L_1 x_t``
    (``L`` = ``linear`` (B, D, k), ``A`` = ``affine`` (D, B, k)). Because the two taps of ``A``
    read ``z`` at different times, the combined 3-tap operator is not a single matrix whose SVD
    gives the best factorisation. We choose a rank-r subspace of the bottleneck instead:
    ``z' = M z`` (r x B), ``L' = M L``, ``A'_j = A_j N`` (D x r), minimising
    ``E ||(A_cat - A'_cat M) z||^2`` for the stacked affine ``A_cat = [A_0; A_1]`` (kD x B)
    with ``Cov(z) = C = L L^T`` (``L`` as a (B, D k) matrix). This assumes the spliced input
    is white and ignores the correlation of ``z_t`` and ``z_{t+s}`` (they share ``x_t``), i.e.
    it treats the taps independently. The optimum: ``S = C^{1/2}``,
    ``(A_cat S)^T (A_cat S) = V diag(sigma^2) V^T`` (descending), ``V_r`` its first r columns,
    ``M = c V_r^T S^{-1}``, ``A'_cat = A_cat S V_r / c``, with ``c = sqrt(tr(C) / B)`` the
    layer's current orthonormal scale. Then ``L' L'^T = c^2 I`` exactly (the constraint holds
    with the same scale) and with ``new_dim = B`` the layer is unchanged up to rounding.
    For an exactly semi-orthogonal ``L`` this reduces to the SVD of the affine weight reshaped
    to (k D, B). The bias is kept. Computed in float64.

    Args:
      model: a float :class:`TdnnF` (call before ``quantize_``).
      layer: ``"tdnnfs.i"`` or index ``i``.
      new_dim: 1 <= new_dim <= current bottleneck.

    Returns:
      dict with ``layer``, ``old_dim``, ``new_dim`` and ``retained_energy`` (fraction of
      ``sum(sigma^2)`` kept, 1.0 when nothing is dropped). ``model.config.bottleneck_dims``
      is updated, so ``model.model_spec()`` describes the new shape.
    """
    if not isinstance(model, TdnnF):
        raise ValueError(f"refactor_bottleneck: expected a TdnnF model, got {type(model).__name__}")
    i = _layer_index(model, layer)
    name = f"tdnnfs.{i}"
    mod = model.tdnnfs[i]
    lin, aff = mod.linear, mod.affine
    if type(lin) is not nn.Conv1d or type(aff) is not nn.Conv1d:
        raise ValueError(
            f"refactor_bottleneck: {name}.linear/.affine must be float nn.Conv1d, got "
            f"{type(lin).__name__}/{type(aff).__name__}; refactor the float model before "
            f"quantize_"
        )
    B, D, k = lin.weight.shape
    if not _is_int(new_dim) or not (1 <= new_dim <= B):
        raise ValueError(
            f"refactor_bottleneck: new_dim for {name} must be an int in 1..{B} (its current "
            f"bottleneck), got {new_dim!r}"
        )
    with torch.no_grad():
        Lm = lin.weight.detach().double().reshape(B, D * k)
        A_cat = aff.weight.detach().double().permute(2, 0, 1).reshape(k * D, B)
        C = Lm @ Lm.t()
        lam, Q = torch.linalg.eigh(C)
        lam_max = float(lam.max())
        if lam_max <= 0.0:
            raise ValueError(f"refactor_bottleneck: {name}.linear is all zeros")
        lam = lam.clamp(min=lam_max * 1e-12)
        S = (Q * lam.sqrt()) @ Q.t()
        S_inv = (Q * lam.rsqrt()) @ Q.t()
        G = (A_cat @ S).t() @ (A_cat @ S)
        G = 0.5 * (G + G.t())
        sig2, V = torch.linalg.eigh(G)  # ascending
        sig2, V = sig2.flip(0).clamp(min=0.0), V.flip(1)
        V_r = V[:, :new_dim]
        c = math.sqrt(float(torch.trace(C)) / B)
        M = c * (V_r.t() @ S_inv)  # (r, B)
        L_new = (M @ Lm).reshape(new_dim, D, k)
        A_new = ((A_cat @ S @ V_r) / c).reshape(k, D, new_dim).permute(1, 2, 0)
        total = float(sig2.sum())
        retained = float(sig2[:new_dim].sum()) / total if total > 0 else 1.0

        dev, dt = lin.weight.device, lin.weight.dtype
        new_lin = nn.Conv1d(D, new_dim, kernel_size=k, dilation=lin.dilation, bias=False)
        new_aff = nn.Conv1d(new_dim, D, kernel_size=k, dilation=aff.dilation)
        new_lin = new_lin.to(device=dev, dtype=dt)
        new_aff = new_aff.to(device=dev, dtype=dt)
        new_lin.weight.copy_(L_new.to(dt))
        new_aff.weight.copy_(A_new.contiguous().to(dt))
        new_aff.bias.copy_(aff.bias.detach())
        new_lin.train(lin.training)
        new_aff.train(aff.training)
    mod.linear, mod.affine = new_lin, new_aff
    dims = list(model.config.bottleneck_dims)
    dims[i] = new_dim
    model.config.bottleneck_dims = dims
    return {"layer": name, "old_dim": B, "new_dim": new_dim, "retained_energy": retained}


def spec_num_parameters(config: Dict[str, Any]) -> int:
    """Parameter-count registry entry (``k2quant.models.spec_num_parameters``): the parameters
    of ``build_tdnnf(config)``, from the validated config alone."""
    return count_parameters(TdnnFConfig.from_dict(config))


def build_tdnnf(config: Union[Dict[str, Any], TdnnFConfig]) -> TdnnF:
    """Registry builder (``k2quant.models.build_model({"arch": "tdnnf", "config": ...})``)."""
    if isinstance(config, TdnnFConfig):
        return TdnnF(config)
    return TdnnF(TdnnFConfig.from_dict(config))
