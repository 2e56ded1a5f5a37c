"""The seed tutorial's training script, as its authors wrote it, for whole-process timing beside `nnforge train`.

    python benchmarks/seed_tutorial.py DATA_FOLDER [--workers N]

The well-known PyTorch "training a classifier" tutorial, pointed at an image folder: torchvision ImageFolder with
per-sample Grayscale/ToTensor/Normalize transforms, DataLoader(batch_size=16, shuffle=True) with the DataLoader's
default num_workers=0 unless --workers says otherwise, the two-conv network (seed_cnn: its flatten size follows the
input instead of the hard-coded 64*4*4), SGD lr 0.001 momentum 0.9, cross-entropy, one epoch, the running loss
printed every 2000 mini-batches as the tutorial does. Nothing here is nnforge's except the network definition.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.optim as optim
import torchvision
import torchvision.transforms as transforms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nnforge.models.cnn import SeedCNN  # noqa: E402  (the tutorial's Net, with a flatten size that fits 28x28)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("data")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (the tutorial leaves the default, 0)")
    a = p.parse_args()
    t0 = time.perf_counter()
    transform = transforms.Compose([transforms.Grayscale(), transforms.ToTensor(),
                                    transforms.Normalize((0.5,), (0.5,))])
    trainset = torchvision.datasets.ImageFolder(a.data, transform=transform)
    trainloader = torch.utils.data.DataLoader(trainset, batch_size=16, shuffle=True, num_workers=a.workers)
    net = SeedCNN(len(trainset.classes), in_chans=1, img_size=28)
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.SGD(net.parameters(), lr=0.001, momentum=0.9)
    for epoch in range(1):
        running_loss = 0.0
        for i, (inputs, labels) in enumerate(trainloader, 0):
            optimizer.zero_grad()
            loss = criterion(net(inputs), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            if i % 2000 == 1999:
                print(f"[{epoch + 1}, {i + 1:5d}] loss: {running_loss / 2000:.3f}")
                running_loss = 0.0
    print(f"Finished Training: {len(trainset)} images in {time.perf_counter() - t0:.2f} s after imports")


if __name__ == "__main__":
    main()
