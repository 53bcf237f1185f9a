"""CLIP-Adapter (Gao et al., "CLIP-Adapter: Better Vision-Language Models with Feature Adapters",
2021) as a textrefiner method, written from outside the package: a residual bottleneck MLP on the
frozen image tower's feature, classified against CLIP's hand-crafted "a photo of a {}." prompts,
which TextRefiner refines. Nothing in the repository knows this file:

    make base2new DATASET=caltech101 METHOD=examples/clip_adapter.py:CLIPAdapter  # + TextRefiner
    make base2new DATASET=caltech101 METHOD=examples/clip_adapter.py:CLIPAdapter REFINER=0
    python train.py --method examples/clip_adapter.py:CLIPAdapter --ratio 0.6 ...
    python bench.py step --method examples/clip_adapter.py:CLIPAdapter

(REFINER=0 trains the adapter alone.) The adapter's shape and ratio are the paper's (reduction 4,
ratio 0.2); the optimiser and schedule are this example's choice for the 16-shot base-to-new
protocol (AdamW, as adapters usually are trained), not a reproduction of the paper's table.
"""
from dataclasses import dataclass

import torch.nn as nn

import hosts
import textrefiner


@dataclass
class CLIPAdapterRecipe(textrefiner.RefinerRecipe):
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-2
    epochs: int = 10
    # The adapter's residual weight (the paper's alpha; TextRefiner's --alpha is another setting).
    ratio: float = textrefiner.setting(0.2, textrefiner.UNIT)
    reduction: int = textrefiner.setting(4, textrefiner.POSITIVE)  # bottleneck width: D / reduction
    template: str = "a photo of a {}."


class CLIPAdapter(textrefiner.PromptCLIP):
    """x' = ratio * adapter(x) + (1 - ratio) * x on the image feature x (D), adapter =
    Linear(D, D/r) -> ReLU -> Linear(D/r, D) -> ReLU without biases; the class features are the
    frozen text tower's on the template, refined by TextRefiner when the recipe has it."""
    recipe = CLIPAdapterRecipe
    loss_keys = ("loss", "loss_global", "loss_local", "loss_reg")
    title = "CLIP-Adapter"

    def build(self, clip, classnames, recipe):
        width, hidden = clip.config.embed_dim, clip.config.embed_dim // recipe.reduction
        self.adapter = nn.Sequential(nn.Linear(width, hidden, bias=False), nn.ReLU(),
                                     nn.Linear(hidden, width, bias=False), nn.ReLU())
        self.ratio = recipe.ratio
        # the frozen text tower's features, encoded once per class set
        self.handcrafted = hosts.TemplateFeatures([recipe.template])

    def set_classnames(self, classnames):
        self.handcrafted.set_classnames(classnames)
        super().set_classnames(classnames)

    def text_features(self):
        return self.handcrafted(self.clip)  # (C, D), normalised

    def adapt(self, image):
        with textrefiner.fp32(image):  # the adapter's maths in fp32, also under autocast
            image = image.float()  # (B, D)
            return self.ratio * self.adapter(image) + (1 - self.ratio) * image

    def image_features(self, images):
        return self.adapt(self.clip.encode_image(images))  # trained: evaluation never reuses them

    def train_forward(self, images, labels):
        image, tokens, cls_attn = textrefiner.image_pass(self, images)  # the frozen tower, once
        t = self.text_features()
        return textrefiner.refined_ce(self, t, self.adapt(image), labels, tokens, cls_attn)
