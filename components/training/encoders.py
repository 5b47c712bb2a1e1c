"""Encoders that are not a classifier without its head: MONAI's masked autoencoder ViT, whose encoder half a
pretrained MAE (``medflow pretrain`` with ``pretrain.method: mae``) serves as a backbone."""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.nets import MaskedAutoEncoderViT

# A small decoder (MAE's decoder is lighter than its encoder); any MaskedAutoEncoderViT argument overrides it.
MAE_DECODER_DEFAULTS = {"decoder_hidden_size": 128, "decoder_mlp_dim": 512, "decoder_num_layers": 2,
                        "decoder_num_heads": 4}
FORMAT_MAE = "monai-mae"


class MAEEncoder(MaskedAutoEncoderViT):
    """MONAI's ``MaskedAutoEncoderViT`` whose ``forward`` is its encoder alone, on every patch (no masking):
    images (B, C, H, W) -> the mean of the patch tokens after the encoder blocks and their LayerNorm
    (B, hidden_size). :meth:`reconstruct` is MONAI's masked forward (predicted patches, mask), for pretraining.
    Its state_dict is MONAI's, so the decoder's weights travel with it (unused by the features)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        tokens = self.patch_embedding(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        return self.blocks(torch.cat((cls, tokens), dim=1))[:, 1:].mean(dim=1)

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted pixels of every patch (B, N, prod(patch) * C), mask (B, N): 1 where the patch was hidden)."""
        return super().forward(x)


def mae_kwargs(vit_kwargs: dict[str, Any], *, masking_ratio: float) -> dict[str, Any]:
    """MaskedAutoEncoderViT's arguments from a ViT's (``classifier_kwargs("vit", ...)``) and the masking ratio."""
    return {**MAE_DECODER_DEFAULTS, **vit_kwargs, "masking_ratio": masking_ratio}


def build_mae_encoder(kwargs: dict[str, Any]) -> MAEEncoder:
    """A 2D single-channel :class:`MAEEncoder` with ``kwargs`` (see :func:`mae_kwargs`), untrained."""
    return MAEEncoder(in_channels=1, spatial_dims=2, **kwargs)
