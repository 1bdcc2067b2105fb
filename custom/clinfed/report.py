"""The demo's report of ``results.json``: the console table, the PNG plots and ``report.html``.

``report.html`` is one self-contained page (figures inlined as PNG data URIs, styles inline, no
script, nothing fetched). Every figure it shows from ``results.json`` carries the JSON Pointer
(RFC 6901) of its source in ``data-pointer`` and the exact value in ``data-value``, so a reader
(or a test) can check any number against the file.

A score in ``results.json`` is either a number or ``{"mean": m, "ci95": [low, high], "n": n}``
(:mod:`clinfed.confidence`); the page shows the interval where there is one. The ``site_arm``
section (``{"test_sets": [site, ...], "arms": {arm: {site: {"dice": score}}}}``: each arm
scored on each site's test set) is shown as a site x arm table.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

REPORT_FILE = "report.html"
PLOT_FILES = {"dice_per_round": "dice_per_round.png", "final_scores": "final_scores.png"}
UNIT_LABELS = {"patient": "patient-level (DP-SGD: protects one patient's records)",
               "site": "site-level (update DP inside the mask: protects a site's whole contribution)"}


def _value(score):
    """The point figure of a score (a number, or the mean of ``{"mean", "ci95"}``)."""
    return score.get("mean") if isinstance(score, dict) else score


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _score(score, digits: int = 3, signed: bool = False) -> str:
    """A score as the console shows it: ``0.812 [0.790, 0.830]``."""
    if not isinstance(score, dict):
        return _fmt(score, digits)
    mean = "n/a" if score.get("mean") is None else f"{score['mean']:{'+' if signed else ''}.{digits}f}"
    interval = score.get("ci95")
    return mean if not interval else f"{mean} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


# --------------------------------------------------------------------------- console


def arm_rows(results: dict) -> list[tuple[str, str, dict]]:
    """(label, JSON Pointer, scores) of each arm, in the order they are shown."""
    privacy_mode = (results.get("privacy") or {}).get("mode", "none")
    rows = [("centralised", "/central", results["central"]),
            ("federated" + ("" if privacy_mode == "none" else f" ({privacy_mode})"), "/federated",
             results["federated"])]
    rows += [(f"local-only {site}", f"/local/{_escape_pointer(site)}", scores)
             for site, scores in results["local"].items()]
    return rows


def _spend_text(spend: dict | None) -> str:
    """Each unit's epsilon per site (never summed across units), for units that were spent."""
    parts = []
    for unit in ("patient", "site"):
        epsilon = (spend or {}).get(f"{unit}_epsilon") or {}
        if any(v is not None for v in epsilon.values()):
            delta = (spend or {}).get(f"{unit}_delta")
            parts.append(f"eps {unit}-level{f' (delta {delta:.2g})' if delta else ''}: "
                         + " ".join(f"{site} {_fmt(eps, 2)}" for site, eps in epsilon.items()))
    return "; ".join(parts)


def round_line(entry: dict, total_rounds: int, spend: dict | None = None) -> str:
    """The console's line for a scored federated round."""
    seconds = f", {entry['seconds']:.1f} s" if entry.get("seconds") is not None else ""
    line = f"round {entry['round']}/{total_rounds}: Dice {_fmt(entry['dice'])}{seconds}"
    spent = _spend_text(spend)
    return f"{line}, {spent}" if spent else line


def results_table(results: dict) -> str:
    """The console's summary: each arm on all test sets, each arm per test set, federated minus
    each local-only model, the outcome head's inputs, rounds, privacy and the ledger."""
    lines = [f"{'arm (all test sets)':<22}{'Dice [95% CI]':<26}outcome AUC [95% CI]", "-" * 70]
    for label, _, scores in arm_rows(results):
        lines.append(f"{label:<22}{_score(scores['dice']):<26}{_score(scores['auc'], 2)}")
    site_arm = results.get("site_arm")
    if site_arm:
        lines.append("")
        lines.append(f"{'Dice per test set':<22}" + "".join(f"{site:>10}" for site in site_arm["test_sets"]))
        for arm, by_site in site_arm["arms"].items():
            lines.append(f"{arm:<22}" + "".join(f"{_fmt(_value(by_site[s]['dice'])):>10}" for s in site_arm["test_sets"]))
    differences = results.get("federated_minus_local")
    if differences:
        lines.append("federated - local-only, paired Dice on all test sets: " + "; ".join(
            f"{site} {_score(d['union'], signed=True)}" for site, d in differences.items()))
    federated = results["federated"]
    if "auc_ehr_zeroed" in federated:
        lines.append(f"federated outcome AUC: fused {_score(federated['auc'], 2)}, EHR zeroed "
                     f"{_score(federated['auc_ehr_zeroed'], 2)}, image zeroed {_score(federated['auc_image_zeroed'], 2)}")
    lines.append("federated validation Dice per round: " + ", ".join(
        f"r{r['round']}={_fmt(r['dice'])}" for r in federated["per_round"]))
    privacy = results.get("privacy") or {}
    for unit, key in (("patient", "patient_level"), ("site", "site_level")):
        spend = privacy.get(key) or {}
        if any(v is not None for v in spend.get("epsilon", {}).values()):
            lines.append(f"{unit}-level epsilon spent at delta {spend['delta']:.2g}: "
                         + ", ".join(f"{site} {_fmt(eps)}" for site, eps in spend["epsilon"].items()))
    if privacy.get("masked"):
        lines.append("every round was securely aggregated: the server only ever opened the sum of the sites' updates")
    ledger = results.get("ledger")
    if ledger:
        lines.append(f"ledger ({ledger['backend']}, {ledger['path']}): job {ledger['job_id']}, {ledger['records']} "
                     f"records, {ledger['consents']} consents, final model "
                     f"{'VERIFIED' if ledger['verified'] else 'NOT VERIFIED'}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def _figures(results: dict) -> dict[str, bytes]:
    """The report's figures as PNG bytes, by name (see ``PLOT_FILES``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    def png(fig) -> bytes:
        buffer = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buffer, format="png", dpi=120)
        plt.close(fig)
        return buffer.getvalue()

    figures = {}
    per_round = results["federated"]["per_round"]
    fig, ax = plt.subplots(figsize=(6, 4))
    rounds = [r["round"] for r in per_round]
    for site in sorted({s for r in per_round for s in r["site_dice"]}):
        ax.plot(rounds, [r["site_dice"].get(site) for r in per_round], marker="o", label=site)
    ax.plot(rounds, [r["dice"] for r in per_round], marker="s", color="black", label="all sites")
    ax.set(xlabel="federated round", ylabel="validation Dice (global model)",
           title="Federated Dice per round (validation splits)",
           ylim=(0, 1), xticks=rounds)
    ax.legend()
    figures["dice_per_round"] = png(fig)

    rows = arm_rows(results)
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(rows))
    for offset, metric, label in ((-0.2, "dice", "Dice"), (0.2, "auc", "outcome AUC")):
        values = [_value(scores[metric]) or 0 for _, _, scores in rows]
        intervals = [(scores[metric] or {}).get("ci95") if isinstance(scores[metric], dict) else None
                     for _, _, scores in rows]
        errors = np.array([[v - i[0], i[1] - v] if i else [0, 0] for v, i in zip(values, intervals)]).T
        ax.bar(x + offset, values, width=0.4, label=label, yerr=errors, capsize=3)
    ax.set_xticks(x, [label for label, _, _ in rows], rotation=20)
    ax.set(ylim=(0, 1), title="Final models on all sites' test sets (95% CI)")
    ax.legend()
    figures["final_scores"] = png(fig)
    return figures


def plot_results(results: dict, out_dir: Path) -> dict[str, bytes]:
    """Write the PNG plots into ``out_dir``; returns their bytes for the HTML report."""
    figures = _figures(results)
    for name, data in figures.items():
        (Path(out_dir) / PLOT_FILES[name]).write_bytes(data)
    return figures


# --------------------------------------------------------------------------- HTML


def _escape_pointer(token: str) -> str:
    return str(token).replace("~", "~0").replace("/", "~1")


def pointer(*tokens) -> str:
    """The JSON Pointer (RFC 6901) of ``tokens`` in ``results.json``."""
    return "".join("/" + _escape_pointer(t) for t in tokens)


def resolve_pointer(document, json_pointer: str):
    """The value at ``json_pointer`` in ``document`` (RFC 6901)."""
    value = document
    for token in json_pointer.split("/")[1:]:
        token = token.replace("~1", "/").replace("~0", "~")
        value = value[int(token)] if isinstance(value, list) else value[token]
    return value


def _template_environment():
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("clinfed", "templates"),
                             autoescape=jinja2.select_autoescape(["html"]), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = _fmt
    env.filters["json"] = lambda value: json.dumps(value)
    env.globals.update(pointer=pointer, value_of=_value, unit_labels=UNIT_LABELS)
    return env


def render_report(results: dict, figures: dict[str, bytes]) -> str:
    """``report.html`` for ``results`` (the content of ``results.json``) and its figures."""
    inline = {name: "data:image/png;base64," + base64.b64encode(data).decode("ascii")
              for name, data in figures.items()}
    privacy = results.get("privacy") or {}
    spent_units = [unit for unit in ("patient", "site")
                   if any(v is not None for v in (privacy.get(f"{unit}_level") or {}).get("epsilon", {}).values())]
    return _template_environment().get_template("report.html").render(
        results=results, figures=inline, arms=arm_rows(results), spent_units=spent_units,
        sites=list(results["ingestion"]))


def write_report(results: dict, out_dir: Path) -> Path:
    """Write the PNG plots and ``report.html`` into ``out_dir``; returns the report's path."""
    figures = plot_results(results, out_dir)
    path = Path(out_dir) / REPORT_FILE
    path.write_text(render_report(results, figures), encoding="utf-8")
    return path
