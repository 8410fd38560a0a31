"""How separable are the classes at low resolution? A class-weighted linear classifier on 8x8 colour thumbnails
plus per-channel mean/std, on the same content-hash split as training. Prints per-class recall per split.

    python benchmarks/linear_probe.py [--data ../shared/white-dogs] [--size 32]

A reference point for the trained models in docs/results.md: a network that does not beat this has learned
little beyond colour and layout statistics.
"""

import argparse

import torch
import torch.nn.functional as F

from dogclf.config import load_job
from dogclf.data import WhiteDogsDataModule, build_eval_transform


def features(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 3*64 + 6): 8x8 average-pooled colours, channel means and standard deviations."""
    return torch.cat([F.adaptive_avg_pool2d(images, 8).flatten(1), images.mean((2, 3)), images.std((2, 3))], 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/white-dogs")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--weight-decay", type=float, default=1e-3)
    args = parser.parse_args()
    cfg = load_job("gmlp", [("data.root", args.data), ("data.image_size", args.size)])
    data = WhiteDogsDataModule(cfg.data, seed=0)
    data.setup()
    transform = build_eval_transform(args.size)
    split = {}
    for name, dataset in data.datasets.items():
        x = torch.stack([transform(image) for image in dataset.images])
        split[name] = (features(x), torch.tensor(dataset.labels))
    mean, std = split["train"][0].mean(0), split["train"][0].std(0) + 1e-6
    x_train, y_train = (split["train"][0] - mean) / std, split["train"][1]
    counts = torch.bincount(y_train, minlength=len(data.classes)).float()
    weights = counts.sum() / (len(counts) * counts.clamp(min=1))
    probe = torch.nn.Linear(x_train.shape[1], len(data.classes))
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=300)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(x_train), y_train, weight=weights) + args.weight_decay * probe.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    print("| split | " + " | ".join(f"recall {c}" for c in data.classes) + " | balanced acc |")
    print("|---" * (len(data.classes) + 2) + "|")
    with torch.no_grad():
        for name in ("train", "val", "test"):
            x, y = split[name]
            predicted = probe((x - mean) / std).argmax(1)
            recall = [((predicted == c) & (y == c)).sum().item() / max(1, (y == c).sum().item())
                      for c in range(len(data.classes))]
            present = [r for c, r in enumerate(recall) if (y == c).any()]
            print(f"| {name} | " + " | ".join(f"{r:.2f}" for r in recall) + f" | {sum(present) / len(present):.3f} |")


if __name__ == "__main__":
    main()
