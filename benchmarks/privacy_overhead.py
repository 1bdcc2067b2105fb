"""What privacy costs, measured in one process: prints one JSON object.

- ``dp_sgd``: one optimiser step of FusionSegNet (Dice+CE and outcome loss, as in training) with
  Opacus per-sample gradients in several modes, against the same step without DP, same run.
- ``masking``: a site's quantise + pairwise masks (2 peers for 3 sites, 9 for 10) and the server's
  per-site sum and final read-back, at the product model's size and at 4.7M parameters.
- ``update_dp``: the update-level DP filter (clip, noise, budget file) at both sizes.
- ``flare_rounds`` (with ``--flare``; minutes): seconds per round in the FLARE simulator, plain
  FedAvg vs update DP vs masking vs both, at 3 and 10 sites, 4.7M parameters, no training (sites
  return a fixed-size random update), so the difference is the privacy machinery.

Usage: python benchmarks/privacy_overhead.py [--steps 5] [--threads 1] [--roi 32 32 16] [--batch 4] [--quick]
       [--flare [--flare-sites 3 10] [--flare-rounds 4]] [--skip-dp-sgd]
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

FLARE_ROUND_FLOOR_S = {"3_sites": 2.9, "10_sites": 3.7}  # REFERENCE.md, plain FedAvg, 4.7M params, 2 cores
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


# -- masking and update DP ------------------------------------------------------------------

def fusion_shapes() -> dict[str, tuple]:
    from clinfed.models.fusion_seg import FusionSegNet

    return {k: tuple(v.shape) for k, v in FusionSegNet().state_dict().items()}


def update_of(size_name: str, rng) -> dict[str, np.ndarray]:
    if SIZES[size_name] is None:
        return {k: rng.normal(0, 1e-3, s).astype(np.float32) for k, s in fusion_shapes().items()}
    n = SIZES[size_name]
    half = n // 2
    return {"a": rng.normal(0, 1e-3, half).astype(np.float32), "b": rng.normal(0, 1e-3, n - half).astype(np.float32)}


def masking_section(repeat: int) -> dict:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from nvflare.app_common.abstract.fl_model import FLModel

    from clinfed.aggregators.masked_sum import MaskedSumAggregator
    from clinfed.privacy.masking import MASKED_META_KEY, MaskContext, expand_mask, mask_update, public_key_bytes

    rng = np.random.default_rng(0)
    out = {}
    for size_name in SIZES:
        update = update_of(size_name, rng)
        d = sum(v.size for v in update.values())
        entry = {"parameters": d, "upload_bytes_plain_float32": 4 * d, "upload_bytes_masked_uint32": 4 * d}
        for n_sites in (3, 10):
            sites = [f"site-{i}" for i in range(1, n_sites + 1)]
            keys = {s: X25519PrivateKey.generate() for s in sites}
            public = {s: public_key_bytes(k) for s, k in keys.items()}
            ctx = MaskContext(job_id="bench", round=0, attempt=0, participants=tuple(sites),
                              total_weight=30.0 * n_sites, clip_range=1.0)
            site_s = timed(lambda: mask_update(update, weight=30.0, site=sites[0], private_key=keys[sites[0]],
                                               public_keys=public, context=ctx), repeat)
            expand_s = timed(lambda: [expand_mask(bytes(32), d) for _ in range(n_sites - 1)], repeat)
            masked = mask_update(update, weight=30.0, site=sites[0], private_key=keys[sites[0]],
                                 public_keys=public, context=ctx)
            model = FLModel(params=masked.data, meta={"client_name": sites[0], "n_samples": 30.0,
                                                      MASKED_META_KEY: masked.meta})
            aggregator = MaskedSumAggregator()
            aggregator.expect(ctx)

            def server_round():
                aggregator.expect(ctx)
                for site in sites:  # same payload under each name: the cost, not the result, is measured
                    model.meta["client_name"] = site
                    model.meta[MASKED_META_KEY] = dict(masked.meta)
                    aggregator.accept_model(model)
                aggregator.aggregate_model()

            server_s = timed(server_round, max(1, repeat // 2))
            floor = FLARE_ROUND_FLOOR_S[f"{3 if n_sites == 3 else 10}_sites"]
            entry[f"{n_sites}_sites"] = {
                "site_quantise_and_mask_s": site_s, "of_which_mask_expansions_s": expand_s,
                "server_sum_and_read_back_s": server_s,
                "share_of_flare_round_floor": (site_s + server_s) / floor}
        out[size_name] = entry
    out["flare_round_floor_s"] = FLARE_ROUND_FLOOR_S
    return out


def update_dp_section(repeat: int) -> dict:
    from nvflare.apis.dxo import DXO, DataKind

    from clinfed.filters.update_dp import UpdateDPFilter

    sys.path.insert(0, "tests/privacy")
    from privacy_helpers import make_fl_ctx

    rng = np.random.default_rng(1)
    out = {}
    with tempfile.TemporaryDirectory() as folder:
        dp = UpdateDPFilter(noise_multiplier=1.0, clip_norm=1.0, target_epsilon=1e9, delta=1e-5, state_dir=folder)
        for size_name in SIZES:
            update = update_of(size_name, rng)
            shareable = DXO(DataKind.WEIGHT_DIFF, data=update, meta={"n_samples": 30}).to_shareable()
            seconds = timed(lambda: dp.process(shareable, make_fl_ctx()), repeat)
            out[size_name] = {"parameters": sum(v.size for v in update.values()), "filter_s": seconds,
                              "share_of_flare_round_floor_3_sites": seconds / FLARE_ROUND_FLOOR_S["3_sites"]}
    return out


def _round_times(server_log: str) -> list[float]:
    """Seconds between consecutive 'Round k started.' records (and the last to 'Finished FedAvg.').
    FLARE centres these banners on lines of their own: the record's time is on the line above."""
    from datetime import datetime

    stamps, last = [], None
    for line in server_log.splitlines():
        if line[:4].isdigit() and line[4:5] == "-":
            last = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
        if last is not None and (("Round " in line and "started." in line) or "Finished FedAvg." in line):
            stamps.append(last)
    return [(b - a).total_seconds() for a, b in zip(stamps, stamps[1:])]


@contextlib.contextmanager
def _stdout_to_stderr():
    """The simulator and its processes print to fd 1; this script's stdout is one JSON object."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def flare_rounds_section(site_counts: list[int], rounds: int) -> dict:
    from monai.networks.nets import SegResNet
    from nvflare.app_common.workflows.fedavg import FedAvg
    from nvflare.app_opt.pt.job_config.base_fed_job import BaseFedJob
    from nvflare.job_config.defs import FilterType

    from clinfed.aggregators.fedavg import WeightedFedAvg
    from clinfed.aggregators.masked_sum import MaskedFedAvg
    from clinfed.jobs.tumour_seg import TASK_CHECK_PERIOD
    from clinfed.filters.secure_mask import SecureMaskFilter
    from clinfed.filters.update_dp import UpdateDPFilter
    from clinfed.privacy.masking import generate_private_key_file, write_key_directory

    sys.path.insert(0, "tests/privacy")
    from flare_parts import ScriptedUpdateExecutor

    out = {"model": "MONAI SegResNet init_filters=16", "rounds": rounds,
           "note": "no training: each site returns a random update of the model's size; seconds per round, "
                   "median over rounds after the first"}
    for n_sites in site_counts:
        sites = [f"site-{i}" for i in range(1, n_sites + 1)]
        entry = {}
        with tempfile.TemporaryDirectory() as folder:
            keys = {s: f"{folder}/{s}.pem" for s in sites}
            write_key_directory(f"{folder}/site_keys.json", {s: generate_private_key_file(k) for s, k in keys.items()})
            for config in ("plain", "dp", "mask", "dp+mask"):
                model = SegResNet(spatial_dims=3, in_channels=1, out_channels=2, init_filters=16)
                job = BaseFedJob(initial_model=model,
                                 name=f"bench_{config.replace('+', '_')}_{n_sites}", min_clients=n_sites)
                persistor = job.comp_ids["persistor_id"]
                if "mask" in config:
                    job.to_server(MaskedFedAvg(num_clients=n_sites, num_rounds=rounds, persistor_id=persistor,
                                               clip_range=0.5, weight_bound=30.0 * n_sites,
                                               task_check_period=TASK_CHECK_PERIOD))
                else:
                    job.to_server(FedAvg(num_clients=n_sites, num_rounds=rounds, persistor_id=persistor,
                                         aggregator=WeightedFedAvg(), task_check_period=TASK_CHECK_PERIOD))
                for site in sites:
                    job.to(ScriptedUpdateExecutor(n_samples=30), site, tasks=["train"])
                    if "dp" in config:
                        job.to(UpdateDPFilter(noise_multiplier=1.0, clip_norm=0.02, target_epsilon=1e6, delta=1e-5,
                                              state_dir=f"{folder}/dp_{config}"),
                               site, filter_type=FilterType.TASK_RESULT, tasks=["train"])
                    if "mask" in config:
                        for direction in (FilterType.TASK_DATA, FilterType.TASK_RESULT):
                            job.to(SecureMaskFilter(private_key_file=keys[site],
                                                    key_directory_file=f"{folder}/site_keys.json",
                                                    state_dir=f"{folder}/mask_{config}"),
                                   site, filter_type=direction, tasks=["train"])
                workspace = f"{folder}/ws_{config.replace('+', '_')}"
                started = time.perf_counter()
                with _stdout_to_stderr():
                    job.simulator_run(workspace, threads=n_sites)
                wall = time.perf_counter() - started
                log = "\n".join(open(p, errors="replace").read()
                                for p in glob.glob(f"{workspace}/server/**/log.txt", recursive=True))
                per_round = _round_times(log)[1:]
                entry[config] = {"round_s": statistics.median(per_round) if per_round else None,
                                 "rounds_s": per_round, "job_wall_s": wall}
        plain = entry["plain"]["round_s"]
        for config in ("dp", "mask", "dp+mask"):
            if plain and entry[config]["round_s"]:
                entry[config]["ratio_to_plain"] = entry[config]["round_s"] / plain
        out[f"{n_sites}_sites"] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed DP-SGD steps per mode (median)")
    parser.add_argument("--roi", type=int, nargs=3, default=[32, 32, 16])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--modes", nargs="+", default=["hooks", "functorch", "ew", "hooks_wrapped"])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--flare", action="store_true", help="also time FLARE simulator rounds (minutes)")
    parser.add_argument("--flare-sites", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--flare-rounds", type=int, default=4)
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
              "masking": masking_section(repeat), "update_dp": update_dp_section(repeat)}
    if args.flare:
        report["flare_rounds"] = flare_rounds_section(args.flare_sites, args.flare_rounds)
    report["wall_s"] = time.perf_counter() - started
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
