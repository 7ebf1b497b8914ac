"""The registered model sizes. Each function returns a full config; YAML recipes in configs/ override them."""

from __future__ import annotations

from mmfm.config import (
    AudioEncoderConfig,
    BackboneConfig,
    CaptionHeadConfig,
    ClassifyHeadConfig,
    ContrastiveHeadConfig,
    ImageEncoderConfig,
    ImageGenHeadConfig,
    ModelConfig,
    ProjectorConfig,
    TextConfig,
)
from mmfm.registry import register_model


@register_model
def mmfm_test() -> ModelConfig:
    """A few hundred thousand parameters with every modality and head: for tests."""
    return ModelConfig(
        image=ImageEncoderConfig(
            model_name="vit_tiny_patch16_224", img_size=32, patch_size=8, width=32, depth=1, num_heads=2
        ),
        audio=AudioEncoderConfig(
            model_name="vit_tiny_patch16_224",
            num_mel_bins=32,
            target_frames=64,
            patch_stride=16,
            width=32,
            depth=1,
            num_heads=2,
            projector=ProjectorConfig(kind="linear", num_tokens=4),
        ),
        text=TextConfig(tokenizer="byte", max_length=32),
        backbone=BackboneConfig(dim=64, depth=2, num_heads=4, num_kv_heads=2, max_seq_len=256),
        caption=CaptionHeadConfig(max_new_tokens=16),
        classify=ClassifyHeadConfig(labels=[str(i) for i in range(10)]),
        contrastive=ContrastiveHeadConfig(embed_dim=32),
        image_gen=ImageGenHeadConfig(
            image_size=16,
            block_out_channels=[8, 16],
            layers_per_block=1,
            attention_head_dim=8,
            norm_num_groups=4,
            num_inference_steps=10,
        ),
    )


@register_model
def mmfm_tiny() -> ModelConfig:
    """Small images (32 px) and short clips (1.3 s): trains on 2 CPU cores in minutes."""
    return ModelConfig(
        image=ImageEncoderConfig(
            model_name="vit_tiny_patch16_224", img_size=32, patch_size=4, width=128, depth=4, num_heads=4
        ),
        audio=AudioEncoderConfig(
            model_name="vit_tiny_patch16_224",
            num_mel_bins=64,
            target_frames=128,
            patch_stride=16,
            width=128,
            depth=2,
            num_heads=4,
        ),
        text=TextConfig(tokenizer="byte", max_length=48),
        backbone=BackboneConfig(dim=256, depth=4, num_heads=4, max_seq_len=512),
        contrastive=ContrastiveHeadConfig(embed_dim=128),
    )


@register_model
def mmfm_small() -> ModelConfig:
    """ViT-S/16 images, AST-geometry audio with a ViT-S tower, CLIP BPE text, an 8-layer 512-wide backbone."""
    return ModelConfig(
        image=ImageEncoderConfig(model_name="vit_small_patch16_224"),
        audio=AudioEncoderConfig(
            model_name="vit_small_patch16_224", patch_stride=16, projector=ProjectorConfig(num_tokens=128)
        ),
        text=TextConfig(tokenizer="clip", max_length=77),
        backbone=BackboneConfig(dim=512, depth=8, num_heads=8, num_kv_heads=4, max_seq_len=1024),
        contrastive=ContrastiveHeadConfig(embed_dim=512),
    )


@register_model
def mmfm_base() -> ModelConfig:
    """ViT-B/16 images, AST-B audio (overlapping patches), CLIP BPE text, a 12-layer 768-wide backbone."""
    return ModelConfig(
        image=ImageEncoderConfig(model_name="vit_base_patch16_224"),
        audio=AudioEncoderConfig(
            model_name="vit_base_patch16_224", reg_tokens=1, projector=ProjectorConfig(num_tokens=256)
        ),
        text=TextConfig(tokenizer="clip", max_length=77),
        backbone=BackboneConfig(dim=768, depth=12, num_heads=12, max_seq_len=2048),
        contrastive=ContrastiveHeadConfig(embed_dim=512),
    )
