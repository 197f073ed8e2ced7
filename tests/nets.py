"""Small networks shared by the distributed tests."""

from __future__ import annotations

import torch
from torch import nn


class ConvNet(nn.Module):
    """24 inputs -> ``out`` outputs through a Tucker-projected convolution (40 x 32 x 3 x 3 >
    9,216 elements) between two matrices whose moments have 512 x 8 and 640 x 8 elements at
    rank 8 (>= 4,096: 8 bits under ``state_bits=8``). With ``rank_ratio_cnn=16`` the Tucker
    ranks (10, 8) stay below the gradient's mode ranks (8 samples x 16 positions), so its
    factors are well defined."""

    def __init__(self, out: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(24, 512)
        self.conv = nn.Conv2d(32, 40, 3, padding=1)
        self.fc2 = nn.Linear(640, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc1(x)).view(-1, 32, 4, 4)
        return self.fc2(torch.tanh(self.conv(h)).flatten(1))
