"""What ``clinfed demo`` shows on the console: a short, watchable run (a progress bar per arm, a
line per federated round with the privacy spent), FLARE's logs in files under the output
folder, and the full logs back on the console with ``--verbose``."""

from __future__ import annotations

import hashlib
import io
import os
import pty
import re
import select
from pathlib import Path

from demo_run import ARGS, SITES
from clinfed.data.synth import synthesise
from clinfed.demo import ConsoleWatcher
from clinfed.experiment import DemoConfig, federated_arm, ingest_cohorts
from clinfed.report import round_line

ROUNDS = int(ARGS[ARGS.index("--rounds") + 1])
EPOCHS = ROUNDS * DemoConfig.quick().local_epochs  # every arm's budget
ARMS = ["centralised", *(f"local-only {site}" for site in SITES), "federated"]
# A line of FLARE's own console log format (``nvflare/fuel/utils/log_config.json``).
FLARE_LOG_LINE = re.compile(r" - (INFO|WARNING|ERROR|DEBUG) - ")


def console_lines(run) -> list[str]:
    """Lines as a terminal shows them: a progress bar redraws its own line with carriage returns."""
    return (run.stdout + run.stderr).rstrip("\n").split("\n")


def test_make_demo_prints_at_most_60_lines_and_none_of_flares_log(demo_run):
    lines = console_lines(demo_run)
    assert len(lines) <= 60, "\n".join(lines)
    assert not [line for line in lines if FLARE_LOG_LINE.search(line)]


def test_demo_shows_one_progress_line_per_arm_in_a_log(demo_run):
    """stderr is a pipe here: each arm is one line when it is done (the federated arm counts rounds,
    the others epochs: the same budget)."""
    lines = demo_run.stderr.splitlines()
    for arm in ARMS:
        unit, total = ("rounds", ROUNDS) if arm == "federated" else ("epochs", EPOCHS)
        mine = [line for line in lines if line.startswith(f"{arm}: ")]
        assert len(mine) == 1, (arm, lines)
        assert re.fullmatch(rf"{re.escape(arm)}: {total}/{total} {unit} in \d+\.\d s", mine[0]), mine[0]


def test_demo_table_shows_test_set_scores_with_intervals_differences_and_outcome_ablations(demo_run):
    results, shown = demo_run.results, demo_run.stdout
    for label, scores in [("centralised", results["central"]), ("federated", results["federated"]),
                          *((f"local-only {s}", results["local"][s]) for s in SITES)]:
        dice = scores["dice"]
        assert re.search(rf"^{re.escape(label)} +{dice['mean']:.3f} \[{dice['ci95'][0]:.3f}, {dice['ci95'][1]:.3f}\]",
                         shown, re.M), label
    for arm, by_site in results["site_arm"]["arms"].items():
        assert re.search(rf"^{re.escape(arm)} +" + " +".join(f"{by_site[s]['dice']['mean']:.3f}" for s in SITES) + "$",
                         shown, re.M), arm
    difference = results["federated_minus_local"]["site-2"]["union"]
    assert f"site-2 {difference['mean']:+.3f} [{difference['ci95'][0]:.3f}, {difference['ci95'][1]:.3f}]" in shown
    federated = results["federated"]
    assert (f"federated outcome AUC: fused {federated['auc']['mean']:.2f}" in shown
            and f"image zeroed {federated['auc_image_zeroed']['mean']:.2f}" in shown)


def test_on_a_terminal_an_arm_is_one_bar_redrawn_in_place():
    master, follower = pty.openpty()
    shown = b""
    with os.fdopen(follower, "w", encoding="utf-8") as terminal:
        watcher = ConsoleWatcher(total_rounds=3, out=io.StringIO(), bars=terminal)
        with watcher.arm("centralised", 3, "epoch") as advance:
            for _ in range(3):
                advance(1)
        terminal.flush()
        while select.select([master], [], [], 0.5)[0]:
            shown += os.read(master, 65536)
    os.close(master)
    text = shown.decode("utf-8")
    assert text.count("\n") == 1 and "\r" in text, repr(text)
    assert text.rstrip().split("\r")[-1].startswith("centralised: 100%") and "3/3" in text, repr(text)


def test_demo_prints_one_line_per_federated_round_matching_results(demo_run):
    per_round = demo_run.results["federated"]["per_round"]
    lines = [line for line in demo_run.stdout.splitlines() if line.startswith("round ")]
    assert len(lines) == ROUNDS == len(per_round)
    for line, entry in zip(lines, per_round):
        # Non-private run: no epsilon to show.
        assert line == f"round {entry['round']}/{ROUNDS}: Dice {entry['dice']:.3f}, {entry['seconds']:.1f} s", line


def test_flare_logs_go_to_files_under_the_output_folder_and_their_path_is_printed(demo_run):
    printed = re.search(r"^FLARE logs: (\S+)/<server\|site-N>/log\.txt$", demo_run.stdout, re.M)
    assert printed, demo_run.stdout
    job_dir = Path(printed.group(1))
    assert job_dir.is_relative_to(demo_run.out)
    for participant in ["server", *SITES]:
        log = (job_dir / participant / "log.txt").read_text()
        assert FLARE_LOG_LINE.search(log), participant


def test_demo_closes_with_where_the_results_report_and_audit_view_are(demo_run):
    tail = demo_run.stdout.strip().splitlines()[-3:]
    assert tail[0] == f"results: {demo_run.out / 'results.json'}; report: {demo_run.out / 'report.html'}"
    assert tail[1] == f"audit view of site-1: clinfed audit serve --site-config {demo_run.site_config('site-1')}"
    assert "--quick is a smoke test" in tail[2]
    assert demo_run.site_config("site-1").is_file()


def test_verbose_private_run_shows_flares_log_and_each_rounds_spend_per_unit(tmp_path, capfd):
    """A small DP run of the federated arm with FLARE's logs on the console (what ``--verbose`` does):
    FLARE's log lines reach the console, and each round's line shows every site's patient-level
    epsilon as the ledger recorded it, the figures results.json keeps (site-level: none, never merged)."""
    config = DemoConfig(sites=2, patients=10, shape=(32, 32, 16), seed=3, rounds=2, local_epochs=1, privacy="dp")
    data = tmp_path / "data"
    # Keys that give each site validation patients with this seed (as tests/audit/conftest.py).
    for site, seed in {"site-1": "clinfed-e2e-site-1-1", "site-2": "clinfed-e2e-site-2-0"}.items():
        (data / site).mkdir(parents=True)
        (data / site / "site_secret.key").write_text(hashlib.sha256(seed.encode()).hexdigest() + "\n")
    synthesise(data, config.sites, config.patients, config.shape, config.seed)
    out, bars = io.StringIO(), io.StringIO()
    watcher = ConsoleWatcher(config.rounds, out=out, bars=bars)
    evaluation = ingest_cohorts(data, config, watcher).evaluation
    federated, _, privacy, _ = federated_arm(data, tmp_path, config, evaluation, watcher, flare_logs_to_files=False)
    captured = capfd.readouterr()
    assert len([line for line in (captured.out + captured.err).splitlines() if FLARE_LOG_LINE.search(line)]) > 20
    assert "FLARE logs:" not in out.getvalue()

    spend = privacy["per_round"]
    lines = [line for line in out.getvalue().splitlines() if line.startswith("round ")]
    assert len(lines) == len(spend) == config.rounds
    previous = {site: 0.0 for site in SITES[:2]}
    for line, entry, after in zip(lines, federated["per_round"], spend):
        assert line == round_line(entry, config.rounds, after)
        assert after["site_epsilon"] == {site: None for site in SITES[:2]} and after["site_delta"] is None
        for site, epsilon in after["patient_epsilon"].items():
            assert previous[site] < epsilon <= config.dp_target_epsilon
            assert f"{site} {epsilon:.2f}" in line
            previous[site] = epsilon
        assert f"eps patient-level (delta {after['patient_delta']:.2g}):" in line and "site-level" not in line
    assert privacy["patient_level"]["epsilon"] == spend[-1]["patient_epsilon"]
