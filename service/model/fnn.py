"""The feed-forward network served by digitserve, and the constants that travel with it."""

from __future__ import annotations

import torch
from torch import nn

INPUT_SIZE = 784
IMAGE_SIDE = 28
NUM_CLASSES = 10
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


def initialize_weights(module: nn.Module) -> None:
    """Xavier-uniform weights and 0.01 biases: the contract's initialisation (``model.apply``)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        nn.init.constant_(module.bias, 0.01)


class FNN(nn.Module):
    """Linear -> ReLU -> Linear. Accepts (N, 784) or (N, 1, 28, 28) normalised images; returns logits."""

    def __init__(self, input_size: int = INPUT_SIZE, hidden_size: int = 500, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_classes = num_classes
        self.fc1 = nn.Linear(input_size, hidden_size)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden_size, num_classes)
        self.apply(initialize_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)[1]

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The hidden layer (after the ReLU) and the logits, from one pass: the typicality score reads both."""
        hidden = self.relu(self.fc1(x.reshape(x.shape[0], self.input_size)))
        return hidden, self.fc2(hidden)

    def architecture(self) -> dict:
        """What metadata.json records so a loader can rebuild and check this exact net."""
        return {
            "class": type(self).__name__,
            "input_size": self.input_size,
            "hidden_size": self.hidden_size,
            "num_classes": self.num_classes,
            "layers": ["fc1: Linear", "relu: ReLU", "fc2: Linear"],
        }
