"""iBOT masked-patch loss (DINOv2's ``iBOTPatchLoss.forward_masked``)."""

from __future__ import annotations

import torch

from poa_hpc.losses.dino import cross_entropy


def ibot_patch_loss(
    student_masked_logits: torch.Tensor,
    teacher_masked_probs: torch.Tensor,
    masks_weight: torch.Tensor,
    n_images: int,
    student_temp: float,
) -> torch.Tensor:
    """Cross-entropy on masked patches, averaged per image then over all images.

    Args:
        student_masked_logits: (M, K) student logits at the masked patches.
        teacher_masked_probs: (M, K) teacher targets at the same patches (unmasked input).
        masks_weight: (M,) 1 / (number of masked patches of the token's image).
        n_images: number of global-crop images in the batch (images without masks count).
    """
    if student_masked_logits.shape[0] == 0:
        return student_masked_logits.sum() * 0.0
    per_token = cross_entropy(teacher_masked_probs, student_masked_logits, student_temp)
    return (per_token * masks_weight).sum() / n_images
