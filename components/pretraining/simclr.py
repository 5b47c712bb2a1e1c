"""SimCLR (Chen et al., 2020): two randomly augmented views of each image; an encoder and a projection head
map both, and MONAI's ``ContrastiveLoss`` (NT-Xent) pulls each image's two projections together and pushes
them from the other images' in the batch. After pretraining the projection head is dropped: the encoder is
what a classifier starts from.

The views are :mod:`components.pretraining.views`'.
"""

from __future__ import annotations

import torch
from monai.losses import ContrastiveLoss
from torch import nn



class TwoViews(nn.Module):
    """Encoder and projection head over the two views of a batch, stacked on the channel axis.

    ``forward((B, 2C, H, W))`` -> projections (2B, P): the first views' rows, then the second views'.
    """

    def __init__(self, encoder: nn.Module, feature_dim: int, projection_dim: int) -> None:
        super().__init__()
        self.encoder = encoder
        # SimCLR's projection head, a two-layer MLP. lightly's SimCLRProjectionHead is the same; lightly is not a
        # dependency because it imports torchvision, whose wheels do not load beside the CPU build of torch.
        self.projector = nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU(inplace=True),
                                       nn.Linear(feature_dim, projection_dim))

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        return self.embed(views)[1]

    def embed(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's features (2B, D) and their projections (2B, P), the first views' rows first."""
        first, second = views.chunk(2, dim=1)
        features = self.encoder(torch.cat([first, second])).flatten(1)
        return features, self.projector(features)


def contrastive_loss(temperature: float):
    """``loss(projections (2B, P), labels)`` (labels unused): MONAI's NT-Xent between the two halves."""
    loss = ContrastiveLoss(temperature=temperature)

    def compute(projections: torch.Tensor, _labels: torch.Tensor | None = None) -> torch.Tensor:
        first, second = projections.chunk(2)
        return loss(first, second)

    return compute
