"""Training throughput of the executor's training path (clinfed.training.train_epochs over its
MONAI CacheDataset loader) vs a bare MONAI loop of the same model, shape and batch on
pre-stacked device tensors, measured in one run. Target on a GPU: ours >= 90% of bare.
The two are timed alternately ``--repeats`` times (shared machines are noisy); the ratio is of
the medians.

Prints one JSON object; runs on CUDA when present, else CPU.

    .venv/bin/python benchmarks/train_throughput.py [--roi 96,96,96] [--batch 4] [--volumes 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from monai.losses import DiceCELoss

from clinfed.data.ingest import Case
from clinfed.training import DEFAULT_EHR_SIZE, TrainConfig, device_for_training, make_loader, new_model, train_epochs


def synthetic_cases(n: int, roi: tuple[int, int, int], seed: int = 0) -> list[Case]:
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        label = (rng.random(roi) > 0.97).astype(np.uint8)
        image = (rng.normal(size=roi) + 2.0 * label).astype(np.float32)
        cases.append(Case(f"p-{i:032x}", image, label, (1.0, 1.0, 1.0),
                          rng.normal(size=DEFAULT_EHR_SIZE).astype(np.float32), int(i % 2)))
    return cases


def bare_loop(model, images, labels, ehr, outcomes, batch: int, epochs: int) -> None:
    device = images.device
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    seg_loss = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)
    bce = torch.nn.BCEWithLogitsLoss()
    model.train()
    for _ in range(epochs):
        for start in range(0, images.shape[0], batch):
            sl = slice(start, start + batch)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                seg, out = model(images[sl], ehr[sl])
                loss = seg_loss(seg.float(), labels[sl]) + 0.5 * bce(out.float(), outcomes[sl])
            loss.backward()
            optimizer.step()


def _timed(run, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--roi", default="96,96,96")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--volumes", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    roi = tuple(int(v) for v in args.roi.split(","))
    device = device_for_training()
    cases = synthetic_cases(args.volumes, roi)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch, roi=roi)

    torch.manual_seed(0)
    ours_model = new_model().to(device)
    loader = make_loader(cases, config, train=True)
    train_epochs(ours_model, loader, TrainConfig(epochs=1, batch_size=args.batch, roi=roi))  # warm-up

    torch.manual_seed(0)
    bare_model = new_model().to(device)
    images = torch.stack([torch.from_numpy(c.image)[None] for c in cases]).to(device)
    images = (images - images.mean(dim=(2, 3, 4), keepdim=True)) / images.std(dim=(2, 3, 4), keepdim=True)
    labels = torch.stack([torch.from_numpy(c.label.astype(np.float32))[None] for c in cases]).to(device)
    ehr = torch.stack([torch.from_numpy(c.ehr) for c in cases]).to(device)
    outcomes = torch.tensor([float(c.outcome) for c in cases], device=device)
    bare_loop(bare_model, images, labels, ehr, outcomes, args.batch, 1)  # warm-up

    volumes = args.volumes * args.epochs
    ours, bare = [], []
    for _ in range(args.repeats):
        ours.append(volumes / _timed(lambda: train_epochs(ours_model, loader, config), device))
        bare.append(volumes / _timed(
            lambda: bare_loop(bare_model, images, labels, ehr, outcomes, args.batch, args.epochs), device))

    print(json.dumps({
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "roi": roi, "batch": args.batch, "volumes": args.volumes,
        "epochs": args.epochs, "repeats": args.repeats,
        "ours_volumes_per_s": statistics.median(ours), "bare_monai_volumes_per_s": statistics.median(bare),
        "ours_over_bare": statistics.median(ours) / statistics.median(bare),
        "ours_each": ours, "bare_each": bare, "target_ours_over_bare_on_gpu": 0.9,
    }, indent=2))


if __name__ == "__main__":
    main()
