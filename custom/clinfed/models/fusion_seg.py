"""3D tumour segmentation (MONAI BasicUNet) with an outcome head fusing image and EHR features.

Built for DP-SGD from the start: GroupNorm (no batch statistics shared across samples), no
in-place activations, and interpolation upsampling instead of ConvTranspose3d (which Opacus
has no per-sample gradient rule for).
"""

from __future__ import annotations

import torch
from monai.networks.nets import BasicUNet
from torch import nn

DEFAULT_FEATURES = (8, 16, 16, 32, 32, 8)


class FusionSegNet(nn.Module):
    """Segmentation logits plus a high-grade logit from bottleneck + predicted lesion + EHR.

    Args:
        ehr_features: length of the EHR vector: the study's features and their missing-indicators
            (``StudyDefinition.ehr_size``; 12 for the liver study).
        features: BasicUNet feature sizes; every one must be divisible by ``norm_groups``.
        norm_groups: GroupNorm groups.
    """

    def __init__(self, ehr_features: int = 12, features: tuple[int, ...] = DEFAULT_FEATURES, norm_groups: int = 4):
        super().__init__()
        # Kept under their argument names: FLARE's job export reads a component's arguments back
        # from the instance, and silently leaves out any it cannot find there (the server would
        # then build the default model whatever the study).
        self.ehr_features, self.features, self.norm_groups = ehr_features, tuple(features), norm_groups
        if any(f % norm_groups for f in features):
            raise ValueError(f"every feature size in {features} must be divisible by norm_groups={norm_groups}")
        self.unet = BasicUNet(
            spatial_dims=3, in_channels=1, out_channels=2, features=features,
            act=("LeakyReLU", {"negative_slope": 0.1, "inplace": False}),
            norm=("group", {"num_groups": norm_groups}), upsample="nontrainable",
        )
        # Image embedding (bottleneck channels) + lesion fraction + lesion mean intensity + EHR.
        self.outcome_head = nn.Sequential(
            nn.Linear(features[4] + 2 + ehr_features, 32), nn.LeakyReLU(0.1), nn.Linear(32, 1))

    def forward(self, image: torch.Tensor, ehr: torch.Tensor,
                zero_image: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Segmentation logits and the outcome logit. ``zero_image``: the outcome head sees a zero
        image embedding (an ablation: what the EHR alone gives the same head)."""
        u = self.unet
        x0 = u.conv_0(image)
        x1 = u.down_1(x0)
        x2 = u.down_2(x1)
        x3 = u.down_3(x2)
        x4 = u.down_4(x3)
        seg_logits = u.final_conv(u.upcat_1(u.upcat_2(u.upcat_3(u.upcat_4(x4, x3), x2), x1), x0))

        # The head reads the segmenter's features without training them: the outcome loss on a few
        # dozen patients must not bend the segmentation (and a lesion grown to signal "high grade").
        tumour = torch.softmax(seg_logits.detach(), dim=1)[:, 1:2]
        lesion_fraction = tumour.mean(dim=(2, 3, 4))
        lesion_intensity = (tumour * image).sum(dim=(2, 3, 4)) / (tumour.sum(dim=(2, 3, 4)) + 1.0)
        image_embedding = torch.cat([x4.detach().mean(dim=(2, 3, 4)), lesion_fraction * 10.0, lesion_intensity], dim=1)
        if zero_image:
            image_embedding = torch.zeros_like(image_embedding)
        return seg_logits, self.outcome_head(torch.cat([image_embedding, ehr], dim=1)).squeeze(1)
