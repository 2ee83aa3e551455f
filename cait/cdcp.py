"""CDCP: consistent channel pruning of attention and MLP, one-shot, materialized into smaller layers.

Consistency (DESIGN.md): q and k keep the same channels in each head (q.k only pairs equal channels),
every head keeps the same number of qk channels (``d_qk``) and of v channels (``d_v``), so pruned
q, k, v stay regular ``(B, heads, N, d)`` tensors; ``proj`` keeps the columns of the kept v channels
and ``fc2`` the columns of the kept MLP units. The softmax scale stays ``head_dim ** -0.5``.

RoPE models (:mod:`cait.rope`) keep their rotary pairs whole: a rotation mixes the two channels of a
pair, so q.k is a sum of rotation-invariant pair terms only over whole pairs. ``d_qk`` counts kept
channels (twice the kept pairs), a pair's importance is ``|q pair| * |k pair|`` (the norms of the two
channels together, which the rotation leaves unchanged), and both of its channels carry it.

Importance of a channel (higher is kept):
- ``weight``: qk ``|W_q row| * |W_k row|``; v ``|W_v row| * |proj column|``; MLP ``|fc1 row| * |fc2 column|``
  (rows include their bias; a gated MLP multiplies its gate and value rows: ``|gate row| * |value row|``).
- ``activation``: the same with the row norms replaced by the root-mean-square of the channel's
  activation over a calibration batch (q, k, v outputs of ``qkv``; the MLP hidden after its activation).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from cait_kernels.attention import gather_columns

from .rope import rotary_pairs
from .support import Unsupported, mlp_layout

METHODS = ("weight", "activation")
ALIGN = 8  # default multiple of kept counts, per head (qk, v) and of MLP units; see CDCP


@dataclass(frozen=True)
class CDCP:
    """Keep ratios per channel group, each in ``(0, 1]``: ``qk`` (per head, shared by q and k),
    ``v`` (per head) and ``mlp`` (hidden units). ``method``: ``weight`` or ``activation``; the latter
    needs ``calibration``, a batch of images ``(B, C, H, W)`` the model takes.

    ``align``: kept counts are multiples of this (one int for every group, or a pair
    ``(per-head channels, MLP units)``); ``align=1`` keeps the exact ratios. Rule (:func:`kept_count`):
    the multiple nearest ``ratio * total`` (halves up), at least one multiple, at most ``total``; a
    ratio below 1 that rounds to every channel is refused. The FLOPs solver of ``ATME(flops=...)``
    runs on the pruned model, so it counts the aligned widths.

    Default 8 (:data:`ALIGN`), for both: GPUs run fp16/bf16 matrix products on tensor cores only for
    multiples of 8, and on the CPU measured here (Intel Xeon, AVX-512, fp32, ``bench/widths.py``)
    larger multiples bought nothing at batch 1: MLP pairs 384 -> n -> 384 at 99 and 197 rows ran
    within 3% of each other for every n in 1056..1104 (eager and MKL-packed as inductor runs them),
    multiples of 8/16/32/64 included; attention speed grows with the head width, not its alignment.
    """

    qk: float = 1.0
    v: float = 1.0
    mlp: float = 1.0
    method: str = "weight"
    calibration: torch.Tensor | None = field(default=None, repr=False, compare=False)
    align: int | tuple[int, int] = ALIGN

    def __post_init__(self):
        for name in ("qk", "v", "mlp"):
            ratio = getattr(self, name)
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
                raise ValueError(f"CDCP {name} must be a keep ratio in (0, 1], got {ratio!r}")
        pair = tuple(self.align) if isinstance(self.align, (tuple, list)) else (self.align, self.align)
        if len(pair) != 2 or any(isinstance(a, bool) or not isinstance(a, int) or a < 1 for a in pair):
            raise ValueError(f"CDCP align must be a whole number >= 1 or a pair (per-head channels, MLP units), got {self.align!r}")
        object.__setattr__(self, "align", pair[0] if pair[0] == pair[1] else pair)
        if self.method not in METHODS:
            raise ValueError(f"CDCP method must be one of {METHODS}, got {self.method!r}")
        if self.method == "activation":
            if not isinstance(self.calibration, torch.Tensor) or self.calibration.dim() != 4:
                raise ValueError("CDCP method='activation' needs calibration=images of shape (B, C, H, W)")
        elif self.calibration is not None:
            raise ValueError("CDCP calibration images are only used with method='activation'")


    def multiple(self, group: str) -> int:
        """The multiple kept counts of ``group`` (``qk``, ``v`` or ``mlp``) are rounded to."""
        heads, mlp = self.align if isinstance(self.align, tuple) else (self.align, self.align)
        return mlp if group == "mlp" else heads

    def counts(self, d_qk: int, d_v: int, hidden: int, rotary: bool = False) -> dict:
        """Kept counts ``{"qk", "v", "mlp"}`` for a block of ``d_qk``/``d_v`` channels per head and ``hidden`` MLP
        units; ``rotary``: RoPE heads, whose qk count is also even (whole rotary pairs, :func:`top_qk`)."""
        totals = {"qk": d_qk, "v": d_v, "mlp": hidden}
        multiples = {name: self.multiple(name) for name in totals}
        if rotary:
            multiples["qk"] = math.lcm(multiples["qk"], 2)
        return {name: kept_count(getattr(self, name), total, name, multiples[name]) for name, total in totals.items()}


class Scores(NamedTuple):
    """Importance of the channels of one block: qk ``(heads, head_dim)``, v ``(heads, head_dim)``, mlp ``(hidden,)``."""

    qk: torch.Tensor
    v: torch.Tensor
    mlp: torch.Tensor


def kept_count(ratio: float, total: int, what: str, align: int = 1) -> int:
    """Channels kept of ``total`` at keep ratio ``ratio``, a multiple of ``align``.

    ``ratio = 1`` keeps ``total``. ``align = 1``: ``round(ratio * total)``, refusing 0. Otherwise the
    multiple of ``align`` nearest ``ratio * total`` (halves up), at least ``align`` and at most
    ``total``; a ratio below 1 whose aligned count is every channel is refused (``ValueError``), so
    asking to prune never silently prunes nothing.
    """
    if ratio >= 1:
        return total
    if align == 1:
        count = round(ratio * total)
        if count < 1:
            raise ValueError(f"CDCP keeps {ratio} of {total} {what} channels, which rounds to 0; raise the ratio")
        return count
    count = min(total, max(align, align * math.floor(ratio * total / align + 0.5)))
    if count == total:
        raise ValueError(
            f"CDCP {what}={ratio} of {total} channels rounds to all {total} at align={align} (kept counts are multiples "
            f"of align): lower the ratio or pass a smaller align (align=1 keeps the exact ratio)"
        )
    return count


def _row_norms(linear: nn.Linear) -> torch.Tensor:
    weight = linear.weight.detach().float()
    if linear.bias is not None:
        weight = torch.cat([weight, linear.bias.detach().float()[:, None]], dim=1)
    return weight.norm(dim=1)


def _hidden_norms(mlp: nn.Module) -> torch.Tensor:
    """Weight norm of each hidden unit's input rows (a gated MLP: the product over its gate and value rows)."""
    layout = mlp_layout(mlp)
    norms = [_row_norms(getattr(mlp, name)) for name in layout.inputs]
    if layout.packed:
        norms = list(norms[0].view(2, -1))
    return torch.stack(norms).prod(dim=0)


def _out_norms(linear: nn.Linear) -> torch.Tensor:
    return linear.weight.detach().float().norm(dim=0)


def rotary_pairs_of(attn) -> torch.Tensor | None:
    """The rotary channel pairs ``(head_dim / 2, 2)`` of an unpruned RoPE attention, None without RoPE."""
    return None if attn.positions is None else rotary_pairs(attn.d_qk, attn.positions.half)


def _scores(block, qkv_rms: torch.Tensor, hidden_rms: torch.Tensor) -> Scores:
    attn = block.attn
    q, k, v = qkv_rms.view(3, attn.heads, attn.d_qk)
    pairs = rotary_pairs_of(attn)
    if pairs is None:
        qk = q * k
    else:  # both channels of a pair carry |q pair| * |k pair|
        pairs = pairs.to(q.device)
        pair = q[:, pairs].norm(dim=-1) * k[:, pairs].norm(dim=-1)  # (heads, head_dim / 2)
        qk = torch.empty_like(q)
        qk[:, pairs[:, 0]], qk[:, pairs[:, 1]] = pair, pair
    return Scores(qk, v * _out_norms(attn.proj).view(attn.heads, attn.d_v), hidden_rms * _out_norms(block.mlp.fc2))


def weight_scores(model) -> list[Scores]:
    """Weight-norm importance of every block of an unpruned :class:`cait.CompressedViT`."""
    return [_scores(b, _row_norms(b.attn.qkv), _hidden_norms(b.mlp)) for b in model.blocks]


@torch.no_grad()
def activation_scores(model, images: torch.Tensor, chunk: int = 32) -> list[Scores]:
    """Activation importance of every block, from a calibration batch run through ``model``."""
    sums = [[0.0, 0.0] for _ in model.blocks]
    hooks = []
    for i, block in enumerate(model.blocks):
        hooks.append(block.attn.qkv.register_forward_hook(lambda m, a, out, i=i: _accumulate(sums[i], 0, out)))
        hooks.append(block.mlp.fc2.register_forward_pre_hook(lambda m, a, i=i: _accumulate(sums[i], 1, a[0])))
    was_training = model.training
    try:
        model.eval()
        for start in range(0, len(images), chunk):
            model(images[start : start + chunk])
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    grid = model.grid_of(images)
    tokens = images.shape[0] * (model.num_prefix_tokens + grid[0] * grid[1])
    return [_scores(b, (qkv / tokens).sqrt(), (hidden / tokens).sqrt()) for b, (qkv, hidden) in zip(model.blocks, sums)]


def _accumulate(store: list, slot: int, activation: torch.Tensor) -> None:
    store[slot] = store[slot] + activation.detach().float().pow(2).sum(dim=(0, 1))


def top_channels(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` best channels along the last dim, ascending: ``(..., count)`` int64."""
    return scores.topk(count, dim=-1).indices.sort(dim=-1).values


def top_qk(scores: torch.Tensor, count: int, pairs: torch.Tensor | None) -> torch.Tensor:
    """The ``count`` best qk channels of each head ``(heads, count)``, ascending; with rotary ``pairs``
    the ``count / 2`` pairs whose two channel scores sum highest, both channels of each."""
    if pairs is None:
        return top_channels(scores, count)
    pairs = pairs.to(scores.device)
    best = top_channels(scores[:, pairs].sum(-1), count // 2)  # (heads, count / 2) pair indices
    return pairs[best].flatten(1).sort(dim=-1).values


def check_prunable(model, prune: CDCP) -> None:
    """Refuse pruning that would change the math of a block instead of only dropping channels."""
    for i, block in enumerate(model.blocks):
        attn = block.attn
        if prune.qk < 1 and attn.qk_normed:
            raise Unsupported(
                "qk pruning with qk_norm",
                f"block {i} normalizes q and k over the head dimension (qk_norm), which pruning would change: "
                f"use qk=1 (v and mlp pruning still work)"
            )
        if prune.v < 1 and not isinstance(attn.norm, nn.Identity):
            raise Unsupported("v pruning with scale_attn_norm", f"block {i} normalizes the attention output over all v channels: use v=1")
        if prune.mlp < 1:
            mlp_layout(block.mlp)
            if not isinstance(getattr(block.mlp, "norm", nn.Identity()), nn.Identity):
                raise Unsupported(
                    "mlp pruning with scale_mlp_norm",
                    f"block {i} normalizes the MLP hidden units (scale_mlp_norm), which pruning would change: use mlp=1",
                )


def sliced_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A smaller ``nn.Linear`` keeping output ``rows`` and input ``cols`` of ``linear`` (None keeps all); a frozen
    (``requires_grad=False``) weight or bias stays frozen."""
    weight, bias = linear.weight.detach(), None if linear.bias is None else linear.bias.detach()
    if rows is not None:
        weight, bias = weight[rows], None if bias is None else bias[rows]
    if cols is not None:
        weight = weight[:, cols]
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    out.weight.requires_grad_(linear.weight.requires_grad)
    if bias is not None:
        out.bias.requires_grad_(linear.bias.requires_grad)
    return out


def prune_block(block, kept: dict) -> None:
    """Materialize kept channels in one unpruned block, in place.

    ``kept``: ``qk``/``v`` ``(heads, d)`` and ``mlp`` ``(hidden,)`` int64 index tensors, each None to keep all.
    Records them as ``block.kept`` (lists) for saving.
    """
    attn, mlp = block.attn, block.mlp
    heads, head_dim = attn.heads, attn.d_qk
    every = torch.arange(head_dim).expand(heads, head_dim)
    idx_qk = every if kept["qk"] is None else kept["qk"]
    idx_v = every if kept["v"] is None else kept["v"]
    if kept["qk"] is not None and attn.positions is not None:
        attn.rope_channels = kept["qk"].to(attn.qkv.weight.device)  # whole rotary pairs (apply_cdcp, Gates)
    if kept["qk"] is not None or kept["v"] is not None:
        device = attn.qkv.weight.device
        attn.qkv = sliced_linear(attn.qkv, rows=gather_columns(heads, head_dim, idx_qk.to(device), idx_v.to(device), device))
        v_columns = (torch.arange(heads, device=device)[:, None] * head_dim + idx_v.to(device)).flatten()
        attn.proj = sliced_linear(attn.proj, cols=v_columns)
        if attn.gate is not None:
            attn.gate = sliced_linear(attn.gate, rows=v_columns)
        attn.d_qk, attn.d_v = idx_qk.shape[1], idx_v.shape[1]
    if kept["mlp"] is not None:
        prune_mlp(mlp, kept["mlp"].to(mlp.fc2.weight.device))
    block.kept = {name: None if idx is None else idx.tolist() for name, idx in kept.items()}


def prune_mlp(mlp: nn.Module, kept: torch.Tensor) -> None:
    """Keep the hidden units ``kept`` ``(hidden,)`` of a supported MLP, in place: their rows in every
    input linear (both halves of a packed one, so gate and value keep the same units), their columns in ``fc2``."""
    layout = mlp_layout(mlp)
    hidden = mlp.fc2.in_features
    rows = torch.cat([kept, kept + hidden]) if layout.packed else kept
    for name in layout.inputs:
        setattr(mlp, name, sliced_linear(getattr(mlp, name), rows=rows))
    mlp.fc2 = sliced_linear(mlp.fc2, cols=kept)


def apply_cdcp(model, prune: CDCP) -> None:
    """Rank and prune every block of an unpruned :class:`cait.CompressedViT` in place."""
    check_prunable(model, prune)
    attn = model.blocks[0].attn
    counts = prune.counts(attn.d_qk, attn.d_v, model.blocks[0].mlp.fc2.in_features, rotary=attn.positions is not None)
    if prune.method == "activation":
        calibration = prune.calibration.to(next(model.parameters()))
        try:
            model.grid_of(calibration)
        except ValueError as error:
            raise ValueError(f"CDCP calibration images: {error}") from None
        scores = activation_scores(model, calibration)
    else:
        scores = weight_scores(model)
    for block, s in zip(model.blocks, scores):
        block_kept = {
            "qk": top_qk(s.qk, counts["qk"], rotary_pairs_of(block.attn)) if prune.qk < 1 else None,
            "v": top_channels(s.v, counts["v"]) if prune.v < 1 else None,
            "mlp": top_channels(s.mlp, counts["mlp"]) if prune.mlp < 1 else None,
        }
        prune_block(block, block_kept)
