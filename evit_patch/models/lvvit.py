"""LV-ViT ("All Tokens Matter: Token Labeling", Jiang et al.) built from timm layers.

timm has no LV-ViT. This one is shaped like a timm ViT (``blocks``, ``num_prefix_tokens``,
``cls_token``, ``patch_embed.img_size``, ``pos_embed``, ``norm``, ``head``) and its blocks
are ``x = x + attention branch`` then ``x = x + MLP branch``, so
:func:`evit_patch.apply_evit` patches it through the generic path, with no LV-ViT case.

What makes it LV-ViT: a 4-layer convolutional patch embedding, both residual branches
divided by ``skip_lam``, MLP ratio 3, qkv without bias, and an ``aux_head`` on every
image token whose best token score is added to the class logits at test time
(``cls + 0.5 * max over tokens of aux``). The aux head reads whatever image tokens are
left after the blocks, so the model runs unchanged on a reorganized (shorter) sequence.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from timm.layers import Attention, ConvNormAct, DropPath, Mlp, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn

from evit_patch.models.lvvit_weights import checkpoint_filter_fn

DEFAULT_EVIT_LAYERS = {"lvvit_t": (3, 6, 9), "lvvit_s": (4, 8, 12), "lvvit_m": (5, 10, 15)}
"""0-indexed reorganization blocks per variant: where DynamicViT prunes LV-ViT-S and -M;
for the 12-block T, those of DeiT, which has its depth."""


class ConvPatchEmbed(nn.Module):
    """Three conv-BN-ReLU layers (7x7 stride 2, then two 3x3) and a ``patch/2`` stride
    projection: 14x14 tokens at 224 px with patch 16, returned as ``(B, N, C)``."""

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 384, stem_chans: int = 64) -> None:
        super().__init__()
        if patch_size % 2:
            raise ValueError(f"patch_size must be even (the stem halves the image first), got {patch_size}")
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.grid_size = tuple(size // patch for size, patch in zip(self.img_size, self.patch_size))
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.stem = nn.Sequential(
            ConvNormAct(in_chans, stem_chans, 7, stride=2, padding=3),
            ConvNormAct(stem_chans, stem_chans, 3, padding=1),
            ConvNormAct(stem_chans, stem_chans, 3, padding=1),
        )
        self.proj = nn.Conv2d(stem_chans, embed_dim, kernel_size=patch_size // 2, stride=patch_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.stem(x)).flatten(2).transpose(1, 2)


class LvvitBlock(nn.Module):
    """Pre-norm transformer block whose two residual branches are divided by ``skip_lam``,
    which keeps the residual stream's scale in check in deep LV-ViTs."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 3.0, skip_lam: float = 2.0,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
                 act_layer: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.skip_lam = skip_lam
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=False, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)) / self.skip_lam
        x = x + self.drop_path2(self.mlp(self.norm2(x))) / self.skip_lam
        return x


class LvVit(nn.Module):
    """LV-ViT with its class head and token-labeling ``aux_head``.

    ``forward`` returns the test-time prediction ``cls + aux_weight * max_tokens(aux)``
    (in training too, so a plain classification loss trains both heads); set
    ``return_dense = True``, or call :meth:`forward_dense`, for ``(cls_logits,
    aux_logits)`` as token labeling needs.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 384, depth: int = 16, num_heads: int = 6,
                 mlp_ratio: float = 3.0, skip_lam: float = 2.0, stem_chans: int = 64, aux_weight: float = 0.5,
                 drop_rate: float = 0.0, proj_drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.has_class_token = True
        self.aux_weight = aux_weight
        self.return_dense = False
        self.patch_embed = ConvPatchEmbed(img_size, patch_size, in_chans, embed_dim, stem_chans)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = [drop_path_rate * index / max(depth - 1, 1) for index in range(depth)]  # plain floats: meta-device safe
        self.blocks = nn.Sequential(*[
            LvvitBlock(embed_dim, num_heads, mlp_ratio, skip_lam, proj_drop_rate, attn_drop_rate, rate, norm_layer)
            for rate in rates
        ])
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.aux_head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """New class and aux heads: both predict the same classes."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.aux_head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        """Normalized tokens ``(B, 1 + n, C)``; ``n`` is 196 at 224 px, fewer after EViT."""
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.norm(self.blocks(self.pos_drop(x)))

    def dense_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(cls_logits (B, K), aux_logits (B, n, K))`` from :meth:`forward_features` output."""
        x = self.head_drop(x)
        return self.head(x[:, 0]), self.aux_head(x[:, self.num_prefix_tokens:])

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """The test-time prediction: class logits plus ``aux_weight`` times the best token's."""
        if pre_logits:
            return x[:, 0]
        cls_logits, aux_logits = self.dense_logits(x)
        return cls_logits + self.aux_weight * aux_logits.max(dim=1).values

    def forward_dense(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(cls_logits, aux_logits)`` of images, for token labeling."""
        return self.dense_logits(self.forward_features(x))

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        if self.return_dense:
            return self.forward_dense(x)
        return self.forward_head(self.forward_features(x))


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _cfg(**kwargs) -> dict:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 0.9, "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
        "first_conv": "patch_embed.stem.0.conv", "classifier": ("head", "aux_head"),
        "license": "apache-2.0", "paper_ids": "arXiv:2104.10858", "origin_url": "https://github.com/zihangJiang/TokenLabeling",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "lvvit_t.in1k": _cfg(),
    "lvvit_s.in1k": _cfg(),
    "lvvit_m.in1k": _cfg(crop_pct=1.0),
})


def _create(variant: str, pretrained: bool, **kwargs) -> LvVit:
    """Build through timm, so ``pretrained_cfg_overlay=dict(file=...)`` loads a published
    checkpoint (original key names are mapped) and ``checkpoint_path`` this model's own."""
    return build_model_with_cfg(LvVit, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


@register_model
def lvvit_t(pretrained: bool = False, **kwargs) -> LvVit:
    """LV-ViT-T: 12 blocks, width 240, 4 heads, no residual scaling."""
    args = dict(embed_dim=240, depth=12, num_heads=4, mlp_ratio=3.0, skip_lam=1.0)
    return _create("lvvit_t", pretrained, **{**args, **kwargs})


@register_model
def lvvit_s(pretrained: bool = False, **kwargs) -> LvVit:
    """LV-ViT-S: 16 blocks, width 384, 6 heads (26.2M parameters, 6.6 GMACs, 83.3%)."""
    args = dict(embed_dim=384, depth=16, num_heads=6, mlp_ratio=3.0, skip_lam=2.0)
    return _create("lvvit_s", pretrained, **{**args, **kwargs})


@register_model
def lvvit_m(pretrained: bool = False, **kwargs) -> LvVit:
    """LV-ViT-M: 20 blocks, width 512, 8 heads (55.8M parameters, 12.7 GMACs, 84.0%)."""
    args = dict(embed_dim=512, depth=20, num_heads=8, mlp_ratio=3.0, skip_lam=2.0)
    return _create("lvvit_m", pretrained, **{**args, **kwargs})
