"""Dynamic CDCP: learnable channel scores that choose the kept channels at every training step.

Per block (DESIGN.md): one score per (head, qk channel) shared by q and k, one per (head, v channel),
one per MLP hidden unit. In every forward the kept set is recomputed from the current scores: each
head keeps its ``d_qk`` / ``d_v`` best channels (the same count in every head), the MLP its best
hidden units, so a pruned channel comes back once its score rises again. The masks are applied by
forward hooks on the unpruned layers (the ``qkv`` output and the ``fc2`` input), which is exactly
the pruned model's function: a zeroed q/k channel adds nothing to a logit, a zeroed v channel or
hidden unit nothing to the output. The ATME metric averages each head's kept key channels in order,
as the pruned model's compact keys do, so training merges exactly as inference will.

Straight-through estimator: the forward uses the hard 0/1 mask, the backward passes the mask's
gradient to the score (``mask = hard + score - score.detach()``), so scores of channels that help
grow and those that do not shrink. The keep ratios anneal linearly from 1 to the targets over
``warmup`` calls of :meth:`Gates.step` (one per optimizer step); afterwards they stay at the target.
:meth:`Gates.materialize` freezes the masks and builds the same compact model :func:`cait.compress`
builds (smaller ``nn.Linear`` layers), so saving, loading, benchmarks and kernels apply unchanged.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .cdcp import CDCP, Scores, activation_scores, check_prunable, prune_block, rotary_pairs_of, top_qk, weight_scores


def _hard_mask(scores: torch.Tensor, count: int, pairs: torch.Tensor | None = None) -> torch.Tensor:
    """0/1 mask of the ``count`` highest scores along the last dim (ties: lower index first); with
    rotary ``pairs``, of whole pairs (:func:`cait.cdcp.top_qk`)."""
    if count >= scores.shape[-1]:
        return torch.ones_like(scores)
    return torch.zeros_like(scores).scatter_(-1, top_qk(scores.detach(), count, pairs), 1.0)


class BlockGates(nn.Module):
    """The scores of one block: ``qk`` and ``v`` ``(heads, head_dim)``, ``mlp`` ``(hidden,)``.

    Initialised from one-shot importance, each group scaled to mean 1 so one learning rate suits all.
    ``counts`` holds the channels kept now (``qk``, ``v`` per head; ``mlp``); :class:`Gates` sets it.
    ``pairs``: the rotary channel pairs of a RoPE block (qk channels are kept in whole pairs), or None.
    """

    def __init__(self, importance: Scores, pairs: torch.Tensor | None = None):
        super().__init__()
        self.qk, self.v, self.mlp = (nn.Parameter(s / s.mean().clamp_min(1e-12)) for s in importance)
        self.register_buffer("pairs", pairs, persistent=False)
        self.counts = {"qk": self.qk.shape[1], "v": self.v.shape[1], "mlp": self.mlp.shape[0]}

    def mask(self, name: str) -> torch.Tensor:
        """Mask of the current kept set of group ``name`` (``qk``, ``v``, ``mlp``), shaped like its
        scores; straight-through to the scores while training."""
        score = getattr(self, name)
        hard = _hard_mask(score, self.counts[name], self.pairs if name == "qk" else None)
        return hard + score - score.detach() if self.training and torch.is_grad_enabled() else hard

    def kept(self) -> dict:
        """The kept channels now: ``qk``/``v`` ``(heads, d)``, ``mlp`` ``(hidden,)`` int64, sorted; None where all are kept."""
        return {
            name: None if self.counts[name] == total else top_qk(getattr(self, name).detach(), self.counts[name], pairs).cpu()
            for name, total, pairs in (("qk", self.qk.shape[1], self.pairs), ("v", self.v.shape[1], None), ("mlp", self.mlp.shape[0], None))
        }


class Gates(nn.Module):
    """Dynamic CDCP on every block of an unpruned :class:`cait.CompressedViT` (see the module docstring).

    Made by :func:`attach_gates`; ``gates.parameters()`` are the scores (give them to the optimizer).
    """

    def __init__(self, model, prune: CDCP, warmup: int, importance: list[Scores]):
        super().__init__()
        self.model_ref = [model]  # in a list, not a submodule: the gates' state_dict holds the scores only
        self.prune, self.warmup, self.steps = prune, warmup, 0
        self.blocks = nn.ModuleList(BlockGates(s, rotary_pairs_of(b.attn)) for s, b in zip(importance, model.blocks))
        attn, hidden = model.blocks[0].attn, model.blocks[0].mlp.fc2.in_features
        self.rotary = attn.positions is not None  # qk counts stay even: whole rotary pairs
        self.totals = {"qk": attn.d_qk, "v": attn.d_v, "mlp": hidden}
        self.targets = prune.counts(attn.d_qk, attn.d_v, hidden, self.rotary)  # what cait.compress keeps: the same aligned widths
        self.hooks = []
        for block, gates in zip(model.blocks, self.blocks):
            # partials, not lambdas: copy.deepcopy of the model (an EMA copy) then gives hooks bound to the copy's gates
            self.hooks.append(block.attn.qkv.register_forward_hook(functools.partial(_mask_qkv, gates=gates, attn=block.attn)))
            self.hooks.append(block.mlp.fc2.register_forward_pre_hook(functools.partial(_mask_mlp, gates=gates)))
        self._set_counts()
        model.gated = True

    def ratio(self) -> float:
        """Progress of the annealing, 0 at the start to 1 after ``warmup`` steps."""
        return 1.0 if self.warmup == 0 else min(1.0, self.steps / self.warmup)

    def step(self) -> None:
        """Advance the keep-ratio annealing by one optimizer step."""
        self.set_steps(self.steps + 1)

    def set_steps(self, steps: int) -> None:
        """Put the annealing at ``steps`` optimizer steps (e.g. when resuming training)."""
        self.steps = steps
        self._set_counts()

    def _set_counts(self) -> None:
        t = self.ratio()
        counts = {name: round(total - t * (total - self.targets[name])) for name, total in self.totals.items()}
        if self.rotary:
            counts["qk"] = 2 * round((self.totals["qk"] - t * (self.totals["qk"] - self.targets["qk"])) / 2)
        for gates in self.blocks:
            gates.counts = dict(counts)

    def kept_summary(self) -> str:
        """e.g. ``qk 48/64 v 56/64 mlp 1400/1536``: channels kept per head (qk, v) and MLP units now."""
        c = self.blocks[0].counts
        return " ".join(f"{name} {c[name]}/{self.totals[name]}" for name in ("qk", "v", "mlp"))

    def materialize(self):
        """Freeze the current kept sets into smaller layers, detach the gates; returns the model."""
        if self.ratio() < 1:
            raise RuntimeError(f"the keep ratios are still annealing ({self.steps}/{self.warmup} steps): train on, or materialize later")
        model = self.model_ref[0]
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        for block, gates in zip(model.blocks, self.blocks):
            prune_block(block, gates.kept())
            block.attn.metric_channels = None
        model.gated = False
        return model


def _mask_mlp(module, args: tuple, *, gates: BlockGates) -> tuple:
    """The ``fc2`` input ``(B, N, hidden)`` times the MLP mask."""
    return (args[0] * gates.mask("mlp").to(args[0].dtype),)


def _mask_qkv(module, args, out: torch.Tensor, *, gates: BlockGates, attn) -> torch.Tensor:
    """The unpruned ``[q heads | k heads | v heads]`` output with q and k under one mask, v under its
    own; the ATME metric is told the kept qk channels, so it averages them as the pruned model will."""
    qk, v = gates.mask("qk"), gates.mask("v").flatten()
    attn.metric_channels = None if gates.counts["qk"] == qk.shape[1] else top_qk(gates.qk.detach(), gates.counts["qk"], gates.pairs)
    return out * torch.cat([qk.flatten(), qk.flatten(), v]).to(out.dtype)


def attach_gates(model, prune: CDCP, warmup: int = 0) -> Gates:
    """Dynamic CDCP gates on an unpruned :class:`cait.CompressedViT`, scores initialised from
    ``prune.method`` importance; ``warmup``: optimizer steps over which the keep ratios anneal to
    ``prune``'s targets (0: at the targets from the start)."""
    if not isinstance(prune, CDCP):
        raise TypeError(f"prune must be a cait.CDCP spec, got {type(prune).__name__}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a whole number of steps >= 0, got {warmup!r}")
    if any(any(v is not None for v in block.kept.values()) for block in model.blocks):
        raise ValueError("the model is already pruned: attach gates to a model compressed without prune=")
    if getattr(model, "gated", False):
        raise ValueError("the model already has gates attached")
    check_prunable(model, prune)
    if prune.method == "activation":
        importance = activation_scores(model, prune.calibration.to(next(model.parameters())))
    else:
        importance = weight_scores(model)
    return Gates(model, prune, warmup, importance).to(next(model.parameters()).device)
