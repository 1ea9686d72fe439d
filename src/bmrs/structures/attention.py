"""Attention heads as prunable structures.

A head is pruned by gating its output: every attention module here passes its per-head
outputs, shaped ``(N, H, T, D)``, through a child module ``heads`` (an ``nn.Identity``)
before the heads are merged and projected back to the embedding. :func:`bmrs.attach_gates`
puts a :class:`~bmrs.NoiseGate` with ``dim=1`` on that module, one structure per head.

* :class:`MultiheadSelfAttention`: the library's own self-attention (batch first), with
  separate ``q``, ``k``, ``v`` and ``out`` linear layers whose inner width ``H * D`` is
  free of the embedding width, so heads can be physically removed.
* :func:`expose_heads`: turns an ``nn.MultiheadAttention`` of a user's model into a
  :class:`HeadedMultiheadAttention` in place (same parameters, same state-dict keys, same
  outputs), which has the ``heads`` site.
* :func:`compact_attention`: the module with only the kept heads, the gate's scale folded
  into the output projection. For an ``nn.MultiheadAttention`` the result is a
  :class:`CompactMultiheadAttention`, which is called like an ``nn.MultiheadAttention``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import BMRSError

__all__ = [
    "MultiheadSelfAttention",
    "HeadedMultiheadAttention",
    "CompactMultiheadAttention",
    "HEAD_MODULES",
    "expose_heads",
    "compact_attention",
    "head_input_weights",
    "params_per_head",
    "is_packed_attention",
    "packed_attention_problem",
    "packed_head_input_weights",
    "params_per_packed_head",
    "compact_packed_attention",
]


# --- the attention computation shared by every module here ------------------------------------


def _attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    heads: nn.Module,
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    dropout_p: float,
    need_weights: bool,
    is_causal: bool,
) -> tuple[Tensor, Tensor | None]:
    """Scaled dot-product attention of per-head tensors, heads passed through ``heads``.

    ``q`` is ``(N, H, L, D)``, ``k`` and ``v`` are ``(N, H, S, D)``. Masks are float masks
    (added to the scores): ``attn_mask`` of shape ``(L, S)`` or ``(N * H, L, S)``,
    ``key_padding_mask`` of shape ``(N, S)``. ``is_causal`` adds a causal mask. Returns the
    merged heads ``(N, L, H * D)`` and, with ``need_weights``, the attention weights
    ``(N, H, L, S)`` (after dropout, as ``nn.MultiheadAttention`` returns them).
    """
    n, h, length, d = q.shape
    source = k.shape[2]
    mask = None
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if attn_mask.shape != (length, source):
                raise RuntimeError(
                    f"The shape of the 2D attn_mask is {tuple(attn_mask.shape)}, but should be {(length, source)}."
                )
            mask = attn_mask.view(1, 1, length, source)
        elif attn_mask.dim() == 3:
            if attn_mask.shape != (n * h, length, source):
                raise RuntimeError(
                    f"The shape of the 3D attn_mask is {tuple(attn_mask.shape)}, but should be {(n * h, length, source)}."
                )
            mask = attn_mask.view(n, h, length, source)
        else:
            raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
    if key_padding_mask is not None:
        if key_padding_mask.shape != (n, source):
            raise RuntimeError(
                f"expected key_padding_mask of shape {(n, source)}, but got {tuple(key_padding_mask.shape)}"
            )
        padding = key_padding_mask.view(n, 1, 1, source)
        mask = padding if mask is None else mask + padding
    if is_causal and (mask is not None or need_weights):
        causal = torch.ones(length, source, dtype=torch.bool, device=q.device).triu(1)
        causal = torch.zeros(length, source, dtype=q.dtype, device=q.device).masked_fill(causal, float("-inf"))
        mask = causal if mask is None else mask + causal
        is_causal = False
    weights = None
    if need_weights:
        scores = (q * math.sqrt(1.0 / d)) @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = weights @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)
    out = heads(out)
    return out.transpose(1, 2).reshape(n, length, h * d), weights


def _canonical_masks(key_padding_mask: Tensor | None, attn_mask: Tensor | None, dtype: torch.dtype):
    """Both masks in the form ``nn.MultiheadAttention`` adds to the attention scores, checked
    as it checks them: a float mask is used as it is, a boolean one becomes 0 where False and
    -inf where True; other types are refused, and masks of two different types warn (PyTorch
    deprecates mixing them)."""
    if key_padding_mask is not None and attn_mask is not None and key_padding_mask.dtype != attn_mask.dtype:
        warnings.warn(
            f"key_padding_mask ({key_padding_mask.dtype}) and attn_mask ({attn_mask.dtype}) have different "
            "types; PyTorch deprecates mixing them, give both the same type",
            stacklevel=3,
        )
    return _additive_mask(key_padding_mask, "key_padding_mask", dtype), _additive_mask(attn_mask, "attn_mask", dtype)


def _additive_mask(mask: Tensor | None, name: str, dtype: torch.dtype) -> Tensor | None:
    if mask is None or torch.is_floating_point(mask):
        return mask
    if mask.dtype != torch.bool:
        raise AssertionError(f"only bool and floating types of {name} are supported")
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


def _split_heads(x: Tensor, num_heads: int) -> Tensor:
    """``(N, T, H * D)`` to ``(N, H, T, D)``."""
    n, t, width = x.shape
    return x.view(n, t, num_heads, width // num_heads).transpose(1, 2)


# --- the library's self-attention -------------------------------------------------------------


class MultiheadSelfAttention(nn.Module):
    """Multi-head self-attention on batch-first ``(N, T, E)`` inputs, with prunable heads.

    ``q``, ``k``, ``v`` are ``nn.Linear(E, H * D)`` layers and ``out`` is
    ``nn.Linear(H * D, E)``; the per-head outputs ``(N, H, T, D)`` pass through ``heads``
    (an ``nn.Identity``, the gate site) before they are merged. The inner width ``H * D``
    need not equal ``E``, so heads can be removed (:func:`compact_attention`).

    Args:
        embed_dim: E, the width of inputs and outputs.
        num_heads: H.
        head_dim: D; by default ``embed_dim // num_heads`` (which must then divide evenly).
        bias: biases in the four linear layers.
        dropout: dropout probability on the attention weights (training only).
    """

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int | None = None, bias: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        if embed_dim < 1 or num_heads < 1:
            raise BMRSError(f"embed_dim and num_heads must be positive, got {embed_dim} and {num_heads}")
        if head_dim is None:
            if embed_dim % num_heads:
                raise BMRSError(
                    f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}; give head_dim explicitly"
                )
            head_dim = embed_dim // num_heads
        if head_dim < 1:
            raise BMRSError(f"head_dim must be positive, got {head_dim}")
        if not 0.0 <= dropout < 1.0:
            raise BMRSError(f"dropout must lie in [0, 1), got {dropout}")
        self.num_heads, self.head_dim = int(num_heads), int(head_dim)
        self.dropout = float(dropout)
        inner = self.num_heads * self.head_dim
        self.q = nn.Linear(embed_dim, inner, bias=bias)
        self.k = nn.Linear(embed_dim, inner, bias=bias)
        self.v = nn.Linear(embed_dim, inner, bias=bias)
        self.heads = nn.Identity()
        self.out = nn.Linear(inner, embed_dim, bias=bias)

    @property
    def embed_dim(self) -> int:
        """E, the input width (read from ``q``, so it follows any pruning of the inputs)."""
        return self.q.in_features

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, dropout={self.dropout}"

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        """Attend over the tokens of ``x`` ``(N, T, E)``; returns ``(N, T, E)``.

        Masks follow ``nn.MultiheadAttention``: ``attn_mask`` ``(T, T)`` or ``(N * H, T, T)``,
        ``key_padding_mask`` ``(N, T)``; boolean masks are True where attention is not
        allowed, float masks are added to the scores. ``is_causal`` lets each token attend
        only to itself and earlier tokens (on top of any mask given).
        """
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise BMRSError(f"MultiheadSelfAttention expects input (N, T, {self.embed_dim}), got {tuple(x.shape)}")
        key_padding_mask, attn_mask = _canonical_masks(key_padding_mask, attn_mask, x.dtype)
        q, k, v = (_split_heads(layer(x), self.num_heads) for layer in (self.q, self.k, self.v))
        merged, _ = _attend(
            q, k, v, self.heads, attn_mask, key_padding_mask,
            self.dropout if self.training else 0.0, need_weights=False, is_causal=is_causal,
        )
        return self.out(merged)


# --- nn.MultiheadAttention with a head site ---------------------------------------------------


class _MultiheadAttentionCall:
    """``nn.MultiheadAttention.forward`` re-done with the heads through ``self.heads``.

    The host class provides ``_projections()`` (q, k, v weights and biases, out weight and
    bias), ``num_heads``, ``batch_first`` and ``dropout``.
    """

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """As ``nn.MultiheadAttention.forward`` (same arguments, masks and outputs)."""
        if query.is_nested or key.is_nested or value.is_nested:
            raise BMRSError(
                f"{type(self).__name__} does not take nested tensors; an nn.TransformerEncoder holding it "
                "needs use_nested_tensor = False"
            )
        key_padding_mask, attn_mask = _canonical_masks(key_padding_mask, attn_mask, query.dtype)
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer module method "
                "`generate_square_subsequent_mask` to create this mask."
            )
        # as in torch: the hint replaces the mask only when nothing else needs the mask itself
        causal = is_causal and key_padding_mask is None and not need_weights
        if causal:
            attn_mask = None
        wq, bq, wk, bk, wv, bv, wo, bo = self._projections()
        q = _split_heads(F.linear(query, wq, bq), self.num_heads)
        k = _split_heads(F.linear(key, wk, bk), self.num_heads)
        v = _split_heads(F.linear(value, wv, bv), self.num_heads)
        merged, weights = _attend(
            q, k, v, self.heads, attn_mask, key_padding_mask,
            self.dropout if self.training else 0.0, need_weights=need_weights, is_causal=causal,
        )
        out = F.linear(merged, wo, bo)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            out = out.squeeze(0)
            weights = None if weights is None else weights.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def _unsupported(module: nn.MultiheadAttention) -> str | None:
    if module.bias_k is not None or module.bias_v is not None:
        return "add_bias_kv=True is not supported"
    if module.add_zero_attn:
        return "add_zero_attn=True is not supported"
    return None


class HeadedMultiheadAttention(_MultiheadAttentionCall, nn.MultiheadAttention):
    """An ``nn.MultiheadAttention`` whose per-head outputs pass through ``heads``.

    Made by :func:`expose_heads` from an existing module (its class is swapped; parameters
    and state-dict keys stay). ``forward`` recomputes attention from the module's own
    weights (packed ``in_proj_weight`` or separate ``q/k/v_proj_weight``) and gives the
    same outputs as ``nn.MultiheadAttention``, attention weights, masks and ``is_causal``
    included; it never takes PyTorch's fused fast path, so a gate on ``heads`` always acts.
    """

    heads: nn.Identity

    def _projections(self):
        if self._qkv_same_embed_dim:
            wq, wk, wv = self.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        bq, bk, bv = (None, None, None) if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        return wq, bq, wk, bk, wv, bv, self.out_proj.weight, self.out_proj.bias


def expose_heads(module: nn.MultiheadAttention) -> HeadedMultiheadAttention:
    """Turn ``module`` into a :class:`HeadedMultiheadAttention` in place and return it.

    Parameters, buffers and state-dict keys are kept, and outputs are unchanged; a child
    ``heads`` (``nn.Identity``) is added. A module that already has heads is returned as is.
    An ``nn.TransformerEncoder`` holding the module must not turn its inputs into nested
    tensors (set its ``use_nested_tensor = False``; :func:`bmrs.attach_gates` does that).

    Raises:
        TypeError: ``module`` is not an ``nn.MultiheadAttention``.
        ValueError: the module uses ``add_bias_kv`` or ``add_zero_attn``.
    """
    if isinstance(module, HeadedMultiheadAttention):
        return module
    if not isinstance(module, nn.MultiheadAttention):
        raise TypeError(f"expose_heads takes an nn.MultiheadAttention, got {type(module).__name__}")
    if type(module) is not nn.MultiheadAttention:
        raise TypeError(f"expose_heads takes a plain nn.MultiheadAttention, got the subclass {type(module).__name__}")
    problem = _unsupported(module)
    if problem is not None:
        raise BMRSError(f"cannot expose the heads of this nn.MultiheadAttention: {problem}")
    module.__class__ = HeadedMultiheadAttention
    module.add_module("heads", nn.Identity())
    return module


class CompactMultiheadAttention(_MultiheadAttentionCall, nn.Module):
    """What :func:`compact_attention` makes of an ``nn.MultiheadAttention`` with pruned heads.

    Its inner width ``H * D`` no longer equals ``embed_dim``, so it holds separate ``q``,
    ``k``, ``v`` and ``out`` linear layers (and the ``heads`` site) instead of packed
    weights. It is called like ``nn.MultiheadAttention`` (``query, key, value,
    key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal`` ->
    ``(output, weights)``, honouring ``batch_first``); returned attention weights average
    over the kept heads only. ``in_proj_weight = in_proj_bias = None`` and
    ``_qkv_same_embed_dim = False`` make ``nn.TransformerEncoderLayer`` skip its fused fast
    path, which needs packed weights.

    Args:
        q, k, v: the projections of query, key and value to ``num_heads * head_dim``.
        out: the output projection from ``num_heads * head_dim``.
        num_heads: H.
        dropout: dropout probability on the attention weights (training only).
        batch_first: inputs and outputs are ``(N, T, E)`` rather than ``(T, N, E)``.
    """

    in_proj_weight = None
    in_proj_bias = None
    bias_k = None
    bias_v = None
    add_zero_attn = False
    _qkv_same_embed_dim = False

    def __init__(
        self, q: nn.Linear, k: nn.Linear, v: nn.Linear, out: nn.Linear, num_heads: int, *,
        dropout: float = 0.0, batch_first: bool = False,
    ) -> None:
        super().__init__()
        inner = q.out_features
        if k.out_features != inner or v.out_features != inner or out.in_features != inner or inner % num_heads:
            raise BMRSError(
                f"q, k, v must project to, and out from, the same width divisible by num_heads={num_heads}; got "
                f"{q.out_features}, {k.out_features}, {v.out_features} and {out.in_features}"
            )
        self.num_heads, self.head_dim = int(num_heads), inner // int(num_heads)
        self.dropout, self.batch_first = float(dropout), bool(batch_first)
        self.q, self.k, self.v = q, k, v
        self.heads = nn.Identity()
        self.out = out

    @property
    def embed_dim(self) -> int:
        """The query width."""
        return self.q.in_features

    @property
    def kdim(self) -> int:
        """The key width."""
        return self.k.in_features

    @property
    def vdim(self) -> int:
        """The value width."""
        return self.v.in_features

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"batch_first={self.batch_first}"
        )

    def _projections(self):
        return _linear_projections(self)


def _linear_projections(module: nn.Module):
    return (
        module.q.weight, module.q.bias, module.k.weight, module.k.bias,
        module.v.weight, module.v.bias, module.out.weight, module.out.bias,
    )


#: Module types with a ``heads`` site, i.e. whose heads :func:`bmrs.attach_gates` gates.
HEAD_MODULES = (MultiheadSelfAttention, HeadedMultiheadAttention, CompactMultiheadAttention)


# --- per-head views of the weights ------------------------------------------------------------


@dataclass
class _Weights:
    """An attention module's weights, whatever its class; rows/columns ordered head by head."""

    num_heads: int
    head_dim: int
    wq: Tensor
    bq: Tensor | None
    wk: Tensor
    bk: Tensor | None
    wv: Tensor
    bv: Tensor | None
    wo: Tensor
    bo: Tensor | None


def _weights(module: nn.Module) -> _Weights:
    if isinstance(module, (MultiheadSelfAttention, CompactMultiheadAttention)):
        projections = _linear_projections(module)
    elif isinstance(module, HeadedMultiheadAttention):
        projections = module._projections()
    elif isinstance(module, nn.MultiheadAttention):
        problem = _unsupported(module)
        if problem is not None:
            raise BMRSError(f"cannot handle the heads of this nn.MultiheadAttention: {problem}")
        projections = HeadedMultiheadAttention._projections(module)
    else:
        raise TypeError(
            "expected a MultiheadSelfAttention, an nn.MultiheadAttention or a CompactMultiheadAttention, "
            f"got {type(module).__name__}"
        )
    return _Weights(module.num_heads, module.head_dim, *projections)


def head_input_weights(module: nn.Module) -> Tensor:
    """The incoming weights of each head: its q, k and v rows, flattened, shape ``(H, -1)``.

    The L2 criterion scores heads by the norm of these rows.
    """
    w = _weights(module)
    return torch.cat([m.reshape(w.num_heads, -1) for m in (w.wq, w.wk, w.wv)], dim=1)


def params_per_head(module: nn.Module) -> int:
    """Parameters that removing one head deletes: its q, k, v rows (weights and biases)
    and its columns of the output projection (the output bias stays)."""
    w = _weights(module)
    incoming = sum(m.shape[1] for m in (w.wq, w.wk, w.wv)) + sum(b is not None for b in (w.bq, w.bk, w.bv))
    return w.head_dim * (incoming + w.wo.shape[0])


# --- compaction -------------------------------------------------------------------------------


def compact_attention(module: nn.Module, keep: Tensor, scale: Tensor) -> nn.Module:
    """A new attention module with only the kept heads and the gate's scale folded in.

    The result, in eval mode and without a gate, gives the same outputs as ``module`` with
    its head gate in eval mode (which multiplies head ``h`` by ``scale[h]``): each kept
    head's columns of the output projection are multiplied by its scale, and the rows of
    ``q``, ``k``, ``v`` and columns of the output projection of pruned heads are deleted.

    If no head is kept, the first head stays with its output-projection columns set to
    zero, so the module outputs exactly the output projection's bias (zero without bias),
    which is what the gated module outputs when every head is masked.

    Args:
        module: a :class:`MultiheadSelfAttention`, an ``nn.MultiheadAttention`` (with or
            without :func:`expose_heads`) or a :class:`CompactMultiheadAttention`.
        keep: bool tensor ``(H,)``, True for the heads to keep (e.g. ``gate.mask > 0``).
        scale: the gate's per-head factor, ``(H,)`` (e.g. ``gate.expected_gate()``; entries
            of pruned heads are ignored) or one entry per kept head.

    Returns:
        A :class:`MultiheadSelfAttention` for a :class:`MultiheadSelfAttention`, otherwise a
        :class:`CompactMultiheadAttention` (same ``batch_first``, ``dropout``, call and
        output convention as ``nn.MultiheadAttention``). It is in the training mode of
        ``module``, on its device and in its dtype.
    """
    w = _weights(module)
    heads, d = w.num_heads, w.head_dim
    keep = torch.as_tensor(keep).detach().cpu()
    if keep.dtype != torch.bool or keep.shape != (heads,):
        raise BMRSError(f"keep must be a bool tensor of shape ({heads},), got {keep.dtype} of shape {tuple(keep.shape)}")
    scale = torch.as_tensor(scale).detach().cpu().to(torch.float64)
    kept = keep.nonzero().flatten()
    if scale.shape == (heads,):
        scale = scale[kept]
    elif scale.shape != (len(kept),):
        raise BMRSError(
            f"scale must have shape ({heads},) or one entry per kept head ({len(kept)},), got {tuple(scale.shape)}"
        )
    if len(kept) == 0:  # keep one silent head: the module stays valid and outputs its bias
        kept, scale = torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.float64)
    rows = (kept[:, None] * d + torch.arange(d)).flatten().to(w.wq.device)
    with torch.no_grad():
        folded = (w.wo[:, rows].double() * scale.repeat_interleave(d).to(w.wo.device)).to(w.wo.dtype)
        q, k, v = (_linear(m[rows], None if b is None else b[rows]) for m, b in ((w.wq, w.bq), (w.wk, w.bk), (w.wv, w.bv)))
        out = _linear(folded, w.bo)
    if isinstance(module, MultiheadSelfAttention):
        new = MultiheadSelfAttention(q.in_features, len(kept), d, bias=w.bq is not None, dropout=module.dropout)
        new.q, new.k, new.v, new.out = q, k, v, out
    else:
        new = CompactMultiheadAttention(q, k, v, out, len(kept), dropout=module.dropout, batch_first=module.batch_first)
    return new.train(module.training)


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding copies of ``weight`` and ``bias``."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    layer.weight.copy_(weight)
    if bias is not None:
        layer.bias.copy_(bias)
    return layer


# --- packed-qkv attention (timm style) --------------------------------------------------------
#
# A module with ``qkv = nn.Linear(E, 3 * H * D)`` (rows ordered q | k | v, head by head within
# each), ``proj = nn.Linear(H * D, E')`` and integer ``num_heads`` = H and ``head_dim`` = D,
# whose forward splits the packed output into heads from those attributes, as timm's
# ``Attention`` does. Its heads are gated at the input of ``proj`` (where they are merged),
# removed from the three parts of ``qkv`` and from ``proj``'s columns, and ``num_heads`` (and
# ``attn_dim``, the inner width, where the module has it) follow.


def is_packed_attention(module: nn.Module) -> bool:
    """Whether ``module`` has the packed-qkv attention shape described above."""
    qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
    heads, d = getattr(module, "num_heads", None), getattr(module, "head_dim", None)
    if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)):
        return False
    if not (isinstance(heads, int) and isinstance(d, int) and heads > 0 and d > 0):
        return False
    return qkv.out_features == 3 * heads * d and proj.in_features == heads * d


def packed_attention_problem(module: nn.Module) -> str | None:
    """Why the heads of a packed-qkv attention module cannot be removed exactly, or None."""
    norm = getattr(module, "norm", None)
    if norm is not None and not isinstance(norm, nn.Identity):
        return f"its heads are normalised together ({type(norm).__name__} over the merged heads) before proj"
    attn_dim = getattr(module, "attn_dim", None)
    if attn_dim is not None and attn_dim != module.num_heads * module.head_dim:
        return f"attn_dim {attn_dim} is not num_heads x head_dim"
    if module.num_heads < 2:
        return "a single head"
    return None


def packed_head_input_weights(module: nn.Module) -> Tensor:
    """Each head's rows of the packed ``qkv`` (its q, k and v parts), shape ``(H, -1)``."""
    h, d = module.num_heads, module.head_dim
    w = module.qkv.weight.view(3, h, d, -1)
    return w.transpose(0, 1).reshape(h, -1)


def params_per_packed_head(module: nn.Module) -> int:
    """Parameters removing one head deletes: its 3 x D rows of ``qkv`` (with biases) and its
    D columns of ``proj``."""
    qkv, proj = module.qkv, module.proj
    return module.head_dim * (3 * (qkv.in_features + (qkv.bias is not None)) + proj.out_features)


def compact_packed_attention(module: nn.Module, keep: Tensor, scale: Tensor) -> nn.Module:
    """Keep the heads ``keep`` of a packed-qkv attention module, in place, and return it.

    The kept heads' rows stay in each of the q, k and v parts of ``qkv``; their columns of
    ``proj`` are multiplied by ``scale`` (the gate's eval factor, ``(H,)``), the others
    deleted. With no head kept, one head stays with zero ``proj`` columns (the module then
    outputs ``proj``'s bias, as the gated module does). ``num_heads`` and ``attn_dim``
    follow; ``head_dim`` (and any per-head normalisation of q and k) is untouched.
    """
    h, d = module.num_heads, module.head_dim
    keep = torch.as_tensor(keep).detach().cpu()
    if keep.dtype != torch.bool or keep.shape != (h,):
        raise BMRSError(f"keep must be a bool tensor of shape ({h},), got {keep.dtype} of shape {tuple(keep.shape)}")
    scale = torch.as_tensor(scale).detach().cpu().to(torch.float64)
    if scale.shape != (h,):
        raise BMRSError(f"scale must have shape ({h},), got {tuple(scale.shape)}")
    kept = keep.nonzero().flatten()
    factor = scale[kept]
    if len(kept) == 0:
        kept, factor = torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.float64)
    cols = (kept[:, None] * d + torch.arange(d)).flatten()
    rows = torch.cat([cols + part * h * d for part in range(3)])
    qkv, proj = module.qkv, module.proj
    with torch.no_grad():
        w = proj.weight
        folded = (w[:, cols.to(w.device)].double() * factor.repeat_interleave(d).to(w.device)).to(w.dtype)
        proj.weight = nn.Parameter(folded.contiguous(), requires_grad=w.requires_grad)
        proj.in_features = len(cols)
        qkv.weight = nn.Parameter(qkv.weight[rows.to(qkv.weight.device)].clone(), requires_grad=qkv.weight.requires_grad)
        if qkv.bias is not None:
            qkv.bias = nn.Parameter(qkv.bias[rows.to(qkv.bias.device)].clone(), requires_grad=qkv.bias.requires_grad)
        qkv.out_features = len(rows)
    module.num_heads = len(kept)
    if hasattr(module, "attn_dim"):
        module.attn_dim = len(cols)
    return module
