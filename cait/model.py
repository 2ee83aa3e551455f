"""The compressed model: a timm ViT whose blocks merge tokens and pass the token state along."""

from __future__ import annotations

import copy as copying

import torch
from torch import nn

from . import architecture
from .cdcp import CDCP, apply_cdcp
from .cost import cost_model
from .eva import as_vit_block, is_eva, timm_state_dict
from .layers import CompressedBlock, CompressedModule
from .rope import DEFAULT_RULE, RotaryPositions
from .schedule import ATME, scale_schedule
from .support import allow_any_size, check_supported
from .timm_api import TimmApi, refuse_masks, refuse_symbolic_tracing
from .tokens import TokenState

TAKEN_OVER = (
    "the blocks of this timm model now live in a cait.CompressedViT (cait.compress(..., copy=False) consumes its source): "
    "run the compressed model, or compress with copy=True to keep the timm model usable"
)


class BlocksTakenOver(nn.Module):
    """Stands in for the blocks of a timm model that a :class:`CompressedViT` took over: running or
    indexing them raises ``RuntimeError`` instead of silently skipping every block."""

    def forward(self, *args, **kwargs):
        raise RuntimeError(TAKEN_OVER)

    def __len__(self) -> int:
        raise RuntimeError(TAKEN_OVER)

    def __iter__(self):
        raise RuntimeError(TAKEN_OVER)

    def __getitem__(self, index):
        raise RuntimeError(TAKEN_OVER)

    def __bool__(self) -> bool:
        return True


# timm's modules, parameters and settings around the blocks: read, assigned and deleted on the compressed model
# as on timm's (``fast.head = nn.Linear(...)``, ``fast.patch_embed.patch_size``, ``fast.in_chans``); they live in
# ``fast.vit`` (a name the timm model lacks stays missing: ``head_dist`` on an undistilled one)
TIMM_PARTS = frozenset({
    "patch_embed", "cls_token", "reg_token", "pos_embed", "pos_drop", "patch_drop", "norm_pre", "norm", "fc_norm", "attn_pool",
    "head_drop", "head", "head_dist",
    "in_chans", "num_reg_tokens", "has_class_token", "no_embed_class", "cls_embed", "pool_include_prefix", "rope_mixed",
    "weight_init_mode", "fix_init", "head_init_scale", "pretrained_model_args", "distilled_training", "set_distilled_training",
})  # fmt: skip


def prefixed_cfg(cfg: dict, prefix: str = "vit.") -> dict:
    """A copy of timm's ``pretrained_cfg`` whose parameter names (``classifier``, ``first_conv``) name the
    compressed model's parameters (under ``vit.``), so timm's code that finds the head or the stem by them
    (``load_pretrained``, ``adapt_input_conv``) finds them; the data settings (mean, std, crop) are the same.
    ``prefix=""`` undoes it (timm's names again, as the architecture record stores them)."""
    def renamed(name: str) -> str:
        return prefix + name if prefix else name.removeprefix("vit.")

    out = dict(cfg)
    for key in ("classifier", "first_conv"):
        names = out.get(key)
        if isinstance(names, str):
            out[key] = renamed(names)
        elif isinstance(names, (list, tuple)):
            out[key] = type(names)(renamed(name) for name in names)
    return out


class CompressedViT(TimmApi, CompressedModule, nn.Module):
    """A timm ``VisionTransformer`` or ``Eva`` with ATME merging and CDCP channel pruning.

    ``vit`` is the timm model without its blocks: it keeps the patch and position embeddings, the
    final norm and the head, so their behaviour stays timm's. ``blocks`` are
    :class:`CompressedBlock` s; ``schedule[i]`` tokens are merged away in block ``i`` (none until
    :meth:`set_schedule` / :meth:`set_merge`); pruned blocks record their kept channels in ``block.kept``.
    ``source``: the architecture record of the timm model it came from (:func:`cait.architecture.record`).
    RoPE models (``Eva`` with a rotary embedding) keep the rope module as ``rope``; a merged token sits
    at ``position`` (``centroid`` or ``anchor``, :mod:`cait.rope`).

    Same interface as the timm model (``forward``, ``forward_features``, ``forward_head`` and timm's
    model API, :class:`cait.timm_api.TimmApi`) plus ``forward_tokens`` (the full
    :class:`TokenState`) and ``forward_dense`` (features on the grid). ``forward_features`` returns
    the merged tokens ``(B, P+N', C)``. With ``dynamic_img_size`` the model takes other input sizes:
    each call solves or scales the schedule for its images' grid (:meth:`schedule_for`, cached) and
    carries grid and schedule in its :class:`TokenState`, so one model serves several threads with
    several sizes at once; :attr:`grid` and :attr:`schedule` are the model's own (its
    :attr:`input_size`, changed by :meth:`set_input_size`).
    """

    _INSTANCE_STATE = ("source", "eva", "rope", "tile", "position", "native_grid", "merge", "schedules", "num_prefix_tokens",
                       "num_features", "embed_dim", "pretrained_cfg", "cell_index")  # fmt: skip

    def __init__(
        self, vit: nn.Module, tile: int = 2, source: dict | None = None, position: str = DEFAULT_RULE, dynamic_img_size: bool = False
    ):
        super().__init__()
        self.source = source
        blocks, vit.blocks = vit.blocks, BlocksTakenOver()
        self.eva, self.rope = is_eva(vit), None
        if self.eva:  # the rope module moves here: timm's _pos_embed then builds no table cait would not use
            self.rope, vit.rope = vit.rope, None
            blocks = [as_vit_block(b) for b in blocks]
        if dynamic_img_size:
            allow_any_size(vit)
        self.vit, self.tile, self.position = vit, tile, position
        self.native_grid = tuple(vit.patch_embed.grid_size)
        self.num_prefix_tokens = vit.num_prefix_tokens
        self.num_features, self.embed_dim = vit.num_features, vit.embed_dim
        self.pretrained_cfg = self.default_cfg = prefixed_cfg(getattr(vit, "pretrained_cfg", None) or {})
        self.blocks = nn.ModuleList(CompressedBlock(b, prefix=self.num_prefix_tokens, tile=tile) for b in blocks)
        positions = None if self.rope is None else RotaryPositions(self.rope, position, self.num_prefix_tokens)
        for index, block in enumerate(self.blocks):
            block.index, block.attn.positions = index, positions
        self.register_buffer("cell_index", None, persistent=False)  # the native grid's cells in raster order
        self.init_non_persistent_buffers()
        self.merge: ATME | None = None  # the spec other grids solve (a FLOPs target) or scale (counts) from
        # merge counts per grid: the native grid's set by set_schedule / set_merge, others filled on first use
        self.schedules: dict[tuple[int, int], tuple[int, ...]] = {self.grid: (0,) * len(self.blocks)}
        # the counts as set (set_schedule / set_merge) and the grid they were set for: every other grid,
        # including a new native grid after set_input_size, scales from these (never from scaled counts)
        self.reference_schedule: tuple[tuple[int, int], tuple[int, ...]] = (self.grid, self.schedules[self.grid])
        self.origin: dict | None = None  # where the configuration came from (a cait plan); saved, shown by `cait info`

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            vit = self.__dict__.get("_modules", {}).get("vit")
            if name in TIMM_PARTS and vit is not None and hasattr(vit, name):
                return getattr(vit, name)
            raise

    def __setattr__(self, name: str, value) -> None:
        vit = self.__dict__.get("_modules", {}).get("vit")
        if name in TIMM_PARTS and vit is not None:
            setattr(vit, name, value)
        else:
            super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        vit = self.__dict__.get("_modules", {}).get("vit")
        if name in TIMM_PARTS and vit is not None:
            delattr(vit, name)
        else:
            super().__delattr__(name)

    @property
    def dynamic_img_size(self) -> bool:
        """True when the model takes images of other sizes than :attr:`input_size`."""
        return bool(self.vit.dynamic_img_size)

    @property
    def num_classes(self) -> int:
        """Classifier outputs (0: no head), as timm's ``num_classes``, read off the head itself."""
        head = self.vit.head
        return head.out_features if isinstance(head, nn.Linear) else self.vit.num_classes

    @property
    def global_pool(self) -> str:
        """timm's pooling: ``token``, ``avg`` (weighted by the cells each token holds), ``max``, ``avgmax`` or ``""``."""
        return self.vit.global_pool

    @property
    def feature_info(self) -> list[dict]:
        """timm's feature description: one entry per block (``module``, ``num_chs``, ``reduction``)."""
        reduction = self.vit.patch_embed.patch_size[0]
        return [dict(module=f"blocks.{i}", num_chs=self.embed_dim, reduction=reduction) for i in range(len(self.blocks))]

    def architecture(self) -> dict:
        """The architecture record of the timm model this one rebuilds to: the source's record with
        everything around the blocks (head, pooling, norms) and the block count read off this model."""
        if self.source is None:
            raise ValueError("this CompressedViT has no architecture record: build it with cait.compress")
        arch = copying.deepcopy(self.source)
        # dynamic_img_size as the source was built (compress(dynamic_img_size=True) switches it on afterwards, as load does)
        arch["kwargs"].update(
            architecture.trunk_settings(self.vit), depth=len(self.blocks), dynamic_img_size=self.source["kwargs"]["dynamic_img_size"]
        )
        arch["drop_path"] = architecture.drop_path_rates(self.blocks)
        arch["pretrained_cfg"] = architecture.json_safe(prefixed_cfg(self.pretrained_cfg, prefix=""))  # with the user's edits
        if hasattr(self.vit, "distilled_training"):
            arch["flags"]["distilled_training"] = self.vit.distilled_training
        return arch

    @property
    def grid(self) -> tuple[int, int]:
        """``(H, W)``, the patch grid of the model's own :attr:`input_size` (an input's: :meth:`grid_of`)."""
        return self.native_grid

    @property
    def merges(self) -> bool:
        """True when some input size gets a schedule that merges tokens."""
        return any(self.schedule) or (self.merge is not None and self.merge.flops is not None and self.merge.flops < 1)

    @property
    def schedule(self) -> tuple[int, ...]:
        """Tokens merged away in each block on the model's own :attr:`grid` (another grid's: :meth:`schedule_for`)."""
        return tuple(block.r for block in self.blocks)

    def set_schedule(self, schedule) -> None:
        """Merge ``schedule[i]`` tokens in block ``i`` at the native grid (other grids scale these
        counts, :func:`cait.schedule.scale_schedule`); proportional attention is on after the first merge."""
        if len(schedule) != len(self.blocks):
            raise ValueError(f"schedule lists {len(schedule)} counts but the model has {len(self.blocks)} blocks")
        self.merge = None
        counts = tuple(int(r) for r in schedule)
        self.reference_schedule = (self.native_grid, counts)
        self._set_native_schedule(counts)

    def set_merge(self, merge: ATME) -> None:
        """Merge by ``merge`` at every grid: a FLOPs target is solved per grid, counts are scaled
        from the native grid (both on first use of a grid, then cached in :attr:`schedules`)."""
        counts = merge.schedule(cost_model(self))
        self.merge = merge
        self.reference_schedule = (self.native_grid, counts)
        self._set_native_schedule(counts)

    def _set_native_schedule(self, counts: tuple[int, ...]) -> None:
        self.schedules = {self.native_grid: counts}
        for block, r in zip(self.blocks, counts):
            block.r = r

    def schedule_for(self, grid: tuple[int, int]) -> tuple[int, ...]:
        """The merge counts per block on ``grid``: solved (a FLOPs target) or scaled (counts) on first
        use, then cached in :attr:`schedules`. Safe from several threads: the cache only gains entries,
        each written once with the value any thread would compute."""
        grid = (int(grid[0]), int(grid[1]))
        counts = self.schedules.get(grid)
        if counts is None:
            if self.merge is not None and self.merge.flops is not None:
                counts = self.merge.schedule(cost_model(self, grid))
            else:
                counts = self.scaled_schedule(grid)
            self.schedules[grid] = counts
        return counts

    def scaled_schedule(self, grid: tuple[int, int]) -> tuple[int, ...]:
        """The counts of :attr:`reference_schedule` scaled to ``grid`` (:func:`cait.schedule.scale_schedule`)."""
        reference_grid, counts = self.reference_schedule
        return scale_schedule(counts, reference_grid, grid, self.tile)

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        """timm's ``set_input_size``: a new input size ``img_size`` (int or ``(H, W)`` px) and/or patch
        size ``patch_size`` for the model itself. timm resamples the position embedding (and the patch
        projection for a new patch size) and a RoPE model's rotary grid follows; the merge schedule
        follows as for any input size: a FLOPs target is solved for the new grid, counts are scaled to
        it. Raises ``ValueError`` before changing anything when the sizes give no patch grid or the
        counts cannot hold on it, ``NotImplementedError`` on a timm without ``set_input_size``.
        :func:`cait.save` records the new size (a reloaded model is the same function)."""
        if not hasattr(self.vit, "set_input_size"):
            import timm

            raise NotImplementedError(f"timm {timm.__version__} has no set_input_size for {type(self.vit).__name__}: upgrade timm")
        embed = self.vit.patch_embed
        size = tuple(embed.img_size) if img_size is None else _pair("img_size", img_size)
        patch = tuple(embed.patch_size) if patch_size is None else _pair("patch_size", patch_size)
        grid = (size[0] // patch[0], size[1] // patch[1])  # as timm's PatchEmbed
        if min(grid) < 1:
            raise ValueError(f"img_size {size[0]}x{size[1]} px holds no {patch[0]}x{patch[1]} px patch")
        if self.merge is not None and self.merge.flops is not None:
            counts = self.merge.schedule(cost_model(self, grid, patch))
        else:
            counts = self.scaled_schedule(grid)
        self.vit.set_input_size(img_size=size, patch_size=patch)
        if self.rope is not None and hasattr(self.rope, "update_feat_shape"):  # as timm's Eva.set_input_size
            self.rope.update_feat_shape(self.vit.patch_embed.grid_size)
        self.native_grid = tuple(self.vit.patch_embed.grid_size)
        self.init_non_persistent_buffers()
        if self.merge is not None and self.merge.flops is not None:  # solved per grid: the new grid's counts are as set
            self.reference_schedule = (self.native_grid, counts)
        self._set_native_schedule(counts)

    def init_non_persistent_buffers(self) -> None:
        """(Re)compute the buffers state_dict() does not hold (``cell_index``, the native grid's cells, and
        those of timm's modules inside: a RoPE model's rotary tables) on the device of the weights, as timm's
        methods of that name do: call it after ``to_empty``, or weights assigned to a model built on the meta device."""
        device = self.vit.patch_embed.proj.weight.device
        self.cell_index = torch.arange(self.native_grid[0] * self.native_grid[1], dtype=torch.int32, device=device)
        for module in self.modules():  # timm's own (a RoPE model's rotary tables: periods, bands, pos_embed)
            if module is not self and callable(getattr(module, "init_non_persistent_buffers", None)):
                module.init_non_persistent_buffers()

    @property
    def input_size(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images the model was built for."""
        return (self.vit.patch_embed.proj.in_channels, *self.vit.patch_embed.img_size)

    def check_grid(self) -> None:
        """``RuntimeError`` when the timm model inside was resized behind this model's back."""
        if tuple(self.vit.patch_embed.grid_size) != self.native_grid:
            raise RuntimeError(
                f"the timm model inside was resized to a {self.vit.patch_embed.grid_size[0]}x{self.vit.patch_embed.grid_size[1]} "
                f"grid behind the compressed model's back (its schedules belong to {self.native_grid[0]}x{self.native_grid[1]}): "
                f"call set_input_size on the compressed model itself, which solves its schedules for the new size"
            )

    def grid_of(self, images: torch.Tensor) -> tuple[int, int]:
        """The patch grid of images ``(B, C, H, W)``; refuses (``ValueError``) sizes the model cannot take."""
        self.check_grid()
        chans, height, width = self.input_size
        if images.dim() != 4 or images.shape[1] != chans:
            raise ValueError(f"images must have shape (B, {chans}, H, W), got {tuple(images.shape)}")
        if not self.dynamic_img_size:
            if tuple(images.shape[2:]) != (height, width):
                raise ValueError(
                    f"images must have shape (B, {chans}, {height}, {width}), got {tuple(images.shape)}; "
                    f"compress it with dynamic_img_size=True (cait.compress, or cait compress --dynamic-img-size) to take other sizes"
                )
            return self.native_grid
        embed, size = self.vit.patch_embed, tuple(images.shape[2:])
        if not embed.dynamic_img_pad and (size[0] % embed.patch_size[0] or size[1] % embed.patch_size[1]):
            raise ValueError(
                f"images of {size[0]}x{size[1]} px do not split into {embed.patch_size[0]}x{embed.patch_size[1]} px patches: "
                f"use a multiple of the patch size (or a model built with dynamic_img_pad=True)"
            )
        return tuple(embed.dynamic_feat_size(size))

    def embed(self, images: torch.Tensor) -> TokenState:
        """images ``(B, C, H, W)`` -> the :class:`TokenState` entering the first block (one token per
        cell) with the images' grid and its schedule (:meth:`schedule_for`). Refuses
        ``torch.jit.trace`` (and the TorchScript ONNX exporter): see :func:`cait.export`."""
        refuse_symbolic_tracing(images)
        if torch.jit.is_tracing():
            raise NotImplementedError(
                "torch.jit.trace cannot record a compressed model (its merge step is a custom op with data-dependent "
                "control flow); use `cait export` / cait.export (torch.export, ONNX through the dynamo exporter, AOTInductor)"
            )
        grid = self.grid_of(images)
        schedule = self.schedule_for(grid)
        if images.shape[0] == 0:  # timm's dynamic-size path cannot view an empty batch: embed one image, keep none
            # (shape[0], not len(): len() would pin a traced batch dimension to its example value)
            one = self.embed(images.new_zeros(1, *images.shape[1:]))
            return one.merged(one.x[:0], one.size[:0], one.owner[:0])
        x = self.vit._pos_embed(self.vit.patch_embed(images))
        x = self.vit.norm_pre(x[0] if self.eva else x)  # Eva's _pos_embed also returns its rope table (None here)
        batch, cells = x.shape[0], grid[0] * grid[1]
        if x.shape[1] != self.num_prefix_tokens + cells:
            raise ValueError(
                f"timm's embedding gave {x.shape[1]} tokens for a {grid[0]}x{grid[1]} grid, not {self.num_prefix_tokens} prefix + "
                f"{cells} patch tokens (timm before 1.0.16 drops the class token when pos_embed='none'): upgrade timm"
            )
        size = x.new_ones(batch, x.shape[1], dtype=torch.float32)
        # cells in raster order: the same numbers on any grid of as many cells
        owner = self.cell_index if self.cell_index.numel() == cells else torch.arange(cells, dtype=torch.int32, device=x.device)
        return TokenState(x, size, owner.expand(batch, -1), grid, schedule)

    def forward_tokens(self, images: torch.Tensor) -> TokenState:
        """images ``(B, C, H, W)`` -> the final :class:`TokenState` (after the final norm)."""
        state = self.embed(images)
        for block in self.blocks:
            state = self.run_block(block, state)
        return state._replace(x=self.vit.norm(state.x))

    def forward_features(self, images: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        """images ``(B, C, H, W)`` -> tokens ``(B, P+N', C)`` after the final norm: timm's meaning, with
        ``N'`` the spatial tokens left after merging (:meth:`forward_dense` puts them back on the grid)."""
        refuse_masks(images, attn_mask, is_causal)
        return self.forward_tokens(images).x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False, size: torch.Tensor | None = None):
        """timm's ``forward_head``. ``size (B, P+N')``: the cells each token holds. On merged tokens it
        weights average pooling (so it equals the unmerged mean) and biases attention pooling
        (``map``) by ``log(size)`` for every key (a merged token weighs as the cells it holds); both
        need it. Token and max pooling are exact without it. The weighted mean accumulates in fp32
        and rounds once (in fp16, a sum of ``size * x`` over 196 tokens overflows once a channel passes
        ~330, and real ViTs carry such channels). Without ``size`` timm's own head runs: on a model
        that never merges; refused (``ValueError``) for average and attention pooling on one that does
        (the tokens alone do not say whether they were merged)."""
        if self.global_pool not in ("avg", "avgmax", "map") or (size is None and not self.merges):
            return self.vit.forward_head(x, pre_logits)
        if size is None:
            raise ValueError(
                f"{self.global_pool} pooling of merged tokens weighs each by the cells it holds, which forward_features does not "
                f"return: call the model itself, or state = model.forward_tokens(x) then model.forward_head(state.x, size=state.size)"
            )
        # timm's Eva pools the prefix tokens by attention but not by average (global_pool_nlc);
        # timm < 1.0.16 never pools prefix tokens
        with_prefix = self.global_pool == "map" if self.eva else getattr(self.vit, "pool_include_prefix", False)
        if not with_prefix:
            x, size = x[:, self.num_prefix_tokens :], size[:, self.num_prefix_tokens :]
        if self.global_pool == "map":
            pooled = self.vit.attn_pool(x, attn_mask=size.log().to(x.dtype)[:, None, None, :])
        else:
            pooled = size_weighted_mean(x, size)
            if self.global_pool == "avgmax":
                pooled = 0.5 * (pooled + x.amax(dim=1).to(pooled.dtype))
            pooled = pooled.to(x.dtype)
        pooled = self.vit.head_drop(self.vit.fc_norm(pooled))
        return pooled if pre_logits else self.vit.head(pooled)

    def forward(self, images: torch.Tensor, attn_mask=None, is_causal: bool = False):
        """images ``(B, C, H, W)`` -> logits ``(B, classes)``, as the timm model."""
        refuse_masks(images, attn_mask, is_causal)
        state = self.forward_tokens(images)
        return self.forward_head(state.x, size=state.size if any(state.schedule) else None)  # unmerged: timm's own head

    def timm_model(self) -> nn.Module:
        """The plain timm model with a copy of these weights (merging dropped), rebuilt from
        :meth:`architecture` as :func:`cait.load` rebuilds; unpruned models only."""
        if any(v is not None for block in self.blocks for v in block.kept.values()):
            raise ValueError("the model is channel-pruned: its weights no longer fit the timm architecture")
        model = architecture.build(self.architecture())
        state = {name.removeprefix("vit."): t.detach().clone() for name, t in self.state_dict().items()}
        model.load_state_dict(timm_state_dict(state, model) if self.eva else state, strict=True, assign=True)
        model.set_grad_checkpointing(self.grad_checkpointing)
        return model.train(self.training)

    def forward_dense(self, images: torch.Tensor) -> torch.Tensor:
        """images ``(B, C, H, W)`` -> final features ``(B, C, Hp, Wp)`` on the images' patch grid: each
        cell gets the feature of the token holding it (stride = patch size)."""
        state = self.forward_tokens(images)
        return self.to_grid(state.x, state.owner, state.grid)


def _pair(name: str, value) -> tuple[int, int]:
    """``value`` (an int or two) as ``(H, W)`` of positive whole numbers; ValueError otherwise."""
    if hasattr(value, "__index__"):
        pair = (value, value)
    else:
        pair = tuple(value) if isinstance(value, (tuple, list)) else ()
    if len(pair) != 2 or any(isinstance(v, bool) or not hasattr(v, "__index__") or int(v) < 1 for v in pair):
        raise ValueError(f"{name} must be a whole number >= 1 or two of them, got {value!r}")
    return int(pair[0]), int(pair[1])


def size_weighted_mean(x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """``x (B, T, C)``, ``size (B, T)`` -> ``sum_t size_t x_t / sum_t size_t``, ``(B, C)`` in at least fp32.
    Elementwise, not a matrix product: pooling is left out of the FLOP counts, as timm's mean is."""
    acc = torch.promote_types(x.dtype, torch.float32)
    weight = size.to(acc)[..., None]
    return (x.to(acc) * weight).sum(1) / weight.sum(1)


def compress(
    model: nn.Module, merge: ATME | None = None, prune: CDCP | None = None, copy: bool = True, dynamic_img_size: bool = False
) -> CompressedViT:
    """A compressed timm ViT.

    Args:
        model: a timm ``VisionTransformer`` or ``Eva`` (see :mod:`cait.support`; anything else raises
            ``NotImplementedError`` naming the reason).
        merge: an :class:`ATME` schedule, or None for no token merging. A FLOPs target is solved on
            the pruned model, so ``ATME(flops=0.7)`` with pruning that keeps 0.7 of the FLOPs gives
            about 0.5 overall.
        prune: a :class:`CDCP` channel-pruning spec, or None (refused, ``ValueError``, on a model whose
            weights are on the meta device: the kept channels depend on them).
        copy: True (default) works on a deep copy and leaves ``model`` untouched (twice the memory
            while compressing). False takes over ``model``'s modules without copying any weight:
            ``model`` is consumed, its blocks move into the compressed model and running it raises
            ``RuntimeError`` afterwards.
        dynamic_img_size: take images of any size that splits into patches, as timm's
            ``dynamic_img_size=True`` does (position embeddings interpolated); models built with that
            flag always do. Each grid gets its own schedule: a FLOPs target is solved per grid,
            counts are scaled to the grid (refused where they cannot hold). Shapes stay static per
            size: capture one CUDA graph per size.

    The source's training mode and ``grad_checkpointing`` carry over. A Hugging Face ``transformers``
    model (ViT, DeiT, DINOv2, DINOv3, CLIP and SigLIP vision; :mod:`cait.hf`) is compressed through the
    timm architecture that computes the same function and comes back as a :class:`cait.hf.HFCompressed`
    with HF's calling convention, outputs and ``config``.
    """
    from .hf import is_hf_model

    if is_hf_model(model):
        from .hf import compress as compress_hf

        return compress_hf(model, merge=merge, prune=prune, copy=copy, dynamic_img_size=dynamic_img_size)
    check_supported(model)
    if merge is not None and not isinstance(merge, ATME):
        raise TypeError(f"merge must be a cait.ATME schedule or None, got {type(merge).__name__}")
    if prune is not None and not isinstance(prune, CDCP):
        raise TypeError(f"prune must be a cait.CDCP spec or None, got {type(prune).__name__}")
    if not isinstance(dynamic_img_size, bool):
        raise TypeError(f"dynamic_img_size must be True or False, got {dynamic_img_size!r}")
    if prune is not None and any(p.is_meta for p in model.parameters()):
        raise ValueError(
            "CDCP ranks channels by their weights, which a model on the meta device does not have: load the weights "
            "first (to_empty + load_state_dict), then compress with prune="
        )
    source = architecture.record(model)
    training, checkpointing = model.training, getattr(model, "grad_checkpointing", False)
    fast = CompressedViT(
        copying.deepcopy(model) if copy else model,
        tile=merge.block if merge else 2,
        source=source,
        position=merge.position if merge else DEFAULT_RULE,
        dynamic_img_size=dynamic_img_size,
    )
    if prune is not None:
        apply_cdcp(fast, prune)
    if merge is not None:
        fast.set_merge(merge)
    fast.set_grad_checkpointing(checkpointing)
    return fast.train(training)
