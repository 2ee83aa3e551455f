"""Compressed counterparts of timm's ``Attention`` and ``Block`` that pass the token state along."""
from __future__ import annotations

import torch
from torch import nn

from cait_kernels import atme_step, pruned_attention

from .tokens import TokenState


class CompressedModule:
    """What cait's modules share (a mixin before ``nn.Module``): ``torch.jit.script`` is refused in one
    sentence, and a pickle from an older cait that lacks one of ``_INSTANCE_STATE`` (the plain
    attributes ``__init__`` sets and ``forward`` reads) is refused when it is loaded."""

    _INSTANCE_STATE: tuple[str, ...] = ()

    def __setstate__(self, state: dict) -> None:
        held = {*state, *state.get("_modules", {}), *state.get("_buffers", {}), *state.get("_parameters", {})}
        missing = [name for name in self._INSTANCE_STATE if name not in held]
        if missing:
            raise ValueError(
                f"this {type(self).__name__} was pickled by an older cait (it has no {', '.join(missing)}): a pickle holds "
                f"one version's objects; store models with cait.save, which later versions load or refuse by name"
            )
        super().__setstate__(state)

    def __prepare_scriptable__(self):
        """``torch.jit.script`` calls this first, on every submodule."""
        raise NotImplementedError(
            "torch.jit.script cannot compile a compressed model (its merge step is a custom op with data-dependent "
            "control flow); use `cait export` / cait.export (torch.export, ONNX through the dynamo exporter, AOTInductor)"
        )


class CompressedAttention(CompressedModule, nn.Module):
    """timm ``Attention`` computed by :func:`cait_kernels.pruned_attention` on the packed qkv.

    Takes over the projections of ``attn`` (no copy). The qkv output is in the materialized layout
    ``[q heads | k heads | v heads]`` with ``d_qk`` / ``d_v`` channels per head; the softmax scale
    stays the original ``head_dim ** -0.5``.
    """

    _INSTANCE_STATE = ("heads", "d_qk", "d_v", "scale", "qk_normed", "metric_channels", "positions", "gate", "norm", "rope_channels")

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.qkv, self.q_norm, self.k_norm = attn.qkv, attn.q_norm, attn.k_norm
        self.norm = getattr(attn, "norm", nn.Identity())  # timm < 1.0.16 has no scale norm
        self.gate = getattr(attn, "gate", None)  # timm >= 1.0.26 only
        self.proj, self.proj_drop = attn.proj, attn.proj_drop
        self.heads, self.d_qk, self.d_v = attn.num_heads, attn.head_dim, attn.head_dim
        self.scale = float(attn.scale)
        self.qk_normed = not isinstance(attn.q_norm, nn.Identity)
        self.metric_channels = None  # (heads, d) qk channels the metric averages; set by dynamic CDCP gates
        self.positions = None  # cait.rope.RotaryPositions of a RoPE model (shared, not a submodule)
        # (heads, d_qk) kept qk channels of a pruned RoPE head: which rotary frequencies its channels get, so it is
        # part of state_dict() (a model loading another's weights takes its channel map too)
        self.register_buffer("rope_channels", None)

    def forward(self, x: torch.Tensor, size: torch.Tensor | None = None, with_metric: bool = False, rope: torch.Tensor | None = None):
        """x ``(B, T, C)``, size ``(B, T)`` or None, rope: the sin/cos of the spatial tokens
        (:meth:`cait.rope.RotaryPositions.embed`) or None -> output ``(B, T, C)`` and, if asked, the
        ATME metric ``(B, T, d_qk)`` (keys averaged over heads, before any rotation), else None."""
        qkv = self.qkv(x)
        if self.qk_normed:
            qkv = self._normalize_qk(qkv)
        rotated = qkv if rope is None else self.positions.rotate(qkv, rope, self.heads, self.d_qk, self.rope_channels)
        out = pruned_attention(rotated, heads=self.heads, d_qk=self.d_qk, d_v=self.d_v, scale=self.scale, size=size)
        out = self.norm(out)
        if self.gate is not None:
            out = out * self.gate(x).sigmoid()
        out = self.proj_drop(self.proj(out))
        metric = None
        if with_metric:
            width = self.heads * self.d_qk
            keys = qkv[..., width : 2 * width].unflatten(-1, (self.heads, self.d_qk))
            if self.metric_channels is not None:  # the kept channels, compacted as a pruned model holds them
                keys = keys.gather(-1, self.metric_channels.expand(*keys.shape[:2], -1, -1))
            metric = keys.mean(dim=2)
        return out, metric

    def _normalize_qk(self, qkv: torch.Tensor) -> torch.Tensor:
        q, k, v = qkv.split([self.heads * self.d_qk, self.heads * self.d_qk, self.heads * self.d_v], dim=-1)
        q = self.q_norm(q.unflatten(-1, (self.heads, self.d_qk))).flatten(-2)
        k = self.k_norm(k.unflatten(-1, (self.heads, self.d_qk))).flatten(-2)
        return torch.cat([q, k, v], dim=-1)


class CompressedBlock(CompressedModule, nn.Module):
    """timm pre-norm ``Block`` that merges tokens between its attention and its MLP.

    ``r``: tokens this block merges away on the model's own grid (the model's schedule, set by
    :meth:`cait.CompressedViT.set_schedule`); what one call merges comes with its token state
    (``state.schedule[index]`` on ``state.grid``), so the block holds no per-call state.
    Proportional attention (``log(size)`` added to the logits) is on once an earlier block merged.
    ``prefix``, ``tile``: prefix token count and ATME tile side; ``index``: position in the model.
    ``kept``: the channels CDCP kept (lists of indices, None for all). LayerScale (``ls1``/``ls2``)
    and stochastic depth are kept.
    """

    _INSTANCE_STATE = ("r", "prefix", "tile", "kept", "index")

    def __init__(self, block: nn.Module, *, prefix: int, tile: int, r: int = 0):
        super().__init__()
        self.norm1, self.attn = block.norm1, CompressedAttention(block.attn)
        self.ls1, self.drop_path1 = block.ls1, block.drop_path1
        self.norm2, self.mlp, self.ls2, self.drop_path2 = block.norm2, block.mlp, block.ls2, block.drop_path2
        self.r, self.prefix, self.tile = r, prefix, tile
        self.kept = {"qk": None, "v": None, "mlp": None}
        self.index = 0  # position in the model (its count in a schedule, per-block RoPE frequencies)

    def forward(self, state: TokenState) -> TokenState:
        x, metric = self.attend(state)
        state = self.merge(state.merged(x, state.size, state.owner), metric)
        x = state.x + self.drop_path2(self.ls2(self.mlp(self.norm2(state.x))))
        return state.merged(x, state.size, state.owner)

    def count(self, state: TokenState) -> int:
        """Tokens this block merges away in the pass ``state`` belongs to."""
        return state.schedule[self.index]

    def proportional(self, state: TokenState) -> bool:
        """True when an earlier block of this pass merged: attention then adds ``log(size)``."""
        return any(state.schedule[: self.index])

    def attend(self, state: TokenState) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The attention half: ``x (B, T, C)`` after the attention residual, and the ATME metric
        ``(B, T, d_qk)`` when this block merges (else None)."""
        positions, tokens = self.attn.positions, state.x.shape[1] - self.prefix
        rope = None if positions is None else positions.embedding(state.owner, state.size, state.grid, tokens, self.index)
        size = state.size if self.proportional(state) else None
        out, metric = self.attn(self.norm1(state.x), size=size, with_metric=self.count(state) > 0, rope=rope)
        return state.x + self.drop_path1(self.ls1(out)), metric

    def merge(self, state: TokenState, metric: torch.Tensor | None) -> TokenState:
        """This block's ATME step on ``state`` (``r`` tokens fewer; unchanged when ``r = 0``)."""
        r = self.count(state)
        if not r:
            return state
        return state.merged(*atme_step(state.x, metric, state.size, state.owner, r=r, grid=state.grid, prefix=self.prefix, block=self.tile))

    def extra_repr(self) -> str:
        return f"r={self.r}, d_qk={self.attn.d_qk}, d_v={self.attn.d_v}"
