"""The vision models of Hugging Face ``transformers``, as a user brings them: each built from its
library's own code and config class (random weights, no download), made small enough for a minute's
run, wrapped to return the logits (``model(pixel_values=x).logits``) and exported as the README
says. ``bench families --library transformers`` trains them; ``tests/test_families.py`` holds each
to PyTorch's own training. Needs ``transformers`` (the test extra).

What these files exercise beyond the hand-written families: TF-style "same" padding computed in the
graph (MobileNetV2), ``padding="same"`` convolutions and a kernel-wide AvgPool with ``ceil_mode``
(EfficientNet), a class token broadcast to the batch and taken back out with ``x[:, 0]`` (ViT, DeiT),
and BatchNorm with TensorFlow's momentum and epsilon.
"""

from __future__ import annotations

from typing import Any, Callable

# each family's published training recipe, as for the hand-written ones (bench.families.RECIPES)
RECIPES = {"hf-resnet": "sgd", "hf-mobilenetv2": "sgd", "hf-efficientnet": "sgd", "hf-regnet": "sgd",
           "hf-convnext": "adamw", "hf-vit": "adamw", "hf-deit": "adamw"}


def families(channels: int, classes: int, size: int) -> dict[str, Callable[[], Any]]:
    """name -> a factory of the model for ``channels`` x ``size`` x ``size`` images and ``classes``."""
    import torch.nn as nn
    import transformers as hf

    class Logits(nn.Module):
        """What a user writes to export a transformers classifier: its logits only."""

        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(pixel_values=x).logits

    c, k = channels, classes
    patch = max(2, size // 4)  # 16 tokens
    vit = dict(num_channels=c, image_size=size, patch_size=patch, hidden_size=32, num_hidden_layers=2,
               num_attention_heads=2, intermediate_size=64, num_labels=k)
    configs: dict[str, tuple[Any, Any]] = {
        "hf-resnet": (hf.ResNetConfig(num_channels=c, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                      num_labels=k), hf.ResNetForImageClassification),
        "hf-mobilenetv2": (hf.MobileNetV2Config(num_channels=c, image_size=size, depth_multiplier=0.25,
                                                 finegrained_output=False, num_labels=k),
                           hf.MobileNetV2ForImageClassification),
        "hf-efficientnet": (hf.EfficientNetConfig(num_channels=c, image_size=size, width_coefficient=0.25,
                                                  depth_coefficient=0.25, hidden_dim=320, num_labels=k),
                            hf.EfficientNetForImageClassification),
        "hf-regnet": (hf.RegNetConfig(num_channels=c, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                      groups_width=8, num_labels=k), hf.RegNetForImageClassification),
        "hf-convnext": (hf.ConvNextConfig(num_channels=c, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1],
                                          num_labels=k), hf.ConvNextForImageClassification),
        "hf-vit": (hf.ViTConfig(**vit), hf.ViTForImageClassification),
        "hf-deit": (hf.DeiTConfig(**vit), hf.DeiTForImageClassification),
    }
    return {name: (lambda cfg=cfg, cls=cls: Logits(cls(cfg))) for name, (cfg, cls) in configs.items()}
