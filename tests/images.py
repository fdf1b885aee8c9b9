"""Image helpers of the tests."""

from typing import Sequence

import torch

from poa_hpc.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def denormalize(x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Invert the normalisation; channel dim is -3."""
    m = torch.tensor(mean, dtype=x.dtype).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(3, 1, 1)
    return x * s + m
