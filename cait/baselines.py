"""Token-reduction baselines that ATME is measured against, on the same compressed-model machinery.

- **ToMe** (Bolya et al., "Token Merging: Your ViT but Faster", 2023), written from the paper:
  spatial tokens alternate into sets A and B (by index), each A token links to its most similar B
  token (cosine of the keys averaged over heads), the ``r`` strongest links merge (size-weighted
  means, summed sizes) — global, no locality, at most half the tokens per layer. Proportional
  attention as in ATME; ``owner`` follows the merges, so ToMe unmerges exactly too.
- **EViT-style pruning** (Liang et al., "Not All Patches are What You Need", 2022): keep the spatial
  tokens the class token attends to most (attention averaged over heads) and drop the ``r`` others
  (no fused token). A dropped cell takes the nearest kept token in ``owner`` (so dense maps still come
  out, filled from neighbours).

Both run between attention and MLP like ATME, with a per-block count ``r``. :func:`compress_baseline`
gives a :class:`cait.CompressedViT` whose blocks use them (for benchmarks: :func:`cait.save` writes
ATME models only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cait_kernels._rows import take_rows

from .layers import CompressedBlock
from .model import CompressedViT, compress
from .schedule import ATME
from .tokens import TokenState

METHODS = ("tome", "evit")


def tome_step(x, metric, size, owner, *, r: int, prefix: int):
    """One ToMe merge of ``r`` spatial tokens: ``x (B, P+N, C)``, ``metric (B, P+N, Cm)``, ``size (B, P+N)``,
    ``owner (B, H*W)`` -> the same with ``N - r`` spatial tokens (order: unmerged A, then B)."""
    if r == 0:
        return x, size, owner
    n = x.shape[1] - prefix
    if r > n // 2:
        raise ValueError(f"ToMe merges at most half the tokens per layer: r={r} > {n // 2}")
    batch, _, channels = x.shape
    unit = F.normalize(metric[:, prefix:].float(), dim=-1)
    a, b = unit[:, 0::2], unit[:, 1::2]
    best, partner = (a @ b.transpose(1, 2)).max(dim=-1)  # (B, |A|)
    order = best.argsort(dim=-1, descending=True)
    merged, kept = order[:, :r], order[:, r:]  # indices into A
    a_idx, b_idx = torch.arange(0, n, 2, device=x.device), torch.arange(1, n, 2, device=x.device)
    src = a_idx[merged]  # spatial index of merged A tokens
    dst = b_idx[partner.gather(1, merged)]
    keep = torch.cat([a_idx[kept], b_idx.expand(batch, -1)], dim=1)  # surviving spatial tokens, new order

    acc = torch.promote_types(x.dtype, torch.float32)
    spatial = x[:, prefix:].to(acc) * size[:, prefix:, None].to(acc)
    weight = size[:, prefix:].clone()
    spatial = spatial.scatter_add(1, dst[..., None].expand(-1, -1, channels), take_rows(spatial, src))
    weight = weight.scatter_add(1, dst, weight.gather(1, src))
    new_size = weight.gather(1, keep)
    new_x = (take_rows(spatial, keep) / new_size[..., None]).to(x.dtype)

    new_index = torch.full((batch, n), -1, dtype=torch.long, device=x.device)
    new_index.scatter_(1, keep, torch.arange(n - r, device=x.device).expand(batch, -1))
    new_index.scatter_(1, src, new_index.gather(1, dst))
    new_owner = new_index.gather(1, owner.long()).to(torch.int32)
    return torch.cat([x[:, :prefix], new_x], 1), torch.cat([size[:, :prefix], new_size], 1), new_owner


def evit_step(x, cls_attention, size, owner, *, r: int, prefix: int, grid: tuple[int, int]):
    """Drop the ``r`` spatial tokens the class token attends to least. ``cls_attention (B, N)``; the
    kept tokens stay in their order; a dropped cell's ``owner`` becomes the nearest kept token's."""
    if r == 0:
        return x, size, owner
    n = x.shape[1] - prefix
    keep = cls_attention.topk(n - r, dim=-1).indices.sort(dim=-1).values  # (B, N - r)
    new_x = torch.cat([x[:, :prefix], take_rows(x[:, prefix:], keep)], 1)
    new_size = torch.cat([size[:, :prefix], size[:, prefix:].gather(1, keep)], 1)
    # Nearest kept token for every cell: the token holding the nearest cell that a kept token holds.
    new_index = torch.full((x.shape[0], n), -1, dtype=torch.long, device=x.device)
    new_index.scatter_(1, keep, torch.arange(n - r, device=x.device).expand(x.shape[0], -1))
    cell_token = new_index.gather(1, owner.long())  # (B, H*W): the cell's token after the step, -1 if dropped
    cells = torch.arange(grid[0] * grid[1], device=x.device)
    coords = torch.stack([cells // grid[1], cells % grid[1]], -1).float()  # (H*W, 2)
    distance = torch.cdist(coords, coords).expand(x.shape[0], -1, -1)  # (B, cell, cell)
    nearest = distance.masked_fill(cell_token[:, None, :] < 0, torch.inf).argmin(dim=-1)  # (B, H*W): nearest kept cell
    return new_x, new_size, cell_token.gather(1, nearest).to(torch.int32)


class BaselineBlock(CompressedBlock):
    """A :class:`CompressedBlock` whose token reduction is ToMe (``method = "tome"``) or EViT-style
    pruning (``"evit"``); made from a compressed block in place by :func:`as_baseline`."""

    method: str

    def attend(self, state: TokenState) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As :meth:`CompressedBlock.attend`; the metric is ToMe's keys, or for EViT the class token's
        attention ``(B, N)`` to each spatial token."""
        tome = self.method == "tome"
        out, metric = self.attn(self.norm1(state.x), size=state.size if self.proportional else None, with_metric=self.r > 0 and tome)
        if self.r and not tome:
            metric = self._cls_attention(state.size)
        return state.x + self.drop_path1(self.ls1(out)), metric

    def merge(self, state: TokenState, metric: torch.Tensor | None) -> TokenState:
        """This block's ToMe merge or EViT-style pruning step (unchanged when ``r = 0``)."""
        if not self.r:
            return state
        if self.method == "tome":
            return TokenState(*tome_step(state.x, metric, state.size, state.owner, r=self.r, prefix=self.prefix))
        return TokenState(*evit_step(state.x, metric, state.size, state.owner, r=self.r, prefix=self.prefix, grid=self.grid))

    def _cls_attention(self, size: torch.Tensor) -> torch.Tensor:
        """``(B, N)``: the class token's attention to each spatial token, averaged over heads, from the
        qkv output the attention just computed (kept by :func:`as_baseline`'s hook)."""
        attn = self.attn
        qkv, self.last_qkv = self.last_qkv, None
        q = qkv[:, :1, : attn.heads * attn.d_qk].unflatten(-1, (attn.heads, attn.d_qk))  # (B, 1, h, d)
        k = qkv[..., attn.heads * attn.d_qk : 2 * attn.heads * attn.d_qk].unflatten(-1, (attn.heads, attn.d_qk))
        logits = torch.einsum("bqhd,bkhd->bhk", q, k) * attn.scale
        if self.proportional:
            logits = logits + size.log()[:, None, :]
        return logits.softmax(-1).mean(1)[:, self.prefix :]

    def extra_repr(self) -> str:
        return f"method={self.method}, " + super().extra_repr()


def as_baseline(block: CompressedBlock, method: str) -> BaselineBlock:
    """Turn ``block`` (same modules, same ``r``) into a :class:`BaselineBlock` using ``method``."""
    block.__class__ = BaselineBlock
    block.method, block.last_qkv = method, None
    if method == "evit" and block.r:
        block.attn.qkv.register_forward_hook(lambda module, args, out: setattr(block, "last_qkv", out))
    return block


def compress_baseline(model, method: str, flops: float) -> CompressedViT:
    """A compressed copy of the timm ``model`` reducing tokens with ``method`` (``tome`` or ``evit``)
    on the per-block counts ATME solves for ``flops`` (so all token methods remove the same number of
    tokens in each block and cost the same FLOPs)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    fast = compress(model, merge=ATME(flops=flops))
    if method == "evit" and fast.num_prefix_tokens < 1:
        raise ValueError("EViT-style pruning ranks tokens by the class token's attention: the model has no class token")
    for block in fast.blocks:
        as_baseline(block, method)
    if method == "tome":
        tokens = fast.grid[0] * fast.grid[1]
        for block in fast.blocks:
            if block.r > tokens // 2:
                raise ValueError(f"ToMe merges at most half the tokens per layer; the schedule asks {block.r} of {tokens}")
            tokens -= block.r
    return fast
