"""Image layouts shared by the shift generators and the recipes: 28×28 grey sets as 32×32 RGB.

28×28 grey Fashion-MNIST and MNIST are padded by 2 pixels to 32×32 (the CIFAR size the CIFAR-10-C
corruption constants were made for) and repeated to 3 channels.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["grey28_to_rgb32"]


def grey28_to_rgb32(images: np.ndarray) -> Tensor:
    """``(N, 28, 28)`` uint8 (or float 0–255) → ``(N, 3, 32, 32)`` float32 in ``[0, 1]`` (2-pixel zero pad).

    Example:
        >>> grey28_to_rgb32(np.zeros((2, 28, 28), np.uint8)).shape
        torch.Size([2, 3, 32, 32])
    """
    x = torch.as_tensor(np.asarray(images, dtype=np.float32) / 255.0)
    x = nn.functional.pad(x, (2, 2, 2, 2))
    return x[:, None].expand(-1, 3, -1, -1).contiguous()
