"""Hugging Face ``transformers`` vision backbones, compressed through the timm architecture that computes
the same function.

Each supported class (:data:`SUPPORTED`) is a pre-norm ViT that a timm ``VisionTransformer`` with the
right settings computes exactly (DINOv3: timm's ``Eva`` with DINOv3's RoPE, at any input size):
:func:`to_timm` builds that timm model (LayerNorm eps, activation,
LayerScale, SwiGLU, pre-norm, no final norm, prefix tokens: DeiT's distillation token, DINOv2's
registers) and copies the HF weights into it (q, k, v packed into timm's ``qkv``, CLIP's and SigLIP's
position embeddings reshaped, SigLIP's pooling head as timm's ``AttentionPoolLatent``). :func:`compress` compresses it
with :func:`cait.compress` as any timm ViT and wraps it in :class:`HFCompressed`, which keeps HF's
calling convention (``forward(pixel_values, output_hidden_states=None, return_dict=None,
interpolate_pos_encoding=None, labels=None)``), HF's output classes, HF's heads (pooler, classifiers,
CLIP's post-norm and projection, SigLIP's attention pooling, run as HF runs them) and ``.config`` (the HF config with the
compression recorded under ``config.cait``).

Merged tokens are put back on the patch grid before they leave the model: ``last_hidden_state`` and
every entry of ``hidden_states`` have HF's shape ``(B, P + H*W, C)``, each patch position holding the
feature of the token that holds it at that depth (prefix tokens as they are). So HF heads and
downstream code that reshape the patch tokens to a grid keep working, a mean over the patch tokens
is the mean weighted by the cells each merged token holds, and with nothing merged every field equals
HF's own (tested).

Refused (:class:`cait.support.Unsupported`, naming the missing feature): other classes (:data:`REFUSED`
names known ones and why), ``output_attentions`` (attention maps between merged tokens are not HF's),
``bool_masked_pos``, ``attention_mask``, and position-embedding interpolation to patch grids other than the
model's own (sizes with a remainder are cropped to whole patches, as HF's patch convolution does): HF
interpolates with bicubic ``align_corners=False`` and no antialiasing, timm with antialiasing (they differ
by ~0.3 on unit-scale embeddings), so another grid would be silently another function (DINOv3 has no such
embedding: its RoPE is computed per grid, and it takes any size). This module imports ``transformers`` only
when a Hugging Face model is compressed or loaded (``pip install 'cait[hf]'``).
"""

from __future__ import annotations

import copy as copying
import functools
import math
import os

import torch
from torch import nn

from .support import Unsupported

# HF class name -> family (the timm settings and the weight mapping; the heads as HF runs them)
SUPPORTED = {
    "ViTModel": "vit",
    "ViTForImageClassification": "vit",
    "DeiTModel": "deit",
    "DeiTForImageClassification": "deit",
    "DeiTForImageClassificationWithTeacher": "deit",
    "Dinov2Model": "dinov2",
    "Dinov2ForImageClassification": "dinov2",
    "Dinov2WithRegistersModel": "dinov2_reg",
    "Dinov2WithRegistersForImageClassification": "dinov2_reg",
    "CLIPVisionModel": "clip",
    "CLIPVisionModelWithProjection": "clip",
    "SiglipVisionModel": "siglip",
    "DINOv3ViTModel": "dinov3",
}

# Known vision classes cait does not take yet: class name -> (feature, why)
REFUSED = {
    "ViTForMaskedImageModeling": ("masked image modeling", "its decoder reads every patch token of a masked input"),
    "DeiTForMaskedImageModeling": ("masked image modeling", "its decoder reads every patch token of a masked input"),
    "ViTMAEModel": ("random masking", "MAE drops a random subset of patches before the blocks (no fixed patch grid)"),
    "ViTMAEForPreTraining": ("random masking", "MAE drops a random subset of patches before the blocks (no fixed patch grid)"),
    "Dinov2Backbone": ("HF backbone API", "the BackboneMixin feature-map API is not wrapped yet (use Dinov2Model)"),
    "Dinov2WithRegistersBackbone": ("HF backbone API", "the BackboneMixin feature-map API is not wrapped yet"),
    "DINOv3ViTBackbone": ("HF backbone API", "the BackboneMixin feature-map API is not wrapped yet (use DINOv3ViTModel)"),
    "SiglipForImageClassification": ("classifier on the mean of patch tokens", "not mapped yet (SiglipVisionModel is)"),
    "CLIPModel": ("text tower", "it has a text tower: compress model.vision_model or CLIPVisionModelWithProjection.from_pretrained(DIR)"),
    "SiglipModel": ("text tower", "it has a text tower: compress model.vision_model or SiglipVisionModel.from_pretrained(DIR)"),
    "Siglip2VisionModel": ("variable patch count (NaFlex)", "SigLIP 2 takes a variable number of patches per image"),
    "Siglip2ForImageClassification": ("variable patch count (NaFlex)", "SigLIP 2 takes a variable number of patches per image"),
    "BeitModel": ("relative position bias", "BEiT adds a relative position bias inside attention"),
    "BeitForImageClassification": ("relative position bias", "BEiT adds a relative position bias inside attention"),
    "Data2VecVisionModel": ("relative position bias", "Data2Vec-vision adds a relative position bias inside attention"),
    "Data2VecVisionForImageClassification": ("relative position bias", "Data2Vec-vision adds a relative position bias"),
    "IJepaModel": ("no class token mapping", "I-JEPA is not mapped yet"),
    "IJepaForImageClassification": ("no class token mapping", "I-JEPA is not mapped yet"),
    "ViTMSNModel": ("model class", "ViT-MSN is not mapped yet"),
    "ViTMSNForImageClassification": ("model class", "ViT-MSN is not mapped yet"),
    "Aimv2VisionModel": ("model class", "AIMv2 (RMSNorm, SwiGLU, attention pooling) is not mapped yet"),
    "ViTHybridModel": ("patch embedding", "a CNN stem replaces the patch embedding"),
    "ViTHybridForImageClassification": ("patch embedding", "a CNN stem replaces the patch embedding"),
}

ACTIVATIONS = {
    "gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu", "silu": "silu", "swish": "silu",
    "gelu_python": "gelu", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu_accurate": "gelu_tanh",  # HF's other spellings
}  # fmt: skip
POOLER_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}

INSTALL = "pip install 'cait[hf]'"


def is_hf_model(model) -> bool:
    """Whether ``model`` is a module from Hugging Face ``transformers`` (no import of transformers)."""
    return isinstance(model, nn.Module) and type(model).__module__.startswith("transformers.")


def require_transformers(what: str):
    """``transformers``, or one ``ImportError`` line saying what needs it and how to install it."""
    try:
        import transformers
    except ImportError:
        error = ImportError(f"{what} needs Hugging Face transformers, which is not installed: {INSTALL}")
        error.cait_extra = "hf"  # the CLI prints it as one line
        raise error from None
    return transformers


def check_hf(model: nn.Module) -> str:
    """The family of a supported HF model; :class:`Unsupported` naming the missing feature otherwise."""
    return check_hf_name(type(model).__name__)


def check_hf_name(name: str) -> str:
    """The family of the HF class ``name``; :class:`Unsupported` naming the missing feature otherwise."""
    if name in SUPPORTED:
        return SUPPORTED[name]
    supported = ", ".join(SUPPORTED)
    if name in REFUSED:
        feature, why = REFUSED[name]
        raise Unsupported(feature, f"Hugging Face {name} is not supported yet: {why}. cait takes {supported}")
    raise Unsupported("Hugging Face model class", f"Hugging Face {name} is not supported: cait takes {supported}")


def _pair(value) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (tuple, list)) else (int(value), int(value))


def _activation(config, key: str = "hidden_act") -> str:
    act = getattr(config, key)
    if not isinstance(act, str) or act not in ACTIVATIONS:
        raise Unsupported("activation", f"{key}={act!r} is not supported: cait maps {sorted(ACTIVATIONS)} onto timm's")
    return ACTIVATIONS[act]


def trunk(model: nn.Module) -> nn.Module:
    """The HF module holding ``embeddings`` (``model.vit``, ``model.dinov2``, ``vision_model``, or the model)."""
    for name in ("vit", "deit", "dinov2", "dinov2_with_registers", "vision_model"):
        inner = getattr(model, name, None)
        if isinstance(inner, nn.Module) and hasattr(inner, "embeddings"):
            return inner
    return model


def _layers(family: str, inner: nn.Module):
    if family in ("vit", "deit"):
        return inner.layers
    if family == "dinov3":
        return inner.model.layer
    return inner.encoder.layer if family.startswith("dinov2") else inner.encoder.layers


def mlp_ratio(width: int, hidden: int) -> float:
    """The ``mlp_ratio`` for which timm's ``int(width * mlp_ratio)`` is ``hidden`` (``hidden / width``, one float
    step up where its product rounds just below ``hidden``, e.g. 488 units on width 56)."""
    ratio = hidden / width
    if int(width * ratio) != hidden:
        ratio = math.nextafter(ratio, math.inf)
    if int(width * ratio) != hidden:
        raise Unsupported("MLP width", f"an MLP of {hidden} units on width {width} is not timm's int(width * mlp_ratio)")
    return ratio


def timm_settings(family: str, config) -> dict:
    """The timm ``VisionTransformer`` constructor arguments that compute what the HF ``config`` computes."""
    from timm.layers import SwiGLU

    config = getattr(config, "vision_config", config)
    width, heads = config.hidden_size, config.num_attention_heads
    if width % heads or getattr(config, "head_dim", width // heads) != width // heads:
        head_dim = getattr(config, "head_dim", None)
        raise Unsupported("head width", f"hidden_size {width} with {heads} heads of {head_dim}: timm needs hidden_size / heads")
    settings = dict(
        img_size=_pair(config.image_size), patch_size=_pair(config.patch_size), in_chans=config.num_channels,
        num_classes=0, global_pool="token", embed_dim=width, depth=config.num_hidden_layers, num_heads=heads,
        qkv_bias=bool(getattr(config, "qkv_bias", True)), norm_layer=functools.partial(nn.LayerNorm, eps=config.layer_norm_eps),
    )  # fmt: skip
    if family.startswith("dinov2"):
        hidden = int(width * config.mlp_ratio)
        if config.use_swiglu_ffn:  # as HF's Dinov2SwiGLUFFN: two thirds, rounded up to a multiple of 8
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
            settings.update(mlp_layer=SwiGLU, act_layer="silu")
        else:
            settings.update(act_layer=_activation(config))
        settings.update(init_values=config.layerscale_value)
    else:
        hidden = config.intermediate_size
        settings.update(act_layer=_activation(config))
    settings["mlp_ratio"] = mlp_ratio(width, hidden)
    if family == "dinov2_reg":  # [cls + pos_0, registers, patches + pos]: timm's no_embed_class, pos_0 folded into cls
        settings.update(reg_tokens=config.num_register_tokens, no_embed_class=True)
    if family == "deit":
        settings["reg_tokens"] = 1  # the distillation token: [cls, dist, patches] + position embedding, as timm's prefix
    if family == "siglip":  # no class token; post_layernorm on every token is timm's final norm
        settings.update(class_token=False, global_pool="")
    if family == "clip":
        settings.update(pre_norm=True, final_norm=False)  # pre_layrnorm; post_layernorm only on the pooled token (a head)
    return settings


def dinov3_settings(config) -> dict:
    """The arguments of ``timm.create_model(DINOV3_NAME, ...)`` (timm's ``Eva`` with DINOv3's RoPE: coordinates of
    patch centres in [-1, 1] per axis, periods ``rope_theta``, rotate-half) that compute what an HF DINOv3 config does."""
    from timm.layers import LayerNorm

    width = config.hidden_size
    if config.key_bias or config.query_bias != config.value_bias:
        raise Unsupported(
            "q/k/v biases", "DINOv3 with a key bias, or a query bias without a value bias: timm's Eva has q and v biases only"
        )
    if not (config.proj_bias and config.mlp_bias):
        raise Unsupported("biases", "DINOv3 without projection or MLP biases is not mapped onto timm's Eva")
    act = ACTIVATIONS.get(config.hidden_act) if isinstance(config.hidden_act, str) else None
    if act != ("silu" if config.use_gated_mlp else "gelu"):  # timm's Eva: GELU MLPs, SiLU-gated (SwiGLU) ones
        kind = "gated MLP" if config.use_gated_mlp else "MLP"
        raise Unsupported("activation", f"DINOv3 with a {kind} of hidden_act={config.hidden_act!r}: timm's Eva has GELU MLPs and SwiGLU")
    ratio = mlp_ratio(width, config.intermediate_size)
    return dict(
        img_size=_pair(config.image_size), patch_size=_pair(config.patch_size), in_chans=config.num_channels, num_classes=0,
        global_pool="token", embed_dim=width, depth=config.num_hidden_layers, num_heads=config.num_attention_heads,
        qkv_bias=bool(config.query_bias), init_values=config.layerscale_value, rope_temperature=float(config.rope_theta),
        num_reg_tokens=config.num_register_tokens, norm_layer=functools.partial(LayerNorm, eps=config.layer_norm_eps),
        mlp_ratio=ratio, swiglu_mlp=bool(config.use_gated_mlp), dynamic_img_size=True,
    )  # fmt: skip


DINOV3_NAME = "vit_small_patch16_dinov3"  # the timm name whose architecture the settings above resize


def _dinov3_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """An HF DINOv3's tensors under timm ``Eva``'s names (q, k, v packed into ``qkv``; q and v biases apart), not
    detached (:func:`_load` copies them)."""
    emb, out = model.embeddings, {}
    out["cls_token"], out["reg_token"] = emb.cls_token, emb.register_tokens
    out["patch_embed.proj.weight"], out["patch_embed.proj.bias"] = emb.patch_embeddings.weight, emb.patch_embeddings.bias
    for i, layer in enumerate(model.model.layer):
        p, attn = f"blocks.{i}.", layer.attention
        out[p + "gamma_1"], out[p + "gamma_2"] = layer.layer_scale1.lambda1, layer.layer_scale2.lambda1
        for name in ("norm1", "norm2"):
            out[f"{p}{name}.weight"], out[f"{p}{name}.bias"] = getattr(layer, name).weight, getattr(layer, name).bias
        out[p + "attn.qkv.weight"] = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        if attn.q_proj.bias is not None:
            out[p + "attn.q_bias"], out[p + "attn.v_bias"] = attn.q_proj.bias, attn.v_proj.bias
        out[p + "attn.proj.weight"], out[p + "attn.proj.bias"] = attn.o_proj.weight, attn.o_proj.bias
        if hasattr(layer.mlp, "gate_proj"):  # timm's packed SwiGLU (GluMlp, gate first): fc1 = [gate | up], act(gate) * up
            mlp = layer.mlp
            out[p + "mlp.fc1.weight"] = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            out[p + "mlp.fc1.bias"] = torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias])
        else:
            out[p + "mlp.fc1.weight"], out[p + "mlp.fc1.bias"] = layer.mlp.up_proj.weight, layer.mlp.up_proj.bias
        out[p + "mlp.fc2.weight"], out[p + "mlp.fc2.bias"] = layer.mlp.down_proj.weight, layer.mlp.down_proj.bias
    out["norm.weight"], out["norm.bias"] = model.norm.weight, model.norm.bias
    if out["reg_token"].shape[1] == 0:
        del out["reg_token"]
    return out


def _timm_weights(family: str, inner: nn.Module) -> dict[str, torch.Tensor]:
    """The HF trunk's tensors under timm's ``VisionTransformer`` names (q, k, v packed into ``qkv``), not detached
    (:func:`_load` copies them)."""
    emb, out = inner.embeddings, {}
    if family == "siglip":
        out["pos_embed"] = emb.position_embedding.weight[None]
        out["patch_embed.proj.weight"], out["patch_embed.proj.bias"] = emb.patch_embedding.weight, emb.patch_embedding.bias
        out["norm.weight"], out["norm.bias"] = inner.post_layernorm.weight, inner.post_layernorm.bias
    elif family == "clip":
        out["cls_token"] = emb.class_embedding.reshape(1, 1, -1)
        out["pos_embed"] = emb.position_embedding.weight[None]
        out["patch_embed.proj.weight"] = emb.patch_embedding.weight
        out["norm_pre.weight"], out["norm_pre.bias"] = inner.pre_layrnorm.weight, inner.pre_layrnorm.bias
    else:
        out["cls_token"] = emb.cls_token
        out["pos_embed"] = emb.position_embeddings
        if family == "deit":
            out["reg_token"] = emb.distillation_token
        if family == "dinov2_reg":  # HF adds pos_0 to the class token before the registers join: the same sum, folded
            out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
            out["pos_embed"] = out["pos_embed"][:, 1:].clone()
            if emb.register_tokens.shape[1]:  # no registers: timm has no reg_token at all
                out["reg_token"] = emb.register_tokens
        proj = emb.patch_embeddings.projection
        out["patch_embed.proj.weight"] = proj.weight
        if proj.bias is not None:
            out["patch_embed.proj.bias"] = proj.bias
        out["norm.weight"], out["norm.bias"] = inner.layernorm.weight, inner.layernorm.bias
    for i, layer in enumerate(_layers(family, inner)):
        p = f"blocks.{i}."
        if family in ("clip", "siglip"):
            attn, norms, o = layer.self_attn, (layer.layer_norm1, layer.layer_norm2), layer.self_attn.out_proj
        elif family.startswith("dinov2"):
            attn, norms, o = layer.attention, (layer.norm1, layer.norm2), layer.attention.o_proj
            out[p + "ls1.gamma"], out[p + "ls2.gamma"] = layer.layer_scale1.lambda1, layer.layer_scale2.lambda1
        else:
            attn, norms, o = layer.attention, (layer.layernorm_before, layer.layernorm_after), layer.attention.o_proj
        qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
        out[p + "attn.qkv.weight"] = torch.cat([m.weight for m in qkv])
        if attn.q_proj.bias is not None:
            out[p + "attn.qkv.bias"] = torch.cat([m.bias for m in qkv])
        out[p + "attn.proj.weight"], out[p + "attn.proj.bias"] = o.weight, o.bias
        for k, norm in enumerate(norms, 1):
            out[f"{p}norm{k}.weight"], out[f"{p}norm{k}.bias"] = norm.weight, norm.bias
        mlp = layer.mlp
        if hasattr(mlp, "gate_proj"):  # Dinov2SwiGLUFFN: down(silu(gate(x)) * up(x)) = timm SwiGLU fc2(act(fc1_g) * fc1_x)
            pairs = (("fc1_g", mlp.gate_proj), ("fc1_x", mlp.up_proj), ("fc2", mlp.down_proj))
        else:
            pairs = (("fc1", mlp.fc1), ("fc2", mlp.fc2))
        for name, linear in pairs:
            out[f"{p}mlp.{name}.weight"], out[f"{p}mlp.{name}.bias"] = linear.weight, linear.bias
    return out


def to_timm(model: nn.Module) -> nn.Module:
    """The timm ``VisionTransformer`` (no head) computing what ``model``'s trunk computes, with its weights
    (copies: ``model`` is left as it is). :class:`Unsupported` for classes and settings cait cannot map."""
    from timm.models.vision_transformer import VisionTransformer

    family = check_hf(model)
    inner = trunk(model)
    if family == "dinov3":  # timm's Eva keeps its rotary tables in non-persistent buffers: built for real, not on meta
        import timm

        if not timm.is_model(DINOV3_NAME):
            raise Unsupported("timm's DINOv3", f"Hugging Face DINOv3ViTModel maps onto timm's {DINOV3_NAME}, which timm {timm.__version__} "
                              "does not have: upgrade timm")  # fmt: skip
        with torch.device(inner.embeddings.cls_token.device):  # where the HF weights are (meta too: cait compresses there)
            vit = timm.create_model(DINOV3_NAME, pretrained=False, **dinov3_settings(inner.config))
        with torch.enable_grad():
            _load(vit, _dinov3_weights(inner))
        return vit.train(model.training)
    with torch.device("meta"):
        vit = VisionTransformer(**timm_settings(family, inner.config))
    with torch.enable_grad():  # requires_grad of tensors computed from HF's (q, k, v packed) says which are frozen
        _load(vit, _timm_weights(family, inner))
    return vit.train(model.training)


def _load(module: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copies of ``weights`` (HF's tensors by ``module``'s names, or tensors computed from them) into ``module``
    (strict), each parameter trainable only where its HF source is: a frozen (``requires_grad=False``) HF tensor
    stays frozen."""
    trainable = {name: bool(w.requires_grad) for name, w in weights.items()}
    module.load_state_dict({name: w.detach().clone() for name, w in weights.items()}, strict=True, assign=True)
    for name, parameter in module.named_parameters():
        parameter.requires_grad_(trainable[name])


def heads(class_name: str, config, pooler: bool) -> nn.ModuleDict:
    """HF's modules after the trunk, for ``class_name`` and its ``config`` (built as HF builds them, from
    torch.nn only): ``pooler`` (ViT/DeiT's dense + activation), ``classifier`` (or DeiT's ``cls_classifier``
    and ``distillation_classifier``), CLIP's ``post_layernorm`` and ``visual_projection``."""
    family = SUPPORTED[class_name]
    vision = getattr(config, "vision_config", config)
    width, out = vision.hidden_size, nn.ModuleDict()
    labels = getattr(config, "num_labels", 0)

    def classifier(inputs):
        return nn.Linear(inputs, labels) if labels > 0 else nn.Identity()

    if pooler and family == "siglip":  # HF's attention-pooling head is timm's AttentionPoolLatent (one latent, token pool)
        from timm.layers import AttentionPoolLatent, get_act_layer

        out["head"] = AttentionPoolLatent(
            width, num_heads=vision.num_attention_heads, mlp_ratio=mlp_ratio(width, vision.intermediate_size), qkv_bias=True,
            norm_layer=functools.partial(nn.LayerNorm, eps=vision.layer_norm_eps), act_layer=get_act_layer(_activation(vision)),
        )  # fmt: skip
        if out["head"].mlp.fc1.out_features != vision.intermediate_size:
            units = vision.intermediate_size
            raise Unsupported("MLP width", f"the pooling head's MLP of {units} units is not timm's int(width * mlp_ratio)")
    elif pooler:
        act = getattr(config, "pooler_act", "tanh")
        if act not in POOLER_ACTIVATIONS:
            raise Unsupported("pooler activation", f"pooler_act={act!r} is not supported: cait builds {sorted(POOLER_ACTIVATIONS)}")
        out["pooler"] = nn.Sequential(nn.Linear(width, getattr(config, "pooler_output_size", None) or width), POOLER_ACTIVATIONS[act]())
    if class_name in ("ViTForImageClassification", "DeiTForImageClassification"):
        out["classifier"] = classifier(width)
    elif class_name == "DeiTForImageClassificationWithTeacher":
        out["cls_classifier"], out["distillation_classifier"] = classifier(width), classifier(width)
    elif class_name in ("Dinov2ForImageClassification", "Dinov2WithRegistersForImageClassification"):
        out["classifier"] = classifier(2 * width)
    elif family == "clip":
        out["post_layernorm"] = nn.LayerNorm(width, eps=vision.layer_norm_eps)
        if class_name == "CLIPVisionModelWithProjection":
            out["visual_projection"] = nn.Linear(width, config.projection_dim, bias=False)
    return out


def _head_weights(class_name: str, model: nn.Module, built: nn.ModuleDict) -> dict[str, torch.Tensor]:
    inner = trunk(model)
    sources = {}
    if "head" in built:  # SigLIP: nn.MultiheadAttention's packed in_proj -> timm's q and kv
        head, width = inner.head, inner.config.hidden_size
        mha, out = head.attention, {}
        out["latent"] = head.probe
        out["q.weight"], out["kv.weight"] = mha.in_proj_weight[:width], mha.in_proj_weight[width:]
        out["q.bias"], out["kv.bias"] = mha.in_proj_bias[:width], mha.in_proj_bias[width:]
        out["proj.weight"], out["proj.bias"] = mha.out_proj.weight, mha.out_proj.bias
        for name in ("norm.weight", "norm.bias"):
            out[name] = getattr(head.layernorm, name.split(".")[1])
        for name in ("fc1", "fc2"):
            out[f"mlp.{name}.weight"], out[f"mlp.{name}.bias"] = getattr(head.mlp, name).weight, getattr(head.mlp, name).bias
        return {f"head.{k}": v for k, v in out.items()}
    if "pooler" in built:
        sources["pooler.0"] = inner.pooler.dense
    for name in ("classifier", "cls_classifier", "distillation_classifier", "visual_projection"):
        if name in built:
            sources[name] = getattr(model, name)
    if "post_layernorm" in built:
        sources["post_layernorm"] = inner.post_layernorm
    return {f"{prefix}.{k}": v for prefix, module in sources.items() for k, v in module.named_parameters()}


def has_pooler(model: nn.Module) -> bool:
    """Whether the HF model has a pooling module its config does not say it has (ViT/DeiT's ``add_pooling_layer``,
    SigLIP's ``vision_use_head``)."""
    family, inner = SUPPORTED[type(model).__name__], trunk(model)
    if family == "siglip":
        return getattr(inner, "head", None) is not None
    return family in ("vit", "deit") and getattr(inner, "pooler", None) is not None


class HFCompressed(nn.Module):
    """A compressed Hugging Face vision model: HF's calling convention and outputs on a
    :class:`cait.CompressedViT` (``backbone``) plus HF's heads (``heads``, run as HF runs them).

    ``forward(pixel_values, output_hidden_states=None, return_dict=None, interpolate_pos_encoding=None,
    labels=None)`` (arguments after ``pixel_values`` given by position in the HF class's own order) returns
    the HF class's output (``BaseModelOutputWithPooling``, ``ImageClassifierOutput``, ...), or its tuple
    with ``return_dict=False``. ``last_hidden_state`` and ``hidden_states`` hold HF's shapes (merged tokens
    put back on the patch grid). ``config``: the HF config, with ``config.cait`` recording the compression
    (tile, schedule, FLOPs target, kept channels per block).
    :meth:`forward_dense` gives the final features on the patch grid ``(B, C, H/p, W/p)``.
    """

    def __init__(self, backbone: nn.Module, class_name: str, hf_config, head_modules: nn.ModuleDict, pooler: bool):
        super().__init__()
        self.backbone, self.heads = backbone, head_modules
        self.class_name, self.family, self.pooler = class_name, SUPPORTED[class_name], pooler
        self.hf_config = hf_config

    @property
    def config(self):
        """The HF config with ``cait`` set to the compression record (read afresh on every access)."""
        self.hf_config.cait = self.compression()
        return self.hf_config

    def compression(self) -> dict:
        fast = self.backbone
        return {
            "tile": fast.tile,
            "schedule": list(fast.schedule),
            "merge_flops": fast.merge.flops if fast.merge is not None else None,
            "kept": [{k: (None if v is None else int(torch.as_tensor(v).shape[-1])) for k, v in b.kept.items()} for b in fast.blocks],
        }

    def record(self) -> dict:
        """What :func:`cait.save` stores to rebuild this wrapper (``hf`` in the file's config)."""
        import transformers

        config = copying.deepcopy(self.hf_config)
        if hasattr(config, "cait"):
            del config.cait
        return {
            "class": self.class_name, "config_class": type(config).__name__, "config": config.to_dict(), "pooler": self.pooler,
            "compression": self.compression(), "transformers_version": transformers.__version__,
        }  # fmt: skip

    @property
    def main_input_name(self) -> str:
        return "pixel_values"

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.vit.patch_embed.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.backbone.vit.patch_embed.proj.weight.device

    def _fit(self, pixel_values: torch.Tensor, interpolate_pos_encoding) -> torch.Tensor:
        """pixel_values ``(B, C, H, W)`` -> ``(B, C, H', W')`` cropped to whole patches, as HF's patch convolution
        (stride = patch, no padding) drops the last rows and columns. ValueError where HF refuses the size (ViT, DeiT,
        CLIP without ``interpolate_pos_encoding``) or the shape is not an image's; :class:`Unsupported` where HF would
        interpolate the position embedding to another patch grid."""
        fast = self.backbone
        chans, height, width = fast.input_size
        if pixel_values.dim() != 4 or pixel_values.shape[1] != chans:
            raise ValueError(f"pixel_values must have shape (B, {chans}, H, W), got {tuple(pixel_values.shape)}")
        size = tuple(pixel_values.shape[2:])
        patch = fast.vit.patch_embed.patch_size
        whole = (size[0] // patch[0] * patch[0], size[1] // patch[1] * patch[1])
        if min(whole) == 0:
            raise ValueError(f"images of {size[0]}x{size[1]} px are smaller than one {patch[0]}x{patch[1]} px patch")
        pixel_values = pixel_values[:, :, : whole[0], : whole[1]]
        if self.family == "dinov3":  # RoPE at any grid, as HF (no interpolation)
            return pixel_values
        # ViT/DeiT/CLIP without interpolate_pos_encoding refuse other sizes (as HF does); DINOv2 always interpolates
        if size != (height, width) and not interpolate_pos_encoding and self.family in ("vit", "deit", "clip"):
            raise ValueError(f"Input image size ({size[0]}*{size[1]}) doesn't match model ({height}*{width}).")
        if whole == (height, width):  # the model's own grid: HF's embedding as it is (or resampled to its own size)
            return pixel_values
        if not interpolate_pos_encoding and self.family == "siglip":  # HF: a position embedding of another length
            raise ValueError(f"Input image size ({size[0]}*{size[1]}) doesn't match model ({height}*{width}).")
        raise Unsupported(
            "position-embedding interpolation",
            f"images of {size[0]}x{size[1]} px need the position embedding interpolated from the model's {height}x{width} px, "
            f"and HF's interpolation (bicubic, no antialiasing) is not timm's (antialiased): cait refuses rather than compute "
            f"another function; resize the images to {height}x{width}",
        )

    def _full(self, x: torch.Tensor, state) -> torch.Tensor:
        """Tokens ``(B, P + N', C)`` -> HF's ``(B, P + H*W, C)``: each patch position gets its token's feature."""
        from cait_kernels import unmerge

        prefix, cells = self.backbone.num_prefix_tokens, state.grid[0] * state.grid[1]
        if x.shape[1] == prefix + cells:  # nothing merged yet: tokens are the cells in raster order
            return x
        return torch.cat([x[:, :prefix], unmerge(x, state.owner, prefix=prefix)], dim=1)

    def _positional(self, args: tuple, given: dict) -> dict:
        """HF's positional arguments after ``pixel_values`` by the names the HF class's own ``forward`` gives them
        (``ViTForImageClassification``: labels, interpolate_pos_encoding, ...). TypeError as Python's: too many, or
        one also given by name."""
        import inspect

        import transformers

        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        signature = inspect.signature(getattr(transformers, self.class_name).forward)
        names = [p.name for p in signature.parameters.values() if p.kind in kinds][2:]  # self, pixel_values
        if len(args) > len(names):
            order = ", ".join(["pixel_values", *names])
            raise TypeError(f"{self.class_name} (compressed) takes {len(names) + 1} positional arguments ({order}), got {len(args) + 1}")
        for name, value in zip(names, args):
            if given.get(name) is not None:
                raise TypeError(f"{self.class_name} (compressed) got multiple values for argument '{name}'")
        return dict(zip(names, args))

    def forward(
        self,
        pixel_values: torch.Tensor,
        *args,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ):
        """HF's ``forward``: positional arguments after ``pixel_values`` mean what they mean for the HF class (its
        own order, e.g. ``labels`` second for a classifier); see the class docstring for the rest."""
        from transformers import modeling_outputs as outputs

        if args:
            named = dict(interpolate_pos_encoding=interpolate_pos_encoding, labels=labels, bool_masked_pos=bool_masked_pos,
                         attention_mask=attention_mask, output_hidden_states=output_hidden_states, return_dict=return_dict,
                         output_attentions=output_attentions, **kwargs)  # fmt: skip
            named.update(self._positional(args, named))
            return self.forward(pixel_values, **named)
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a tensor (B, C, H, W), got {type(pixel_values).__name__}")
        config = self.hf_config
        if output_attentions or (output_attentions is None and getattr(config, "output_attentions", False)):
            raise Unsupported("attention maps", "output_attentions: attention maps between merged tokens are not HF's maps")
        for name, value in (("bool_masked_pos", bool_masked_pos), ("attention_mask", attention_mask)):
            if value is not None:
                raise Unsupported(name, f"{name} is not supported by a compressed model (merging needs every patch of the grid)")
        if kwargs:
            raise TypeError(f"{self.class_name} (compressed) got unexpected arguments: {', '.join(sorted(kwargs))}")
        if labels is not None and "classifier" not in self.heads and "cls_classifier" not in self.heads:
            raise TypeError(f"{self.class_name} takes no labels")
        if labels is not None and self.class_name == "DeiTForImageClassificationWithTeacher":
            raise ValueError("DeiTForImageClassificationWithTeacher is inference-only (as in HF): it takes no labels")
        hidden = output_hidden_states if output_hidden_states is not None else bool(getattr(config, "output_hidden_states", False))
        as_dict = return_dict if return_dict is not None else bool(getattr(config, "return_dict", True))
        pixel_values = self._fit(pixel_values, interpolate_pos_encoding).to(self.dtype)

        fast = self.backbone
        state = fast.embed(pixel_values)
        states = [state] if hidden else None
        for block in fast.blocks:
            state = fast.run_block(block, state)
            if hidden:
                states.append(state)
        last = self._full(fast.vit.norm(state.x), state)
        hidden_states = tuple(self._full(s.x, s) for s in states) if hidden else None
        out = self._heads(last, hidden_states, labels, outputs)
        return out if as_dict else out.to_tuple()

    def _heads(self, last: torch.Tensor, hidden_states, labels, outputs):
        h = self.heads
        if self.family == "clip":
            pooled = h["post_layernorm"](last[:, 0])
            if "visual_projection" in h:
                from transformers.models.clip.modeling_clip import CLIPVisionModelOutput

                embeds = h["visual_projection"](pooled)
                return CLIPVisionModelOutput(image_embeds=embeds, last_hidden_state=last, hidden_states=hidden_states)
            return outputs.BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooled, hidden_states=hidden_states)
        if self.class_name == "DeiTForImageClassificationWithTeacher":
            from transformers.models.deit.modeling_deit import DeiTForImageClassificationWithTeacherOutput

            cls_logits, dist_logits = h["cls_classifier"](last[:, 0]), h["distillation_classifier"](last[:, 1])
            return DeiTForImageClassificationWithTeacherOutput(
                logits=(cls_logits + dist_logits) / 2, cls_logits=cls_logits, distillation_logits=dist_logits, hidden_states=hidden_states
            )
        if "classifier" in h:
            if self.family.startswith("dinov2"):  # class token and the mean of the patch tokens (registers left out)
                patches = last[:, self.backbone.num_prefix_tokens :]
                logits = h["classifier"](torch.cat([last[:, 0], patches.mean(dim=1)], dim=1))
            else:
                logits = h["classifier"](last[:, 0])
            loss = None
            if labels is not None:
                from transformers.loss.loss_utils import ForSequenceClassificationLoss

                loss = ForSequenceClassificationLoss(labels.to(logits.device), logits, self.hf_config)
            return outputs.ImageClassifierOutput(loss=loss, logits=logits, hidden_states=hidden_states)
        if self.family == "siglip":
            pooled = h["head"](last) if "head" in h else None
        elif self.family.startswith(("dinov2", "dinov3")):
            pooled = last[:, 0]
        else:
            pooled = h["pooler"](last[:, 0]) if "pooler" in h else None
        return outputs.BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooled, hidden_states=hidden_states)

    def forward_dense(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values ``(B, C, H, W)`` -> the final features ``(B, hidden_size, H/p, W/p)`` on the patch grid
        (``last_hidden_state``'s patch tokens as a feature map, each cell its token's feature), as
        :meth:`cait.CompressedViT.forward_dense`."""
        return self.backbone.forward_dense(self._fit(pixel_values, None).to(self.dtype))

    def save_pretrained(self, *args, **kwargs):
        """Not HF's: :class:`Unsupported` pointing to :func:`cait.save` (transformers cannot rebuild a compressed model)."""
        raise Unsupported(
            "save_pretrained",
            "a compressed Hugging Face model is one file: cait.save(model, 'name.safetensors'), read back with cait.load "
            "(transformers' from_pretrained cannot rebuild merged tokens and pruned channels)",
        )

    def first_field(self) -> nn.Module:
        """A module ``pixel_values -> `` the first field of this model's output (HF's ``to_tuple()[0]``: the
        logits of a classifier, ``last_hidden_state`` of a backbone, ``image_embeds`` of CLIP with projection),
        sharing this model's weights: what :func:`cait.export` and :func:`cait.optimize` take."""
        return FirstField(self, self.backbone.input_size).train(self.training)

    def extra_repr(self) -> str:
        return f"class={self.class_name}"


class FirstField(nn.Module):
    """``pixel_values (B, C, H, W)`` -> the first field of the output (one tensor) of a model with HF's calling
    convention (an HF model or an :class:`HFCompressed`); ``input_size``: ``(C, H, W)`` it takes."""

    def __init__(self, model: nn.Module, input_size: tuple[int, int, int]):
        super().__init__()
        self.model, self.input_size = model, tuple(input_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values, return_dict=False)[0]


def input_size(model: nn.Module) -> tuple[int, int, int]:
    """``(C, H, W)`` a supported HF model takes (its vision config's channels and image size)."""
    config = getattr(trunk(model).config, "vision_config", trunk(model).config)
    return (config.num_channels, *_pair(config.image_size))


def is_folder(entry) -> bool:
    """Whether a ``--models`` / ``--model`` entry names a folder (a Hugging Face ``save_pretrained`` folder)."""
    return isinstance(entry, str) and os.path.isdir(entry)


def from_folder(folder: str) -> nn.Module:
    """The Hugging Face model saved in ``folder`` (``save_pretrained``: ``config.json`` and weights) in eval mode,
    as the one class its ``config.json`` names (``architectures``). FileNotFoundError / ValueError / ImportError
    (transformers not installed) name what is wrong in one line (ValueError also for weights transformers cannot
    load: missing, damaged, or not the config's shapes); :class:`Unsupported` for a class cait does not map."""
    import json

    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{folder} is a folder without config.json: give a timm name or a Hugging Face save_pretrained folder")
    transformers = require_transformers(f"{folder} (a Hugging Face folder)")
    try:
        with open(config_path) as f:
            architectures = json.load(f).get("architectures") or []
    except (OSError, json.JSONDecodeError, AttributeError) as error:
        raise ValueError(f"{config_path} is not a readable Hugging Face config: {error}") from error
    if len(architectures) != 1 or not isinstance(architectures[0], str):
        raise ValueError(f"{config_path} must name one model class in 'architectures', got {architectures!r}")
    cls = getattr(transformers, architectures[0], None)
    if cls is None:
        raise ValueError(f"{config_path} names {architectures[0]}, which transformers {transformers.__version__} does not have")
    check_hf_name(architectures[0])
    transformers.utils.logging.disable_progress_bar()  # refusals and results stay one line each on stderr
    try:
        return cls.from_pretrained(folder).eval()
    except (OSError, RuntimeError, ValueError, KeyError) as error:  # no weights, damaged or mismatched weights
        raise ValueError(f"{folder}: transformers cannot load its {architectures[0]}: {_first_line(error)}") from error
    except Exception as error:  # safetensors' own error type (a damaged file), not importable by a stable name
        if type(error).__name__ != "SafetensorError":
            raise
        raise ValueError(f"{folder}: transformers cannot load its {architectures[0]}: damaged weights ({_first_line(error)})") from error


def _first_line(error: BaseException) -> str:
    """The first non-empty line of ``error``'s message (transformers' load errors run to many lines)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def compress(model: nn.Module, merge=None, prune=None, copy: bool = True, dynamic_img_size: bool = False) -> HFCompressed:
    """:func:`cait.compress` for a Hugging Face model (see the module docstring). ``copy`` has no effect
    (the HF weights are always copied into timm's layout; ``model`` stays usable). The training mode, frozen
    tensors and HF's activation (gradient) checkpointing carry over."""
    from .model import compress as compress_timm

    class_name = type(model).__name__
    check_hf(model)
    if dynamic_img_size:
        raise Unsupported(
            "position-embedding interpolation",
            "dynamic_img_size=True: HF interpolates position embeddings with bicubic without antialiasing, timm with it; "
            "a compressed HF model takes its own input size only",
        )
    _check_calibration(model, prune)
    pooler = has_pooler(model)
    head_modules = heads(class_name, model.config, pooler)
    with torch.enable_grad():
        _load(head_modules, _head_weights(class_name, model, head_modules))
    vit = to_timm(model)
    if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):  # HF's activation checkpointing
        vit.set_grad_checkpointing(True)  # carried over as timm's (cait.compress)
    fast = compress_timm(vit, merge=merge, prune=prune, copy=False)
    if SUPPORTED[class_name] == "dinov3":  # timm's record of a name-built Eva keeps only sizes: the rest of the HF config
        from .architecture import norm_spec

        settings = dinov3_settings(trunk(model).config)
        fast.source["kwargs"].update(
            {k: settings[k] for k in ("qkv_bias", "init_values", "rope_temperature", "num_reg_tokens", "mlp_ratio", "swiglu_mlp")},
            norm_layer=norm_spec(vit.norm),
        )
    wrapper = HFCompressed(fast, class_name, copying.deepcopy(model.config), head_modules, pooler)
    return wrapper.train(model.training)


def _check_calibration(model: nn.Module, prune) -> None:
    """ValueError, before any work, for CDCP calibration images ``(B, C, H, W)`` not at the HF model's image size
    (timm's message would suggest ``dynamic_img_size=True``, which HF models refuse; DINOv3 takes any size)."""
    images = getattr(prune, "calibration", None)
    if not isinstance(images, torch.Tensor) or check_hf(model) == "dinov3":
        return
    chans, height, width = input_size(model)
    if images.dim() != 4 or tuple(images.shape[1:]) != (chans, height, width):
        raise ValueError(
            f"CDCP calibration images must have shape (B, {chans}, {height}, {width}) (the Hugging Face model's image size), "
            f"got {tuple(images.shape)}: resize them to {height}x{width}"
        )


def from_record(backbone: nn.Module, record: dict) -> HFCompressed:
    """The wrapper a saved ``hf`` record describes around ``backbone`` (heads on the meta device)."""
    transformers = require_transformers(f"loading a compressed Hugging Face {record.get('class', 'model')}")
    class_name = record["class"]
    if class_name not in SUPPORTED:
        raise ValueError(f"the file wraps a Hugging Face {class_name}, which this cait does not know")
    config_class = getattr(transformers, record["config_class"], None)
    if config_class is None:
        raise ValueError(f"the installed transformers {transformers.__version__} has no {record['config_class']}")
    config = config_class.from_dict(record["config"])
    with torch.device("meta"):
        head_modules = heads(class_name, config, bool(record["pooler"]))
    return HFCompressed(backbone, class_name, config, head_modules, bool(record["pooler"]))
