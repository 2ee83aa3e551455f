"""The architecture record of a timm ViT: every constructor setting that changes what it computes,
read off the model's modules as JSON; the rebuild from a record; and a module-tree diff that names
the first place where two models differ.

timm keeps the arguments given to ``timm.create_model`` but not what changed afterwards (a replaced
head, ``reset_classifier``, truncated blocks), and callable arguments (``norm_layer=partial(LayerNorm,
eps=1e-5)``, ``act_layer=QuickGELU``) are not JSON. So every setting is read off the modules
themselves, layers as ``{"class": "module:Name", <constructor settings>}``; a rebuild resolves layer
classes from ``torch.nn`` and ``timm`` only (a saved file never imports other code). A record:

- ``name``: the timm model name (``pretrained_cfg["architecture"]``; None for a model built from its
  class), ``class``: the model class, ``kwargs``: the constructor arguments, all of them explicit, so
  timm's per-name defaults do not matter;
- ``drop_path``: each block's stochastic-depth rate; ``flags``: state set after construction
  (``distilled_training``); ``pretrained_cfg``: timm's data config (mean, std, crop) of the source.

``mlp_ratio`` is stored so that timm's ``int(embed_dim * mlp_ratio)`` gives the exact hidden width.
The record is what :func:`cait.save` stores; :func:`first_difference` is how it proves the rebuild.
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import json

import torch
from torch import nn

from .eva import is_eva
from .support import Unsupported, mlp_layout, model_classes

LAYER_PACKAGES = ("torch.nn.", "timm.")
# No effect on what a module computes: training mode, checkpointing, timm's num_classes (a replaced head leaves it
# stale; the head's own shape is compared) and the flag of detached CDCP gates (cait.save refuses attached ones).
IGNORED_ATTRIBUTES = ("training", "grad_checkpointing", "num_classes", "gated")


def class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def resolve(path: str, what: str) -> type:
    """The module class at ``module:Name``, defined in ``torch.nn`` or ``timm`` (ValueError otherwise:
    a saved file never makes cait import or call anything else)."""
    module, _, name = path.partition(":")
    refusal = ValueError(f"cannot rebuild {what} {path}: a saved model can only use layers from torch.nn and timm")
    if not module.startswith(LAYER_PACKAGES) or not name or any(part.startswith("_") for part in name.split(".")):
        raise refusal
    try:
        cls = functools.reduce(getattr, name.split("."), importlib.import_module(module))
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot rebuild {what}: {path} does not exist in the installed torch/timm ({error})") from error
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__.startswith(LAYER_PACKAGES)):
        raise refusal
    return cls


def _simple(value) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_simple(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def layer_spec(module: nn.Module) -> dict:
    """``{"class": ..., **settings}``: the constructor parameters that the module keeps as plain attributes
    (e.g. ``GELU.approximate``, ``LeakyReLU.negative_slope``)."""
    cls = type(module)
    spec = {"class": class_path(cls)}
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        if name in ("self", "device", "dtype") or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        value = vars(module).get(name, inspect.Parameter.empty)
        if value is not inspect.Parameter.empty and _simple(value):
            spec[name] = value
    return spec


def norm_spec(norm: nn.Module) -> dict:
    """A normalization layer: class, ``eps``, whether it has weights (``affine``) and a bias."""
    weight = getattr(norm, "weight", None)
    return {"class": class_path(type(norm)), "eps": norm.eps, "affine": weight is not None, "bias": getattr(norm, "bias", None) is not None}


def _norm_layer(spec: dict):
    cls = resolve(spec["class"], "norm layer")
    parameters = inspect.signature(cls).parameters
    settings = {"eps": spec["eps"]}
    if not spec["affine"]:
        settings["affine" if "affine" in parameters else "elementwise_affine"] = False
    elif not spec["bias"] and ("bias" in parameters or issubclass(cls, nn.LayerNorm)):  # timm's LayerNorm passes bias on
        settings["bias"] = False
    return functools.partial(cls, **settings)


def _head_classes(vit: nn.Module, strict: bool = True) -> int:
    head = vit.head
    if isinstance(head, nn.Identity):
        return 0
    if type(head) is not nn.Linear:
        if not strict:
            return vit.num_classes
        raise Unsupported(
            "head", f"the head is a {type(head).__name__}: cait.save stores an nn.Linear or nn.Identity head (as timm builds it)"
        )
    return head.out_features


def _grid_and_head(vit: nn.Module, strict: bool) -> dict:
    """The settings every supported class shares: patch grid, input sizes, width, head and pooling."""
    embed = vit.patch_embed
    return dict(
        img_size=list(embed.img_size),
        patch_size=list(embed.patch_size),
        in_chans=embed.proj.in_channels,
        embed_dim=vit.embed_dim,
        num_classes=_head_classes(vit, strict),
        global_pool=vit.global_pool,
        dynamic_img_size=vit.dynamic_img_size,
        dynamic_img_pad=getattr(embed, "dynamic_img_pad", False),
    )


def trunk_settings(vit: nn.Module, strict: bool = True) -> dict:
    """The constructor settings of everything around the blocks (embedding, prefix tokens, norms,
    pooling, head) read off ``vit``, whose blocks may already have been taken over. ``strict``:
    refuse (:class:`Unsupported`) a head other than ``nn.Linear``/``nn.Identity``, else note timm's ``num_classes``."""
    if is_eva(vit):
        return eva_settings(vit, strict)
    embed = vit.patch_embed
    final_norm = not (isinstance(vit.norm, nn.Identity) and isinstance(vit.fc_norm, nn.Identity))
    return dict(
        _grid_and_head(vit, strict),
        class_token=vit.cls_token is not None,
        reg_tokens=vit.num_reg_tokens,
        no_embed_class=vit.no_embed_class,
        pos_embed="learn" if vit.pos_embed is not None else "none",
        pre_norm=not isinstance(vit.norm_pre, nn.Identity),
        final_norm=final_norm,
        fc_norm=not isinstance(vit.fc_norm, nn.Identity),
        pool_include_prefix=getattr(vit, "pool_include_prefix", False),  # timm < 1.0.16 has neither attribute nor setting
        drop_rate=vit.head_drop.p,
        pos_drop_rate=vit.pos_drop.p,
        embed_norm_layer=None if isinstance(embed.norm, nn.Identity) else norm_spec(embed.norm),
    )


def eva_settings(vit: nn.Module, strict: bool = True) -> dict:
    """timm ``Eva``: the settings read off the model that a name's defaults do not fix (sizes, head,
    pooling, input sizes, where the final norm sits); the rest come from the timm name, and the proof
    :func:`cait.save` runs (module-tree diff and probe) refuses a model whose name's defaults would
    rebuild it otherwise."""
    return dict(
        _grid_and_head(vit, strict),
        # timm's Eva places its final norm by global_pool when built; reset_classifier changes the pooling, not the norms
        use_fc_norm=not isinstance(vit.fc_norm, nn.Identity),
        use_post_transformer_norm=not isinstance(vit.norm, nn.Identity),
        **({} if vit.attn_pool is None else {"attn_pool_num_heads": vit.attn_pool.num_heads}),
    )


def block_settings(blocks) -> dict:
    """The constructor settings of the transformer blocks, read off the first (unpruned, timm) block;
    the others must match (the rebuild check catches any that do not)."""
    block = blocks[0]
    attn, mlp = block.attn, block.mlp
    dim = attn.qkv.in_features
    hidden = getattr(mlp, mlp_layout(mlp).inputs[0]).out_features  # timm's hidden_features (GluMlp: both halves)
    mlp_ratio = hidden / dim
    if int(dim * mlp_ratio) != hidden:
        mlp_ratio = (hidden + 0.5) / dim
    attn_layer = {"class": class_path(type(attn))}
    if getattr(attn, "gate", None) is not None:
        attn_layer["gated"] = True
    if attn.head_dim != dim // attn.num_heads:
        attn_layer["attn_head_dim"] = attn.head_dim
    mlp_layer = {"class": class_path(type(mlp))}
    if hasattr(mlp, "gate_last"):
        mlp_layer["gate_last"] = mlp.gate_last
    return dict(
        depth=len(blocks),
        num_heads=attn.num_heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=attn.qkv.bias is not None,
        qk_norm=not isinstance(attn.q_norm, nn.Identity),
        scale_attn_norm=not _absent(attn, "norm"),
        scale_mlp_norm=not _absent(mlp, "norm"),
        proj_bias=attn.proj.bias is not None,
        init_values=getattr(block.ls1, "init_values", 1e-5) if not isinstance(block.ls1, nn.Identity) else None,
        proj_drop_rate=attn.proj_drop.p,
        attn_drop_rate=attn.attn_drop.p,
        norm_layer=norm_spec(block.norm1),
        act_layer=layer_spec(mlp.act),
        mlp_layer=mlp_layer,
        attn_layer=attn_layer,
    )


def _absent(module: nn.Module, name: str) -> bool:
    """Whether ``module.name`` is an ``nn.Identity`` or missing (older timm builds no placeholder)."""
    return isinstance(getattr(module, name, nn.Identity()), nn.Identity)


def drop_path_rates(blocks) -> list[float]:
    """Each block's stochastic-depth rate (0 where there is none)."""
    return [float(getattr(block.drop_path1, "drop_prob", 0.0)) for block in blocks]


def json_safe(cfg: dict) -> dict:
    safe = {}
    for key, value in (cfg or {}).items():
        try:
            safe[key] = json.loads(json.dumps(value))
        except (TypeError, ValueError):
            continue
    return safe


def record(model: nn.Module) -> dict:
    """The architecture record of a supported timm ViT (see the module docstring). A head the format
    cannot hold is only refused when saving (:meth:`cait.CompressedViT.architecture` re-reads it)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    blocks = dict(depth=len(model.blocks), num_heads=model.blocks[0].attn.num_heads) if is_eva(model) else block_settings(model.blocks)
    return {
        "name": cfg.get("architecture"),
        "class": class_path(type(model)),
        "kwargs": {**trunk_settings(model, strict=False), **blocks},
        "drop_path": drop_path_rates(model.blocks),
        "flags": {"distilled_training": model.distilled_training} if hasattr(model, "distilled_training") else {},
        "pretrained_cfg": json_safe(cfg),
    }


def _constructor_parameters(cls: type) -> dict:
    """The named constructor parameters of ``cls`` (of the first class in its MRO that names them)."""
    for klass in cls.__mro__:
        parameters = inspect.signature(klass.__init__).parameters
        named = {k: p for k, p in parameters.items() if k != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if named:
            return named
    return {}


# What a setting means in a timm that has no such constructor argument yet: its default when it came.
LEGACY_DEFAULTS = {"final_norm": True, "pos_embed": "learn", "proj_bias": True}


def _implicit(key: str, value) -> bool:
    """Whether ``key=value`` is what a timm without that argument does anyway."""
    if key == "attn_layer":
        return set(value) == {"class"} and value["class"].endswith(":Attention")
    return value == LEGACY_DEFAULTS[key] if key in LEGACY_DEFAULTS else value in (None, False, 0, "")


def _timm_kwargs(arch: dict, cls: type) -> dict:
    """The record's kwargs as constructor arguments: layer specs become callables; a setting the
    installed timm does not know is dropped when an older timm does that anyway, refused otherwise."""
    import timm

    known = _constructor_parameters(cls)
    kwargs = {}
    for key, value in arch["kwargs"].items():
        if key not in known:
            if _implicit(key, value):
                continue
            raise ValueError(f"the saved model sets {key}={value!r}, which timm {timm.__version__} does not know: install a newer timm")
        if isinstance(value, dict):
            value = _layer(key, value)
        elif key in ("img_size", "patch_size"):
            value = tuple(value)
        kwargs[key] = value
    return kwargs


def _layer(key: str, spec: dict):
    if key.endswith("norm_layer"):
        return _norm_layer(spec)
    cls = resolve(spec["class"], key)
    settings = {k: v for k, v in spec.items() if k != "class"}
    return functools.partial(cls, **settings) if settings else cls


def build(arch: dict, device: str | torch.device | None = "meta") -> nn.Module:
    """The timm model a record describes, in eval mode. ``device="meta"`` (default) allocates no
    weights (fill them with ``load_state_dict(..., assign=True)``; a timm whose constructor cannot run
    on the meta device, before 1.0.16 or so, builds random weights instead); ``None`` builds random
    weights on the default device. Raises ``ValueError`` when the installed torch/timm cannot build it."""
    import timm

    cls = resolve(arch["class"], "model class")
    from timm.models.eva import Eva

    if cls not in model_classes() and cls is not Eva:
        raise ValueError(f"cannot rebuild a {cls.__name__}: cait rebuilds {', '.join(c.__name__ for c in model_classes())} and Eva")
    if cls is Eva and not arch["name"]:
        raise ValueError("cannot rebuild an Eva model without its timm name: build it with timm.create_model(name, ...)")
    if cls is Eva:  # its rotary embeddings keep computed tables in non-persistent buffers: build them for real
        device = None
    kwargs = _timm_kwargs(arch, cls)
    attention = arch["kwargs"].get("attn_layer", {})
    if len(attention) > 1:  # settings timm's constructor cannot pass on (gated, attn_head_dim): attention rebuilt below
        kwargs.pop("attn_layer")

    def construct():
        model = timm.create_model(arch["name"], pretrained=False, **kwargs) if arch["name"] else cls(**kwargs)
        if len(attention) > 1:
            _rebuild_attention(model, attention, arch["kwargs"], kwargs["norm_layer"])
        return model

    try:
        if device is None:
            model = construct()
        else:
            try:
                with torch.device(device):
                    model = construct()
            except (RuntimeError, NotImplementedError) as error:
                if "meta" not in str(error):
                    raise
                model = construct()  # e.g. Tensor.item() in an older timm's constructor
    except (TypeError, AssertionError, RuntimeError) as error:
        raise ValueError(f"timm {timm.__version__} cannot build the saved {arch['name'] or cls.__name__}: {error}") from error
    if type(model) is not cls:
        raise ValueError(f"timm builds {arch['name']} as a {type(model).__name__}, the saved model is a {cls.__name__}")
    from timm.layers import DropPath

    for block, rate in zip(model.blocks, arch["drop_path"], strict=True):
        block.drop_path1, block.drop_path2 = (DropPath(rate) if rate > 0 else nn.Identity() for _ in range(2))
    for name, value in arch["flags"].items():
        setattr(model, name, value)
    if arch["pretrained_cfg"]:
        # JSON turned timm's tuples into lists
        cfg = {k: tuple(v) if isinstance(v, list) else copy.deepcopy(v) for k, v in arch["pretrained_cfg"].items()}
        model.pretrained_cfg = model.default_cfg = cfg
    return model.eval()


def _rebuild_attention(model: nn.Module, spec: dict, settings: dict, norm_layer) -> None:
    """Replace every block's attention by one built with the record's extra settings, as timm's Block would."""
    cls = resolve(spec["class"], "attn_layer")
    extras = {k: v for k, v in spec.items() if k != "class"}
    for block in model.blocks:
        block.attn = cls(
            settings["embed_dim"],
            num_heads=settings["num_heads"],
            qkv_bias=settings["qkv_bias"],
            qk_norm=settings["qk_norm"],
            scale_norm=settings["scale_attn_norm"],
            proj_bias=settings["proj_bias"],
            attn_drop=settings["attn_drop_rate"],
            proj_drop=settings["proj_drop_rate"],
            norm_layer=norm_layer,
            **extras,
        )


def simple_attributes(module: nn.Module) -> dict:
    """The module's public plain attributes (numbers, strings, flags and tuples of them): its settings."""
    return {k: v for k, v in vars(module).items() if not k.startswith("_") and k not in IGNORED_ATTRIBUTES and _simple(v)}


HINTS = (  # module path pattern -> the setting that builds it, for error messages
    (".act", "act_layer"),
    ("norm", "norm_layer (class, eps, affine)"),
    ("head", "the head (num_classes, nn.Linear or nn.Identity)"),
    (".mlp", "mlp_layer"),
    (".attn", "attn_layer"),
    ("patch_embed", "the patch embedding"),
    ("drop", "dropout / stochastic depth rates"),
)


def _hint(path: str) -> str:
    name = path.rsplit(".", 1)[-1]
    for pattern, setting in HINTS:
        if path.endswith(pattern) if pattern.startswith(".") else pattern in name:
            return f" (setting: {setting})"
    return ""


def _tensor_summary(t) -> str:
    return "absent" if t is None else f"of shape {tuple(t.shape)}"


def first_difference(model: nn.Module, rebuilt: nn.Module) -> str | None:
    """The first difference between two module trees, as one sentence naming the module path (and
    the setting behind it), or None: module types, plain attributes (eps, activation settings, pooling,
    counts, ...), and each module's own parameters and buffers (presence and shape)."""
    theirs = dict(rebuilt.named_modules())
    ours = dict(model.named_modules())
    for path, module in ours.items():
        where = path or "the model"
        if "forward" in vars(module):
            return f"{where} has its own forward function (set on the instance), which a saved file cannot hold"
        other = theirs.get(path)
        if other is None:
            return f"{where} ({type(module).__name__}) does not exist when rebuilt from the recorded settings{_hint(path)}"
        if type(other) is not type(module):
            return f"{where} is a {type(module).__name__} in the model but a {type(other).__name__} when rebuilt{_hint(path)}"
        mine, rebuilt_attrs = simple_attributes(module), simple_attributes(other)
        for key in sorted(set(mine) | set(rebuilt_attrs)):
            if mine.get(key) != rebuilt_attrs.get(key):
                return f"{where}.{key} is {mine.get(key)!r} in the model but {rebuilt_attrs.get(key)!r} when rebuilt{_hint(path)}"
        for kind in ("_parameters", "_buffers"):
            a, b = getattr(module, kind), getattr(other, kind)
            for key in sorted(set(a) | set(b)):
                x, y = a.get(key), b.get(key)
                if (x is None) != (y is None) or x is not None and x.shape != y.shape:
                    return f"{where}.{key} is {_tensor_summary(x)} in the model but {_tensor_summary(y)} when rebuilt{_hint(path)}"
    for path, module in theirs.items():
        if path not in ours:
            return f"{path} ({type(module).__name__}) exists when rebuilt but not in the model{_hint(path)}"
    return None
