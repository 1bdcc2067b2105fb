"""What privacy costs, measured in one process: prints one JSON object.

- ``dp_sgd``: one optimiser step of FusionSegNet (Dice+CE and outcome loss, as in training) with
  Opacus per-sample gradients in several modes, against the same step without DP, same run.
- ``noise_sources``: the cost of the cryptographically seeded noise generators (DP-SGD's Gaussian
  and update DP's Skellam noise) against the libraries' default generators, same run.

Secure aggregation's cost (rounds in FLARE, uploads) is ``benchmarks/secagg.py``.

Usage: python benchmarks/privacy_overhead.py [--steps 5] [--threads 1] [--roi 32 32 16] [--batch 4] [--quick]
       [--skip-dp-sgd]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings

import numpy as np
import torch

SIZES = {"fusion_seg": None, "segresnet_4.7M": 4_700_914}


def timed(fn, repeat: int) -> float:
    """Median wall time of ``repeat`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# -- DP-SGD ---------------------------------------------------------------------------------

def dp_sgd_section(steps: int, roi: tuple[int, int, int], batch: int, modes: list[str]) -> dict:
    from monai.losses import DiceCELoss
    from opacus import PrivacyEngine

    from clinfed.models.fusion_seg import FusionSegNet

    torch.manual_seed(0)
    image = torch.randn(batch, 1, *roi)
    label = (torch.rand(batch, 1, *roi) > 0.9).float()
    ehr, outcome = torch.randn(batch, 8), (torch.rand(batch) > 0.5).float()
    dataset = torch.utils.data.TensorDataset(image, label, ehr, outcome)
    seg_loss, outcome_loss = DiceCELoss(to_onehot_y=True, softmax=True), torch.nn.BCEWithLogitsLoss()

    def step_fn(model, optimizer):
        def step():
            optimizer.zero_grad(set_to_none=True)
            seg_logits, outcome_logit = model(image, ehr)
            loss = seg_loss(seg_logits, label) + 0.5 * outcome_loss(outcome_logit, outcome)
            loss.backward()
            optimizer.step()
        return step

    torch.manual_seed(1)
    reference = FusionSegNet().state_dict()
    model = FusionSegNet()
    model.load_state_dict(reference)
    steps_to_time = {"non_private": step_fn(model, torch.optim.Adam(model.parameters(), lr=1e-3))}
    errors = {}
    for mode in modes:
        grad_mode, wrap = {"hooks": ("hooks", False), "hooks_wrapped": ("hooks", True),
                           "functorch": ("functorch", False), "ew": ("ew", True)}[mode]
        model = FusionSegNet()
        model.load_state_dict(reference)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                hooked, dp_optimizer, _ = PrivacyEngine(accountant="rdp").make_private(
                    module=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                    data_loader=torch.utils.data.DataLoader(dataset, batch_size=batch), noise_multiplier=1.0,
                    max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode=grad_mode, wrap_model=wrap)
            steps_to_time[mode] = step_fn(hooked if wrap else model, dp_optimizer)
            steps_to_time[mode]()  # warm-up
        except Exception as err:  # a mode Opacus cannot run on this model is a result too
            errors[mode] = f"{type(err).__name__}: {str(err)[:200]}"
            steps_to_time.pop(mode, None)
    steps_to_time["non_private"]()
    # Interleaved, so that load from other processes on a shared machine hits every mode alike.
    times = {name: [] for name in steps_to_time}
    for _ in range(steps):
        for name, step in steps_to_time.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    baseline = statistics.median(times["non_private"])
    result = {"model": "FusionSegNet", "parameters": sum(p.numel() for p in model.parameters()),
              "roi": list(roi), "batch": batch, "device": "cpu", "threads": torch.get_num_threads(),
              "timed_steps": steps, "non_private_step_s": baseline, "modes": {}}
    for mode in modes:
        if mode in errors:
            result["modes"][mode] = {"error": errors[mode]}
        else:
            seconds = statistics.median(times[mode])
            result["modes"][mode] = {"step_s": seconds, "ratio_to_non_private": seconds / baseline}
    return result


# -- noise sources -----------------------------------------------------------------------------

def noise_section(repeat: int, roi: tuple[int, int, int], batch: int) -> dict:
    """What a cryptographically seeded noise source costs against the libraries' defaults:
    DP-SGD's Gaussian noise (a torch generator seeded from ``secrets``, as ``SiteDPSGD`` uses,
    against torch's default generator) and update DP's Skellam noise for 4.7M parameters
    (``clinfed.privacy.secagg.noise_rng`` against NumPy's default generator)."""
    import secrets

    from clinfed.models.fusion_seg import FusionSegNet
    from clinfed.privacy.secagg import noise_rng

    parameters = [p for p in FusionSegNet().parameters()]
    seeded = torch.Generator()
    seeded.manual_seed(secrets.randbits(63))

    def gaussian(generator):
        return lambda: [torch.normal(0.0, 1.0, p.shape, generator=generator) for p in parameters]

    size, variance = SIZES["segresnet_4.7M"], 1e12

    def skellam(rng):
        return lambda: rng.poisson(variance / 2, size) - rng.poisson(variance / 2, size)

    default_torch = timed(gaussian(None), repeat)
    seeded_torch = timed(gaussian(seeded), repeat)
    default_numpy = timed(skellam(np.random.default_rng()), repeat)
    seeded_numpy = timed(skellam(noise_rng()), repeat)
    return {"dp_sgd_gaussian_per_step": {"parameters": sum(p.numel() for p in parameters),
                                         "default_generator_s": default_torch, "secrets_seeded_s": seeded_torch,
                                         "ratio": seeded_torch / default_torch},
            "update_dp_skellam_per_round": {"parameters": size, "numpy_default_s": default_numpy,
                                            "secrets_seeded_pcg64_s": seeded_numpy,
                                            "ratio": seeded_numpy / default_numpy}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed DP-SGD steps per mode (median)")
    parser.add_argument("--roi", type=int, nargs=3, default=[32, 32, 16])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--modes", nargs="+", default=["hooks", "functorch", "ew", "hooks_wrapped"])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--skip-dp-sgd", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); "
                        "1 gives steadier DP-SGD ratios on a shared machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeat = 2 if args.quick else 5
    started = time.perf_counter()
    report = {"benchmark": "privacy_overhead", "host": platform.node(), "python": platform.python_version(),
              "torch": torch.__version__, "cpu_count": os.cpu_count(),
              "dp_sgd": None if args.skip_dp_sgd else dp_sgd_section(args.steps, tuple(args.roi), args.batch,
                                                                      args.modes),
              "noise_sources": noise_section(repeat, tuple(args.roi), args.batch)}
    report["wall_s"] = time.perf_counter() - started
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
