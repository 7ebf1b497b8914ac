"""mmfm's image encoder against timm's VisionTransformer built from the same config and holding the same weights.

Both run a forward pass over one batch of random pixels in fp32 under `torch.inference_mode`. mmfm wraps the
timm model, so the ratio measures what the wrapper adds: the input shape check and dropping the class token.
The outputs are checked to be equal, so both sides did the same work.
"""

from __future__ import annotations

import timm
import torch

from benchmarks.harness import Result, compare, setup
from mmfm.config import ImageEncoderConfig
from mmfm.encoders.vision import ImageEncoder

TARGET = 0.95


def main(quick: bool = False) -> list[Result]:
    """Prints the timing table and returns the headline ratio, t_timm / t_mmfm."""
    setup()
    if quick:
        config = ImageEncoderConfig(model_name="vit_tiny_patch16_224", img_size=64, depth=2)
        batch, rounds = 2, 3
    else:
        config = ImageEncoderConfig(model_name="vit_small_patch16_224")
        batch, rounds = 8, 10
    encoder = ImageEncoder(config).eval()
    # The same overrides mmfm passes; timm ignores the ones left at None.
    vit = timm.create_model(
        config.model_name,
        pretrained=False,
        num_classes=0,
        global_pool="",
        img_size=config.img_size,
        patch_size=config.patch_size,
        embed_dim=config.width,
        depth=config.depth,
        num_heads=config.num_heads,
    ).eval()
    vit.load_state_dict(encoder.vit.state_dict())
    size = encoder.data_config["input_size"]
    pixels = torch.randn(batch, *size)

    with torch.inference_mode():
        result = compare({"mmfm": lambda: encoder(pixels), "timm": lambda: vit(pixels)}, rounds=rounds, warmup=2)
    prefix = vit.num_prefix_tokens
    torch.testing.assert_close(result.outputs["mmfm"], result.outputs["timm"][:, prefix:], rtol=0, atol=0)

    print(
        f"\n{config.model_name}: {size[1]}x{size[2]} px, width {encoder.width}, depth {len(vit.blocks)}, "
        f"batch {batch}, fp32, {torch.get_num_threads()} threads"
    )
    print(result.format("image encoder forward"))
    return [Result("image_encoder", result.ratio("mmfm", "timm"), TARGET, "t_timm / t_mmfm")]


if __name__ == "__main__":
    main()
