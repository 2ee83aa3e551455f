"""timm's model API on a compressed model, with timm's meanings (a mixin of :class:`cait.CompressedViT`).

With nothing merged and nothing pruned every method returns what timm's returns on the same weights.
Where merging changes a meaning: spatial outputs in NCHW put every cell's token back on the cell
(each cell gets the feature of the token holding it at that depth), token outputs in NLC are the
merged tokens (``N`` shrinks with depth). Parameter names carry the ``vit.`` prefix of the compressed
model's timm parts (blocks stay ``blocks.i``); ``no_weight_decay`` and ``group_matcher`` say so, so
timm's optimizer factory (``create_optimizer_v2(model, layer_decay=...)``) builds timm's groups.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from cait_kernels import unmerge

from .support import POOLS
from .tokens import TokenState


def refuse_symbolic_tracing(images) -> None:
    """``torch.fx.symbolic_trace`` (timm's FX feature extraction, FX graph-mode tools) runs forward on
    proxies without sizes, and a compressed model's token counts follow from the input's size: refused
    in one sentence (``NotImplementedError``) naming what records it instead."""
    if isinstance(images, torch.fx.Proxy):
        raise NotImplementedError(
            "torch.fx symbolic tracing cannot record a compressed model (how many tokens each block merges follows from the "
            "input's size, which symbolic tracing does not know): use torch.export / cait.export or torch.compile / "
            "cait.optimize for a graph, and forward_intermediates for features"
        )


def refuse_masks(images, attn_mask, is_causal: bool) -> None:
    """timm's blocks take ``attn_mask`` and ``is_causal``; a compressed model refuses a real one (and
    symbolic tracing first, whose proxies look like masks)."""
    refuse_symbolic_tracing(images)
    if attn_mask is not None or is_causal:
        raise NotImplementedError("attention masks and causal attention are not supported by compressed models")


def take_indices(depth: int, indices) -> tuple[list[int], int]:
    """timm's ``feature_take_indices``: ``None`` all blocks, an int ``n`` the last ``n``, a list the
    given indices (negative from the end) -> ``(sorted absolute indices, largest)``; ValueError when out of range."""
    if indices is None:
        indices = depth
    if isinstance(indices, int):
        if not 0 < indices <= depth:
            raise ValueError(f"indices={indices} asks for the last {indices} blocks, the model has {depth}")
        taken = list(range(depth - indices, depth))
    else:
        taken = []
        for i in indices:
            if not -depth <= i < depth:
                raise ValueError(f"block index {i} is out of range for {depth} blocks")
            taken.append(i % depth)
    return taken, max(taken)


def _prefixed(pattern: str) -> str:
    """A timm ``group_matcher`` pattern for a name under ``vit.`` (blocks keep their names)."""
    body = pattern.removeprefix("^")
    return pattern if body.startswith("blocks") else rf"^vit\.(?:{body})"


class ClassifierError(ValueError, AssertionError):
    """A head :meth:`TimmApi.reset_classifier` cannot build: a ``ValueError`` as cait's other refusals,
    and an ``AssertionError`` as timm's ``reset_classifier`` raises for the same requests."""


class TimmApi:
    """``get_classifier``, ``reset_classifier``, ``no_weight_decay``, ``group_matcher``,
    ``set_grad_checkpointing``, ``forward_intermediates``, ``get_intermediate_layers`` and
    ``prune_intermediate_layers`` for :class:`cait.CompressedViT` (see the module docstring)."""

    grad_checkpointing = False

    @property
    def head_hidden_size(self) -> int:
        """Width of the features the classifier takes (timm's ``head_hidden_size``)."""
        return getattr(self.vit, "head_hidden_size", self.num_features)  # older timm has only num_features

    def get_classifier(self) -> nn.Module:
        """The classifier head (a distilled model: the pair ``(head, head_dist)``), as timm."""
        return self.vit.get_classifier()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new head for ``num_classes`` (0: none, ``forward`` returns pooled features) and, if
        given, another pooling (one of ``"", "token", "avg", "max", "avgmax"``; ``"map"`` only on a model built
        with it), as timm's. Raises :class:`ClassifierError` (a ``ValueError`` and, as timm's, an
        ``AssertionError``) for a negative or non-integer ``num_classes``, an unknown pooling, ``"map"`` on a
        model without attention pooling and ``"token"`` on one without a class token."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ClassifierError(f"num_classes must be a whole number >= 0, got {num_classes!r}")
        if global_pool is not None and global_pool not in POOLS:
            raise ClassifierError(f"global_pool={global_pool!r} is not supported on a compressed model; use one of {POOLS}")
        if global_pool == "map" and getattr(self.vit, "attn_pool", None) is None:
            raise ClassifierError("global_pool='map' needs the attention pooling the model was built with (timm cannot add one here)")
        if global_pool == "token" and self.vit.cls_token is None:
            raise ClassifierError("global_pool='token' needs a class token and this model has none")
        self.vit.reset_classifier(num_classes, global_pool)

    def no_weight_decay(self) -> set[str]:
        """Parameters timm exempts from weight decay (position embedding, class/register/distillation
        tokens), under this model's names."""
        return {f"vit.{name}" for name in self.vit.no_weight_decay()}

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's parameter groups (stem, then one per block, the final norm with the last) as regexes
        on this model's names; timm's layer-wise learning-rate decay uses them."""
        groups = {}
        for group, spec in self.vit.group_matcher(coarse=coarse).items():
            if isinstance(spec, str):
                groups[group] = _prefixed(spec)
            else:
                groups[group] = [(_prefixed(pattern), suffix) for pattern, suffix in spec]
        return groups

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of keeping its activations (training
        with gradients only; the results and gradients are the same)."""
        self.grad_checkpointing = bool(enable)
        self.vit.set_grad_checkpointing(enable)

    def run_block(self, block: nn.Module, state: TokenState) -> TokenState:
        """One block on the token state, checkpointed when grad checkpointing is on and autograd records."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, state, use_reentrant=False)
        return block(state)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask=None,
        is_causal: bool = False,
    ):
        """timm's ``forward_intermediates``: images ``(B, C, H, W)`` -> the final tokens after the final
        norm (as :meth:`forward_features`) and the outputs of the blocks ``indices`` picks.

        ``output_fmt="NCHW"``: each intermediate is ``(B, C, Hp, Wp)`` on the patch grid, every cell
        holding the feature of the token that holds it at that depth (the multi-level maps dense heads
        such as UPerNet or DPT take); ``"NLC"``: the merged spatial tokens ``(B, N_i, C)`` of that depth.
        Prefix tokens ``(B, P, C)`` come along with ``return_prefix_tokens``; ``norm`` applies the
        final norm to every intermediate. Returns ``(final, intermediates)``, the intermediates alone
        (``intermediates_only``) or timm's dict (``output_dict``).
        """
        refuse_masks(x, attn_mask, is_causal)
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        taken, last = take_indices(len(self.blocks), indices)
        state = self.embed(x)
        states = []
        for i, block in enumerate(self.blocks[: last + 1] if stop_early else self.blocks):
            state = self.run_block(block, state)
            if i in taken:
                states.append(state)
        prefix = self.num_prefix_tokens
        tokens = [self.vit.norm(s.x) if norm else s.x for s in states]
        if output_fmt == "NCHW":
            spatial = [self.to_grid(t, s.owner, s.grid) for t, s in zip(tokens, states)]
        else:
            spatial = [t[:, prefix:] for t in tokens]
        prefixes = [t[:, :prefix] for t in tokens] if prefix else None
        if output_dict:
            result = {"image_intermediates": spatial}
            if prefixes is not None and return_prefix_tokens:
                result["image_intermediates_prefix"] = prefixes
            if not intermediates_only:
                result["image_features"] = self.vit.norm(state.x)
            return result
        if return_prefix_tokens and prefixes is not None:
            spatial = list(zip(spatial, prefixes))
        return spatial if intermediates_only else (self.vit.norm(state.x), spatial)

    def get_intermediate_layers(
        self, x, n=1, reshape: bool = False, return_prefix_tokens: bool = False, norm: bool = False, attn_mask=None
    ):
        """timm's (DINO-style) ``get_intermediate_layers``: :meth:`forward_intermediates` of the blocks
        ``n`` picks, NCHW when ``reshape`` else NLC, intermediates only."""
        return self.forward_intermediates(
            x, n, return_prefix_tokens=return_prefix_tokens, norm=norm, output_fmt="NCHW" if reshape else "NLC",
            intermediates_only=True, attn_mask=attn_mask,
        )  # fmt: skip

    def to_grid(self, tokens: torch.Tensor, owner: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Tokens ``(B, P+N, C)`` with their ``owner`` ``(B, H*W)`` on ``grid`` ``(H, W)`` -> ``(B, C, H, W)``."""
        cells = unmerge(tokens, owner, prefix=self.num_prefix_tokens)
        return cells.transpose(1, 2).reshape(cells.shape[0], cells.shape[2], *grid).contiguous()

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last one ``indices`` picks (and the final norm with ``prune_norm``,
        the head, its norm and the pooling with ``prune_head``), as timm; returns the picked indices."""
        taken, last = take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: last + 1]
        self.schedules = {grid: counts[: last + 1] for grid, counts in self.schedules.items()}
        self.reference_schedule = (self.reference_schedule[0], self.reference_schedule[1][: last + 1])
        if prune_norm:
            self.vit.norm = nn.Identity()
        if prune_head:
            self.vit.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        return taken
