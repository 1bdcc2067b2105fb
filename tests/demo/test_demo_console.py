"""What ``clinfed demo`` shows on the console: a short, watchable run (a progress bar per arm, a
line per federated round), FLARE's logs in files under the output folder, and the full logs
back on the console with ``--verbose``."""

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
from clinfed.experiment import DemoConfig, files_only_log_config, prepare_ledger, run_federated
from clinfed.jobs.tumour_seg import TumourSegFedAvgRecipe

ROUNDS = int(ARGS[ARGS.index("--rounds") + 1])
ARMS = ["centralised", *(f"local-only {site}" for site in SITES), "federated"]
# A line of FLARE's own console log format (``nvflare/fuel/utils/log_config.json``).
FLARE_LOG_LINE = re.compile(r" - (INFO|WARNING|ERROR|DEBUG) - ")


def console_lines(run) -> list[str]:
    """Lines as a terminal shows them: a progress bar redraws its own line with carriage returns."""
    return (run.stdout + run.stderr).rstrip("\n").split("\n")


def test_demo_prints_at_most_60_lines_and_none_of_flares_log(demo_run):
    lines = console_lines(demo_run)
    assert len(lines) <= 60, "\n".join(lines)
    assert not [line for line in lines if FLARE_LOG_LINE.search(line)]


def test_demo_shows_one_progress_line_per_arm_in_a_log(demo_run):
    """stderr is a pipe here: each arm is one line when it is done. (--quick trains 1 local epoch a
    round, so every arm's budget is ROUNDS epochs; federated: ROUNDS rounds.)"""
    lines = demo_run.stderr.splitlines()
    for arm in ARMS:
        unit = "rounds" if arm == "federated" else "epochs"
        mine = [line for line in lines if line.startswith(f"{arm}: ")]
        assert len(mine) == 1, (arm, lines)
        assert re.fullmatch(rf"{re.escape(arm)}: {ROUNDS}/{ROUNDS} {unit} in \d+\.\d s", mine[0]), mine[0]


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


def test_verbose_run_shows_flares_log_on_the_console_and_a_quiet_run_does_not(tmp_path, capfd):
    """The same small job twice: with FLARE's defaults (what ``--verbose`` keeps) its log lines
    reach the console; with the files-only configuration (the default demo) only its files."""
    config = DemoConfig(sites=2, patients=10, shape=(32, 32, 16), seed=3, rounds=1, local_epochs=1)
    data = tmp_path / "data"
    # Keys that give each site validation patients with this seed (as tests/audit/conftest.py).
    for site, seed in {"site-1": "clinfed-e2e-site-1-1", "site-2": "clinfed-e2e-site-2-0"}.items():
        (data / site).mkdir(parents=True)
        (data / site / "site_secret.key").write_text(hashlib.sha256(seed.encode()).hexdigest() + "\n")
    synthesise(data, config.sites, config.patients, config.shape, config.seed)
    recipe = TumourSegFedAvgRecipe(min_clients=2, num_rounds=1, local_epochs=1, cross_site_eval=False)
    for mode in ("verbose", "quiet"):
        workspace = tmp_path / mode
        log_config = files_only_log_config(workspace) if mode == "quiet" else None
        ledger = workspace / "ledger.sqlite"
        prepare_ledger(ledger, data, SITES[:2], log=lambda message: None)
        capfd.readouterr()
        run_federated(data, workspace, config, ledger_path=ledger, recipe=recipe, flare_log_config=log_config)
        captured = capfd.readouterr()
        console = [line for line in (captured.out + captured.err).splitlines() if FLARE_LOG_LINE.search(line)]
        for participant in ("server", *SITES[:2]):
            assert FLARE_LOG_LINE.search((workspace / recipe.name / participant / "log.txt").read_text())
        if mode == "verbose":
            assert len(console) > 20, (captured.out + captured.err)[-2000:]
        else:
            assert console == [], console[:5]
