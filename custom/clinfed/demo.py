"""``clinfed demo``: the experiment (:mod:`clinfed.experiment`) on 3 synthetic non-IID sites,
watched on the console and reported (:mod:`clinfed.report`).

The console shows one progress bar per arm and one line per scored federated round; FLARE's own
logs go to files in the output folder (``--verbose``: on the console too). The output folder
receives the sites' data (``data/``), the FLARE workspace, the ledger and each simulated site's
configuration (``sites/<site>/clinfed_site.json``, for ``clinfed audit ... --site-config``),
``results.json``, the PNG plots and ``report.html``.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, TextIO

from tqdm import tqdm

from clinfed.experiment import SITES_DIR, DemoConfig, Watcher, run_experiment, synthesise_sites
from clinfed.report import REPORT_FILE, round_line, write_report
from clinfed.site_config import SITE_CONFIG_FILE

RESULTS_FILE = "results.json"


class ConsoleWatcher(Watcher):
    """Progress for a person: messages and round lines on ``out``, progress bars on ``bars``."""

    def __init__(self, total_rounds: int, out: TextIO | None = None, bars: TextIO | None = None):
        # The streams are taken now: while FLARE runs, sys.stdout is its console file.
        self.total_rounds = total_rounds
        self.out = out or sys.stdout
        self.bars = bars or sys.stderr

    def message(self, text: str) -> None:
        tqdm.write(text, file=self.out)

    @contextlib.contextmanager
    def arm(self, name: str, total: int, unit: str) -> Iterator[Callable[[int], None]]:
        """A bar that redraws its line on a terminal; elsewhere (a pipe, a log file) one line when
        the arm is done, so a log holds one line per arm."""
        if self.bars.isatty():
            with tqdm(total=total, desc=name, unit=unit, file=self.bars, leave=True, mininterval=1.0) as bar:
                yield bar.update
            return
        done, started = 0, time.perf_counter()

        def advance(n: int = 1) -> None:
            nonlocal done
            done += n

        yield advance
        print(f"{name}: {done}/{total} {unit}s in {time.perf_counter() - started:.1f} s", file=self.bars, flush=True)

    def federated_round(self, entry: dict, spend: dict | None) -> None:
        tqdm.write(round_line(entry, self.total_rounds, spend), file=self.out)


def run_demo(out_dir: Path, config: DemoConfig, watcher: Watcher | None = None, verbose: bool = False) -> dict:
    """Generate the sites (unless ``out_dir/data`` has them), run the experiment, and write
    ``results.json``, the plots and ``report.html``; returns the results."""
    watcher = watcher or Watcher()
    out_dir.mkdir(parents=True, exist_ok=True)
    data_dir = out_dir / "data"
    synthesise_sites(data_dir, config, watcher)
    results = run_experiment(data_dir, out_dir, config, watcher, flare_logs_to_files=not verbose)
    (out_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2))
    write_report(results, out_dir)
    return results


def closing_lines(out_dir: Path, results: dict, quick: bool) -> list[str]:
    """What the demo prints after its table: where everything is, and how to look at the ledger."""
    site = results["config"]["sites"][0]
    lines = [f"results: {out_dir / RESULTS_FILE}; report: {out_dir / REPORT_FILE}",
             f"audit view of {site}: clinfed audit serve --site-config {out_dir / SITES_DIR / site / SITE_CONFIG_FILE}"]
    if quick:
        lines.append("--quick is a smoke test on small data: compare arms with the default demo or benchmarks/quality.py")
    return lines
