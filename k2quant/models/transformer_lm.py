"""Causal Transformer language model over words or sentencepiece BPE units.

Architecture (pre-LN, as in icefall's ``transformer_lm`` and the LM of Xu et al. 2022):

    ids (N, L) -> Embedding * sqrt(d_model) + sinusoidal positions -> dropout
      -> num_layers x [x + Drop(SelfAttn(LN(x)));  x + Drop(FF(LN(x)))]
      -> LN -> logits = h @ E^T + b       (E: the input embedding table, "tied")

Every weight matrix is an ``nn.Linear`` (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` of each
attention block; ``ff1``, ``ff2`` of each feed-forward block) or the ``nn.Embedding`` ``embed``,
so :func:`k2quant.plan.quantize_` can swap each of them for its quantization-aware version;
nothing is hidden in ``nn.MultiheadAttention``'s raw parameters. The output layer has no
weight of its own: the logits use the embedding module's *effective* weight
(:meth:`TransformerLM.output_weight`): ``embed.effective_weight()`` if the module provides it
(a ``QuantEmbedding``: fake-quantized or frozen-dequantized table), else
``embed.quant_weight("weight")`` (same thing under the ``QuantModule`` base-class API), else
``embed.weight``. Quantizing ``embed`` therefore quantizes the output layer identically.
The output bias ``out_bias`` (V floats) stays float.

Symbols (icefall's convention, shared with :mod:`k2quant.lm.text`): id 0 ``<blk>`` is the
padding symbol and never predicted (its logit is masked to ``-inf``), id 1 ``<sos/eos>`` is
*one* symbol used both as the start-of-sentence input and the end-of-sentence target, id 2
``<unk>``. A sentence ``w_1 .. w_n`` is scored as ``log P(w_1 .. w_n, <eos> | <sos>)``:
inputs ``[sos, w_1 .. w_n]``, targets ``[w_1 .. w_n, eos]`` (n + 1 predictions).

The tokenizer that produced the ids travels with the model: ``TransformerLMConfig.tokenizer``
is a JSON-able dict (:meth:`k2quant.lm.text.Tokenizer.to_dict`), so a checkpoint or a packed
``.k2q`` file (whose header stores ``model_spec()``) is self-contained.

Presets: ``"small"`` (default; 2 layers, d_model 128, 4 heads, FF 512: AN4-scale text) and
``"paper"`` (6 layers, d_model 512, 8 heads, FF 2048: the Switchboard LM of the paper).
"""
import logging
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

PAD_ID = 0
SOS_ID = 1
EOS_ID = 1
UNK_ID = 2

PRESETS: Dict[str, Dict[str, Any]] = {
    "small": dict(d_model=128, num_heads=4, num_layers=2, dim_feedforward=512, dropout=0.1),
    "paper": dict(d_model=512, num_heads=8, num_layers=6, dim_feedforward=2048, dropout=0.1),
}


@dataclass
class TransformerLMConfig:
    """Validated, JSON-able configuration of :class:`TransformerLM`.

    Attributes:
      vocab_size: number of symbols, including ``<blk>`` (0), ``<sos/eos>`` (1), ``<unk>`` (2).
      d_model, num_heads, num_layers, dim_feedforward: sizes (``d_model % num_heads == 0``).
      dropout: dropout after the embedding, inside attention and after each sub-layer.
      max_len: longest input (tokens incl. ``<sos>``) accepted by ``forward``.
      pad_id, sos_id, eos_id, unk_id: special symbol ids (see the module docstring).
      tokenizer: ``k2quant.lm.text.Tokenizer.to_dict()`` of the training vocabulary, or None.
    """

    vocab_size: int
    d_model: int = 128
    num_heads: int = 4
    num_layers: int = 2
    dim_feedforward: int = 512
    dropout: float = 0.1
    max_len: int = 2048
    pad_id: int = PAD_ID
    sos_id: int = SOS_ID
    eos_id: int = EOS_ID
    unk_id: int = UNK_ID
    tokenizer: Optional[Dict[str, Any]] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "num_heads", "num_layers", "dim_feedforward",
                     "max_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"TransformerLMConfig.{name} must be a positive int, got {v!r}")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"TransformerLMConfig: d_model={self.d_model} must be divisible by "
                f"num_heads={self.num_heads}; pick e.g. num_heads=4 with d_model=128"
            )
        if not (0.0 <= float(self.dropout) < 1.0):
            raise ValueError(f"TransformerLMConfig.dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("pad_id", "sos_id", "eos_id", "unk_id"):
            v = getattr(self, name)
            if not (0 <= v < self.vocab_size):
                raise ValueError(
                    f"TransformerLMConfig.{name}={v} is outside the vocabulary [0, "
                    f"{self.vocab_size}); vocab_size must include the special symbols"
                )
        if self.pad_id in (self.sos_id, self.eos_id):
            raise ValueError("TransformerLMConfig: pad_id must differ from sos_id/eos_id")
        if self.tokenizer is not None:
            n = len(self.tokenizer.get("symbols", []))
            if n and n != self.vocab_size:
                raise ValueError(
                    f"TransformerLMConfig: the tokenizer has {n} symbols but vocab_size is "
                    f"{self.vocab_size}; build the config with vocab_size=len(tokenizer)"
                )

    @classmethod
    def preset(cls, name: str, vocab_size: int, **overrides) -> "TransformerLMConfig":
        """``"small"`` (AN4-scale default) or ``"paper"`` (6 x 512, 8 heads), with overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown TransformerLM preset {name!r}; known: {sorted(PRESETS)}")
        kw = dict(PRESETS[name])
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(vocab_size=vocab_size, **kw)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TransformerLMConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TransformerLMConfig: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**d)


def sinusoidal_positions(length: int, dim: int, device=None) -> torch.Tensor:
    """(length, dim) float32 sinusoidal position encodings (Vaswani et al.)."""
    pos = torch.arange(length, dtype=torch.float32, device=device).unsqueeze(1)
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device)
                    * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div[: dim // 2])
    return pe


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention from four ``nn.Linear`` projections.

    Shapes: ``x`` (N, L, d_model) -> (N, L, d_model). Position ``i`` attends to ``j <= i``.
    Right padding needs no key mask: real positions never see later (padded) positions.
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        N, L, D = x.shape
        H, Dh = self.num_heads, self.head_dim

        def split(t):
            return t.view(N, L, H, Dh).transpose(1, 2)  # (N, H, L, Dh)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        att = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(Dh))  # (N, H, L, L)
        att = att.masked_fill(causal_mask, float("-inf"))
        att = self.dropout(att.softmax(dim=-1))
        y = torch.matmul(att, v).transpose(1, 2).reshape(N, L, D)
        return self.out_proj(y)


class TransformerLMBlock(nn.Module):
    """Pre-LN block: ``x + Drop(Attn(LN(x)))`` then ``x + Drop(FF(LN(x)))`` (FF: ReLU)."""

    def __init__(self, d_model: int, num_heads: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = CausalSelfAttention(d_model, num_heads, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff1 = nn.Linear(d_model, dim_feedforward)
        self.ff2 = nn.Linear(dim_feedforward, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.norm1(x), causal_mask))
        h = self.ff2(self.dropout(F.relu(self.ff1(self.norm2(x)))))
        return x + self.dropout(h)


class TransformerLM(nn.Module):
    """Causal Transformer LM with tied input/output embeddings (see the module docstring)."""

    def __init__(self, config: TransformerLMConfig):
        super().__init__()
        if isinstance(config, dict):
            config = TransformerLMConfig.from_dict(config)
        self.config = config
        c = config
        self.vocab_size = c.vocab_size
        self.pad_id, self.sos_id, self.eos_id, self.unk_id = c.pad_id, c.sos_id, c.eos_id, c.unk_id
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.emb_scale = math.sqrt(c.d_model)
        self.emb_dropout = nn.Dropout(c.dropout)
        self.layers = nn.ModuleList(
            TransformerLMBlock(c.d_model, c.num_heads, c.dim_feedforward, c.dropout)
            for _ in range(c.num_layers)
        )
        self.final_norm = nn.LayerNorm(c.d_model)
        self.out_bias = nn.Parameter(torch.zeros(c.vocab_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        d = self.config.d_model
        nn.init.normal_(self.embed.weight, mean=0.0, std=d ** -0.5)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.out_bias)

    # ------------------------------------------------------------------ spec / tokenizer
    def model_spec(self) -> Dict[str, Any]:
        return {"arch": "transformer_lm", "config": self.config.to_dict()}

    @property
    def tokenizer(self):
        """The :class:`k2quant.lm.text.Tokenizer` stored in the config (``ValueError`` if none)."""
        if self.config.tokenizer is None:
            raise ValueError("this TransformerLM has no tokenizer in its config; build it with "
                             "TransformerLMConfig(tokenizer=tok.to_dict(), ...)")
        if getattr(self, "_tokenizer", None) is None:
            from k2quant.lm.text import tokenizer_from_dict

            self._tokenizer = tokenizer_from_dict(self.config.tokenizer)
        return self._tokenizer

    def __getstate__(self):
        # the cached tokenizer (a sentencepiece processor for BPE) is rebuilt on demand from
        # the config; keep it out of pickles and deep copies
        state = self.__dict__.copy()
        state.pop("_tokenizer", None)
        return state

    # ------------------------------------------------------------------------- compute
    def output_weight(self) -> torch.Tensor:
        """The (V, d_model) matrix of the tied output layer: the embedding's effective weight."""
        emb = self.embed
        if hasattr(emb, "effective_weight"):
            return emb.effective_weight()
        if hasattr(emb, "quant_weight"):
            return emb.quant_weight("weight")
        return emb.weight

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (N, L) int64 ids -> (N, L, V) float32 unnormalised scores (pad masked)."""
        if x.ndim != 2:
            raise ValueError(f"expected token ids of shape (N, L), got {tuple(x.shape)}")
        L = x.shape[1]
        if L > self.config.max_len:
            raise ValueError(f"input length {L} exceeds max_len={self.config.max_len}; split "
                             f"the sentence or build the LM with a larger max_len")
        h = self.embed(x) * self.emb_scale
        h = h + sinusoidal_positions(L, h.shape[-1], device=h.device).to(h.dtype)
        h = self.emb_dropout(h)
        mask = torch.ones(L, L, dtype=torch.bool, device=x.device).triu(1)
        for layer in self.layers:
            h = layer(h, mask)
        h = self.final_norm(h)
        out = F.linear(h, self.output_weight(), self.out_bias)
        return out.index_fill(-1, torch.tensor([self.pad_id], device=out.device), float("-inf"))

    def log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L) ids -> (N, L, V) log-probabilities of the next token."""
        return self.logits(x).log_softmax(dim=-1)

    def forward(self, x: torch.Tensor, y: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of each target.

        Args:
          x: (N, L) int64 inputs (``[sos, w_1, ..]``, right-padded with ``pad_id``).
          y: (N, L) int64 targets (``[w_1, .., eos]``, right-padded).
          lengths: (N,) number of valid positions of each row.
        Returns:
          (N, L) float32 nll; 0 at padded positions.
        """
        if x.shape != y.shape:
            raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}")
        logits = self.logits(x)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                              reduction="none", ignore_index=self.pad_id).view_as(y)
        pos = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        valid = pos < lengths.to(x.device).unsqueeze(1)
        return nll.masked_fill(~valid, 0.0)

    @torch.no_grad()
    def score_sentences(
        self,
        token_id_lists: Sequence[Sequence[int]],
        *,
        max_tokens: int = 4000,
        device: Optional[Union[str, torch.device]] = None,
    ) -> torch.Tensor:
        """Log-probability of each sentence (sum over its tokens and the final ``<eos>``).

        Sentences are sorted by length and scored in padded batches of at most
        ``max_tokens`` (padded) tokens; the result is in the input order.

        Args:
          token_id_lists: sentences as lists of token ids (no ``<sos>``/``<eos>``).
        Returns:
          1-D float64 tensor (on CPU) of length ``len(token_id_lists)``.

        Caution:
          The model is put in eval mode (no dropout) and left there.
        """
        from k2quant.lm.text import make_batches, pad_batch

        self.eval()
        if device is None:
            device = self.out_bias.device
        out = torch.zeros(len(token_id_lists), dtype=torch.float64)
        for idx in make_batches([len(s) + 1 for s in token_id_lists], max_tokens, shuffle=False):
            x, y, lengths = pad_batch([token_id_lists[i] for i in idx], self.sos_id, self.eos_id,
                                      self.pad_id)
            nll = self(x.to(device), y.to(device), lengths.to(device))
            out[torch.tensor(idx)] = -nll.double().sum(dim=1).cpu()
        return out


def spec_num_parameters(config: Dict[str, Any]) -> int:
    """Parameter-count registry entry (``k2quant.models.spec_num_parameters``): the parameters
    of ``build_transformer_lm(config)`` (tied embedding counted once), from the validated
    config alone."""
    c = TransformerLMConfig.from_dict(dict(config))
    d, f = c.d_model, c.dim_feedforward
    block = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 2 * 2 * d  # attention, FF, 2 LayerNorms
    return c.vocab_size * d + c.num_layers * block + 2 * d + c.vocab_size


def build_transformer_lm(config: Dict[str, Any]) -> TransformerLM:
    """Registry builder (``k2quant.models.build_model({"arch": "transformer_lm", ...})``)."""
    return TransformerLM(TransformerLMConfig.from_dict(dict(config)))


def load_lm(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> TransformerLM:
    """Load an LM for inference from a training checkpoint (``epoch-N.pt`` of
    :func:`k2quant.lm.train.train_lm`, or any dict with ``model_spec`` and ``model``) or from a
    packed ``.k2q`` file (:func:`k2quant.export.load_packed`). Returns it in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LM file {path} not found; expected a checkpoint from "
                                f"'k2quant train-lm' (EXP_DIR/epoch-N.pt) or a packed .k2q file")
    try:
        from k2quant.export import is_packed_file, load_packed
    except ImportError:  # pragma: no cover - export is part of the package
        is_packed_file = None
    if is_packed_file is not None and is_packed_file(path):
        model = load_packed(path)
    else:
        # Our checkpoints hold RNG states (numpy objects): not loadable with weights_only=True.
        ckpt = torch.load(str(path), map_location="cpu", weights_only=False)
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model_spec"), dict) \
                or "model" not in ckpt:
            got = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
            raise ValueError(f"{path}: expected a checkpoint dict with 'model_spec' and 'model' "
                             f"(written by 'k2quant train-lm'), got {got}")
        from k2quant.models import build_model

        model = build_model(ckpt["model_spec"])
        model.load_state_dict(ckpt["model"])
    if not isinstance(model, TransformerLM):
        raise ValueError(f"{path}: holds a {type(model).__name__}, not a TransformerLM")
    return model.to(device).eval()


__all__ = [
    "PRESETS",
    "TransformerLMConfig",
    "TransformerLM",
    "CausalSelfAttention",
    "TransformerLMBlock",
    "build_transformer_lm",
    "load_lm",
    "sinusoidal_positions",
]
