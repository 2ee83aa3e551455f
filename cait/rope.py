"""Rotary position embeddings (RoPE) of merged tokens: one position per token, timm's frequencies.

timm's RoPE ViTs (the ``Eva`` class: EVA-02, DINOv3, RoPE-ViT, the SBB RoPE ViTs, Perception Encoder)
rotate pairs of q and k channels of every spatial token by angles linear in the token's coordinates
on the patch grid (``angle = coordinates . frequencies``; ``x cos + rotate(x) sin``, Su et al. 2021,
Heo et al. 2024). A merged token holds several cells and gets one position (DESIGN.md, "Positions of
merged tokens (RoPE)"):

- ``anchor``: the coordinates of its anchor cell, the earliest of its cells in raster order, the
  place ATME keeps for the token ("the earlier token keeps its place");
- ``centroid``: the mean coordinates of its cells (the size-weighted centroid of the tokens merged
  into it; RoPE takes fractional positions).

The default is ``centroid``: one-shot on RoPE ViTs trained on the digits it kept 1.3 to 5.6 points more
top-1 than ``anchor`` in every setting measured (axial and DINOv3 RoPE, ATME at 0.6x and 0.5x FLOPs,
ATME+CDCP at 0.5x; ``cait bench --rope-rule``). ``anchor`` stays available: its embedding is a row of
timm's own table, read from a cache instead of evaluated per block.

Cell coordinates come from timm's own grid builder with the rope module's settings (offset, ``xy``
or ``ij`` indexing, reference shape, DINOv3's centred and normalized grid) and angles from timm's
own frequencies, in timm's order of operations: with nothing merged the embedding equals timm's
table bit for bit. The rotation acts on the packed ``[q heads | k heads | v heads]`` projection before
:func:`cait_kernels.pruned_attention` (kernels unchanged), on spatial tokens only, as in timm.

Channel pruning keeps rotary pairs whole (a rotation mixes the two channels of a pair; q.k stays a
sum of rotation-invariant pair terms only if both channels of a pair are kept or both dropped):
:func:`rotary_pairs` gives the pairs, and a pruned head's embedding is gathered at its kept channels.
"""

from __future__ import annotations

import torch
from torch import nn

RULES = ("centroid", "anchor")
DEFAULT_RULE = "centroid"  # measured: cait bench --rope-rule (README, "Where a merged token sits for RoPE")


def rope_kind(rope: nn.Module) -> str:
    """``cat``, ``dinov3`` or ``mixed`` for the rope modules cait supports; raises ``NotImplementedError`` otherwise."""
    from timm.layers.pos_embed_sincos import RotaryEmbeddingCat, RotaryEmbeddingDinoV3, RotaryEmbeddingMixed

    for kind, cls in (("cat", RotaryEmbeddingCat), ("dinov3", RotaryEmbeddingDinoV3), ("mixed", RotaryEmbeddingMixed)):
        if type(rope) is cls:
            return kind
    from .support import Unsupported

    raise Unsupported(
        "rope type", f"rotary embedding {type(rope).__name__} is not supported: cait knows rope_type 'cat', 'dinov3' and 'mixed'"
    )


def rotate_half(rope: nn.Module) -> bool:
    """True for the half layout (channel ``i`` pairs with ``i + d/2``), False for interleaved pairs ``(2i, 2i+1)``."""
    return bool(getattr(rope, "rotate_half", False))


def rotary_pairs(head_dim: int, half: bool) -> torch.Tensor:
    """The channel pairs one rotation mixes, ``(head_dim // 2, 2)`` int64: ``(i, i + head_dim/2)`` in
    the half layout, ``(2i, 2i + 1)`` interleaved (timm ``apply_rot_embed(half=...)``). Keeping whole
    pairs in ascending channel order leaves the kept channels in the same layout."""
    if head_dim % 2:
        raise ValueError(f"rotary heads need an even head_dim, got {head_dim}")
    first = torch.arange(head_dim // 2)
    return torch.stack([first, first + head_dim // 2] if half else [2 * first, 2 * first + 1], dim=1)


class RotaryPositions:
    """The rotary embedding of a compressed model: positions of its (merged) tokens -> sin/cos.

    Not an ``nn.Module``: it refers to the model's timm rope module (registered in the model, so its
    parameters are saved once) and every block shares it. Cell coordinates, and the embedding of
    every cell for fixed frequencies (``cat``, ``dinov3``), are cached per grid and device in eager
    mode (traced code computes them in its graph); the anchor rule then gathers rows of that table.
    ``mixed`` RoPE learns its frequencies: computed per call.

    Args:
        rope: timm ``RotaryEmbeddingCat`` / ``RotaryEmbeddingDinoV3`` / ``RotaryEmbeddingMixed``.
        rule: ``anchor`` or ``centroid`` (module docstring).
        prefix: prefix tokens (class, registers), which get no rotation.
    """

    def __init__(self, rope: nn.Module, rule: str, prefix: int):
        if rule not in RULES:
            raise ValueError(f"the RoPE position of merged tokens must be one of {RULES}, got {rule!r}")
        self.rope, self.rule, self.prefix = rope, rule, prefix
        self.kind, self.half = rope_kind(rope), rotate_half(rope)
        self._cells: dict = {}
        self._tables: dict = {}

    def embedding(self, owner: torch.Tensor, size: torch.Tensor, grid: tuple[int, int], tokens: int, block: int) -> torch.Tensor:
        """sin/cos of the ``tokens`` spatial tokens of a token state (``owner``, ``size``) on ``grid``
        for block ``block``: :meth:`embed` at :meth:`coords`, the same numbers by a cheaper path where
        one exists (a row of the cell table for the anchor rule and for unmerged tokens)."""
        cells = self.cells(grid, owner.device).shape[0]
        if self.kind == "mixed" or (self.rule == "centroid" and tokens != cells):
            return self.embed(self.coords(owner, size, grid, tokens), block)
        key = (tuple(grid), str(owner.device))
        if torch.compiler.is_compiling():  # traced (compile, export): computed in the graph, never cached
            table = self.embed(self.cells(grid, owner.device)[None], block)[0]
        elif key not in self._tables:
            with torch.inference_mode(False), torch.no_grad():  # a plain tensor, whatever mode this first call runs in
                table = self._tables[key] = self.embed(self.cells(grid, owner.device)[None], block)[0]  # (H*W, 1, 2*head_dim)
        else:
            table = self._tables[key]
        return table[None] if tokens == cells else table[self.anchors(owner, tokens)]

    def cells(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        """Coordinates ``(H*W, 2)`` float32 of the grid's cells in raster order, as timm builds them."""
        key = (tuple(grid), str(device))
        if torch.compiler.is_compiling():  # traced (compile, export): computed in the graph, never cached
            return self._grid(grid).reshape(-1, 2).float().to(device)
        if key not in self._cells:
            with torch.inference_mode(False):  # a plain tensor, whatever mode this first call runs in
                self._cells[key] = self._grid(grid).reshape(-1, 2).float().to(device)
        return self._cells[key]

    def _grid(self, grid: tuple[int, int]) -> torch.Tensor:
        from timm.layers.pos_embed_sincos import _build_grid

        rope, shape = self.rope, [int(grid[0]), int(grid[1])]
        if self.kind == "cat":
            return _build_grid(
                shape,
                grid_type=rope.grid_type,
                ref_feat_shape=rope.ref_feat_shape,
                grid_offset=rope.grid_offset,
                grid_indexing=rope.grid_indexing,
                normalize_coords=rope.normalize_coords,
            )
        if self.kind == "dinov3":
            return _build_grid(
                shape,
                grid_type="centered",
                grid_offset=rope.grid_offset,
                grid_indexing=rope.grid_indexing,
                normalize_coords=rope.normalize_coords,
            )
        return _build_grid(shape, grid_indexing=rope.grid_indexing)

    def coords(self, owner: torch.Tensor, size: torch.Tensor, grid: tuple[int, int], tokens: int) -> torch.Tensor:
        """Coordinates ``(B or 1, N, 2)`` of the ``tokens`` (N) spatial tokens under the rule.

        ``owner (B, H*W)`` and ``size (B, P+N)`` of the token state. With every cell its own token the
        cells' coordinates in raster order (no batch dimension needed).
        """
        cells = self.cells(grid, owner.device)
        if tokens == cells.shape[0]:
            return cells[None]
        if self.rule == "anchor":
            return cells[self.anchors(owner, tokens)]
        index, batch = owner.long(), owner.shape[0]
        # Sums of float32 coordinates of at most 16 cells are exact in float64 (a bounded exponent
        # range), so the scatter's order cannot change them: deterministic on every device.
        sums = cells.new_zeros(batch, tokens, 2, dtype=torch.float64)
        sums = sums.scatter_add(1, index[..., None].expand(-1, -1, 2), cells.double().expand(batch, -1, -1))
        return (sums / size[:, self.prefix :, None].double()).float()

    @staticmethod
    def anchors(owner: torch.Tensor, tokens: int) -> torch.Tensor:
        """The anchor cell (smallest raster index) of each of the ``tokens`` spatial tokens, ``(B, N)`` int64."""
        cells = owner.shape[1]
        raster = torch.arange(cells, device=owner.device).expand(owner.shape[0], -1)
        anchor = torch.full((owner.shape[0], tokens), cells, dtype=torch.long, device=owner.device)
        return anchor.scatter_reduce(1, owner.long(), raster, reduce="amin")

    def embed(self, coords: torch.Tensor, block: int) -> torch.Tensor:
        """sin/cos ``(B or 1, N, heads or 1, 2*head_dim)`` (``[sin | cos]``, timm's layout) at ``coords``
        ``(B or 1, N, 2)``; ``block`` picks the per-block frequencies of ``mixed`` RoPE."""
        from timm.layers.pos_embed_sincos import _rope_layout, get_mixed_freqs

        rope = self.rope
        if self.kind == "mixed":
            freqs = rope.freqs[:, block]  # (2, heads, head_dim / 2)
            return get_mixed_freqs(freqs, coords[..., 0][:, None], coords[..., 1][:, None]).transpose(1, 2)
        if self.kind == "dinov3":
            sin, cos = rope._get_pos_embed_from_coords(coords.reshape(-1, 2))
            return torch.cat([sin, cos], dim=-1).unflatten(0, coords.shape[:2])[:, :, None]
        angles = (coords[..., None] * rope.bands).flatten(-2)  # (B, N, 2 * bands), as timm's build_fourier_pos_embed
        sin, cos = _rope_layout(angles.sin(), self.half), _rope_layout(angles.cos(), self.half)
        return torch.cat([sin, cos], dim=-1)[:, :, None]

    def rotate(self, qkv: torch.Tensor, emb: torch.Tensor, heads: int, d_qk: int, channels: torch.Tensor | None) -> torch.Tensor:
        """Packed qkv ``(B, P+N, W)`` (``[q heads | k heads | v heads]``, ``d_qk`` q/k channels per head)
        with q and k of the spatial tokens rotated by ``emb`` (:meth:`embed`); ``channels (heads, d_qk)``:
        the kept channels of a pruned head (whole rotary pairs), None when all are kept."""
        from timm.layers.pos_embed_sincos import apply_rot_embed_cat

        if channels is not None:
            index = channels.expand(*emb.shape[:2], -1, -1)
            emb = torch.cat([part.expand(*index.shape[:3], -1).gather(-1, index) for part in emb.chunk(2, dim=-1)], dim=-1)
        width = 2 * heads * d_qk
        qk = qkv[:, self.prefix :, :width].unflatten(-1, (2, heads, d_qk))
        out = qkv.clone()
        out[:, self.prefix :, :width] = apply_rot_embed_cat(qk, emb[:, :, None], half=self.half).flatten(2)
        return out
