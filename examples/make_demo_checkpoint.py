"""Build the checkpoints `make demo` works on: a training checkpoint that nests the state dict
of a little residual CNN under "state_dict", next to epoch and optimizer state, the way
training scripts save them; and the state dict of the same network with a 3-class head, the
template of a fine-tuning run. Seeded, so the demo shows the same numbers every time."""

import sys

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)

    def forward(self, x):
        return x + torch.relu(self.bn(self.conv(x)))


class TinyNet(nn.Module):
    def __init__(self, classes: int = 10, width: int = 16, depth: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.Sequential(*[Block(width) for _ in range(depth)])
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def main(path: str, template: str) -> None:
    torch.manual_seed(0)
    model = TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    torch.save({"epoch": 3, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
                "config": {"arch": "tinynet", "classes": 10}}, path)
    torch.manual_seed(1)  # the new model: 3 classes instead of 10, saved before fine-tuning
    torch.save(TinyNet(classes=3).state_dict(), template)
    print(f"built {path} and the template {template}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
