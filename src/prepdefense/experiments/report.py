"""``OUT/report.md``, ``OUT/tables/*.csv`` and ``OUT/figures/*.png`` from the stored units
(issue 5, item 3).

The report is rebuilt from the unit files alone (``store.py``), so it can be written after a
resumed run, or after merging the ``units/`` folders of several machines
(``prepdefense reproduce --report-only``). Its sections come from the registered
experiments (``registry.py``; each experiment's module writes its own, setting the paper's
number, quoted from ``paper_numbers.py``, beside ours), placed by rank between the fixed
ones written here: the run's description, the sample images and the run's metadata. A
section whose units failed says "not available: <reason>"; a section not selected with
``--only`` says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

from . import paper_numbers as P
from . import registry
from .experiment import REPORT_RANKS, Section
from .reporting import ReportContext, bootstrap_mean_interval, md_table, merge_histories
from .store import ResultStore, atomic_write_text

__all__ = ["write_report", "build_report", "sections", "SECTION_HEADINGS", "bootstrap_mean_interval", "merge_histories"]

SECTION_HEADINGS: Tuple[str, ...] = (
    "## About this run",
    "## Table 1: randomness of the defenses",
    "## Fig. 4: BPDA and BPDA+EOT",
    "## Table 2: standard attacks on the bare model",
    "## Table 3: the same adversarial examples against our defense",
    "## Table 4: distortion limit delta sweep",
    "## Table 5: broader comparison on bounded attacks",
    "## Table 6: combinations after BPDA rounds",
    "## Section 6.4: learned BPDA",
    "## Strong adaptive attack",
    "## Diagnostics of the strong attack",
    "## Sample images",
    "## Verdict",
    "## Run metadata",
)


TITLE = "# Reproduction report: An Efficient Preprocessing-based Approach to Mitigate Advanced Adversarial Attacks"


def _banner(rep: ReportContext) -> str:
    """The shrunk-run warning (empty for the paper preset)."""
    if rep.preset_name == "paper":
        return ""
    shr = rep.preset.get("shrunk") or []
    title = "QUICK RUN" if rep.preset_name == "quick" else f"{rep.preset_name.upper()} RUN"
    lines = [f"> **{title}**: sizes shrunk from the paper's so that the whole run is short. "
             "Numbers are noisy and attacks weaker than in `--preset paper`. What was shrunk:"]
    lines += [f"> - {s}" for s in shr]
    return "\n".join(lines)


def report_about(rep: ReportContext) -> str:
    """The model, images, seed and preset, and what ACC and ASR mean here."""
    ident = rep.cfg.get("identity", {})
    sample = rep.cfg.get("sample", {})
    lines = [
        "## About this run",
        "",
        f"- Model: **{ident.get('model', '?')}**; images: `{ident.get('data', '?')}`; seed {ident.get('seed', '?')}; "
        f"preset **{rep.preset_name}** ({rep.preset.get('n_images', '?')} protocol images).",
        f"- The paper used {P.MODEL_AND_DATA}. **Our model and images differ from the paper's** "
        "(by default EfficientNet-Lite0, 224x224, on the shared 1000-image ImageNet sample, one image per class), "
        "so the numbers below are not expected to match the paper's: compare trends and orders "
        "(which defense holds, which breaks, how accuracy moves with the attack), not values.",
        "- ACC: fraction of images predicted as their true label; ASR: fraction predicted as the attacker's target "
        "(targeted attacks; DeepFool and the strong attack are untargeted). For random defenses, ACC/ASR are "
        f"expected values over {rep.preset.get('eval_draws', '?')} fresh draws of the defense unless said otherwise.",
    ]
    if sample:
        lines.append(f"- Protocol sample: {sample}")
    return "\n".join(lines)


def report_samples(rep: ReportContext) -> str:
    """The strip of sample images (``sample_strip.py``), or why it is missing."""
    text = ["## Sample images", ""]
    path = rep.figures / "samples.png"
    if path.is_file():
        text.append("Clean, defended, adversarial and defended adversarial images (first images of the sample), with the "
                    "defended model's prediction under each (the adversarial column gives the bare model's).")
        text += ["", "![sample images](figures/samples.png)"]
    else:
        why = rep.cfg.get("sample_strip_error") or "no adversarial example of our defense is cached yet"
        text.append(f"- not available: {why}")
    return "\n".join(text)


def report_metadata(rep: ReportContext) -> str:
    """Versions, device, revision, sessions and the time each experiment took."""
    md = rep.cfg.get("metadata", {})
    last = (rep.cfg.get("last_session") or {}).get("metadata", md)
    versions = last.get("versions", md.get("versions", {}))
    lines = ["## Run metadata", "",
             f"- Preset: {rep.preset_name}; seed {rep.cfg.get('identity', {}).get('seed')}; model {rep.cfg.get('identity', {}).get('model')}",
             f"- Images: `{rep.cfg.get('identity', {}).get('data')}`",
             f"- Device: {last.get('device_description', md.get('device_description', '?'))}",
             f"- Git revision: {last.get('git_revision', md.get('git_revision', '?'))}",
             f"- Started: {md.get('time', '?')}; platform {last.get('platform', md.get('platform', '?'))}",
             "- Package versions: " + ", ".join(f"{k} {v}" for k, v in versions.items())]
    sessions = rep.store.sessions()
    if sessions:
        total = sum(float(s.get("seconds", 0)) for s in sessions)
        lines.append(f"- Sessions: {len(sessions)} (wall time {total / 60:.1f} min in all; a resumed run has several)")
    header = ["Part", "units ok", "units failed", "wall time (s)", "CPU time (s)"]
    rows = []
    for exp in rep.units:
        us = rep.units[exp]
        rows.append([registry.title(exp) or exp, sum(u["status"] == "ok" for u in us), sum(u["status"] != "ok" for u in us),
                     f"{sum(float(u.get('seconds', 0)) for u in us):.1f}",
                     f"{sum(float((u.get('summary') or {}).get('cpu_seconds', 0)) for u in us):.1f}"])
    lines += ["", "Duration of each part (sum of its units' times; CPU time is summed over threads, so on a machine shared with "
              "other jobs it is the better measure of cost):", "", md_table(header, rows)]
    lines += ["", "Files: `results/<experiment>.jsonl` (one record per unit and image), `tables/*.csv`, `figures/*.png`, "
              "`units/` (one atomic file per unit of work), `run.json` (configuration)."]
    return "\n".join(lines)


def sections() -> List[Section]:
    """The fixed sections and every registered experiment's, in report order (stable by rank)."""
    fixed = [Section(REPORT_RANKS["about"], report_about), Section(REPORT_RANKS["samples"], report_samples),
             Section(REPORT_RANKS["metadata"], report_metadata)]
    return sorted(fixed + [s for e in registry.experiments() for s in e.sections], key=lambda s: s.rank)


def build_report(store: ResultStore) -> str:
    """The text of ``report.md`` (writing the tables and figures on the way)."""
    rep = ReportContext(store)
    rep.tables.mkdir(parents=True, exist_ok=True)
    rep.figures.mkdir(parents=True, exist_ok=True)
    parts = [TITLE]
    b = _banner(rep)
    if b:
        parts.append(b)
    parts += [s.write(rep) for s in sections()]
    return "\n\n".join(parts) + "\n"


def write_report(store: ResultStore) -> Path:
    """Write ``report.md``, ``tables/*.csv`` and the Fig. 4 PNGs; returns the report's path."""
    text = build_report(store)
    path = store.root / "report.md"
    atomic_write_text(path, text)
    return path
