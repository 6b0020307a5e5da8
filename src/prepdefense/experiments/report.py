"""``OUT/report.md``, ``OUT/tables/*.csv`` and ``OUT/figures/fig4*.png`` from the stored units
(issue 5, item 3).

The report is rebuilt from the unit files alone (``store.py``), so it can be written after a
resumed run, or after merging the ``units/`` folders of several machines
(``prepdefense reproduce --report-only``). Every table sets the paper's number (quoted from
``paper_numbers.py``) beside ours; a section whose units failed says
"not available: <reason>"; a section not selected with ``--only`` says so.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from ..attacks.adaptive import wilson_interval
from . import paper_numbers as P
from .store import ResultStore, atomic_write_text
from .units import EXPERIMENT_TITLES, OUR_DEFENSE

__all__ = ["write_report", "SECTION_HEADINGS", "wilson_interval", "bootstrap_mean_interval", "merge_histories"]

#: Every heading the report always carries (tests check them).
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

BROKEN_BELOW = 0.10  # expected robust accuracy at or under which we call a defense broken


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------
def bootstrap_mean_interval(values: Sequence[float], *, resamples: int = 2000, seed: int = 0) -> Tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of ``values`` (seeded, so reports repeat)."""
    import numpy as np

    v = np.asarray(list(values), dtype=float)
    if v.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(resamples, v.size))].mean(axis=1)
    return (float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975)))


def _mean(values: Iterable[Any]) -> Optional[float]:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def merge_histories(histories: Sequence[Sequence[Dict[str, Any]]], initials: Sequence[Optional[Dict[str, Any]]] = ()) -> List[Dict[str, float]]:
    """Per-round ACC/ASR over all shards; a shard that stopped early keeps its last state.

    Returns records with ``round``, ``accuracy``, ``asr``, ``n``; round 0 is the state before
    the attack when every shard recorded it.
    """
    hs = [list(h) for h in histories if h]
    if not hs:
        return []

    def counts(rec):
        n = int(rec.get("n", 0) or 0)
        c = rec.get("n_correct")
        s = rec.get("n_success")
        c = float(c) if c is not None else float(rec.get("accuracy", 0.0)) * n
        s = float(s) if s is not None else float(rec.get("asr", 0.0)) * n
        return n, c, s

    out = []
    inits = [i for i in initials if i]
    if inits and len(inits) == len(hs):
        tot = [counts(i) for i in inits]
        n = sum(t[0] for t in tot)
        if n:
            out.append({"round": 0, "accuracy": sum(t[1] for t in tot) / n, "asr": sum(t[2] for t in tot) / n, "n": n})
    length = max(len(h) for h in hs)
    for i in range(length):
        tot = [counts(h[min(i, len(h) - 1)]) for h in hs]
        n = sum(t[0] for t in tot)
        if not n:
            continue
        out.append({"round": i + 1, "accuracy": sum(t[1] for t in tot) / n, "asr": sum(t[2] for t in tot) / n, "n": n})
    return out


# ---------------------------------------------------------------------------------------------
# formatting
# ---------------------------------------------------------------------------------------------
def _f(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, float) and math.isnan(v):
        return "-"
    return f"{float(v):.{digits}f}"


def _ci(lo_hi: Tuple[float, float]) -> str:
    lo, hi = lo_hi
    if lo is None or math.isnan(lo):
        return ""
    return f" [{lo:.2f}, {hi:.2f}]"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |")
    return "\n".join(lines)


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for r in rows:
        w.writerow(["" if c is None else c for c in r])
    atomic_write_text(path, buf.getvalue())


_ORDER = (OUR_DEFENSE, "fd", "rand", "shield", "tv", "jpeg", "bdr", "pd", "crop")


def _defense_order(names: Iterable[str]) -> List[str]:
    """Our defense first, then the baselines in the paper's order, then anything else."""
    seen: List[str] = []
    for n in names:
        if n not in seen:
            seen.append(n)
    return [d for d in _ORDER if d in seen] + [d for d in seen if d not in _ORDER]


def _label(defense: str) -> str:
    return P.DEFENSE_LABELS.get(defense, defense)


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------
class _Report:
    def __init__(self, store: ResultStore) -> None:
        self.store = store
        self.cfg = store.read_config() or {}
        ident = self.cfg.get("identity", {})
        self.preset = ident.get("preset_sizes", {}) or {}
        self.preset_name = ident.get("preset", self.preset.get("name", "?"))
        latest = self.cfg.get("last_session", self.cfg)
        self.selected = set(latest.get("only") or [])
        self.units = {e: store.units(e) for e in store.experiments()}
        self.tables = store.root / "tables"
        self.figures = store.root / "figures"

    # -- helpers ----------------------------------------------------------------------------
    def ok_units(self, exp: str) -> List[Dict[str, Any]]:
        return [u for u in self.units.get(exp, []) if u.get("status") == "ok"]

    def err_units(self, exp: str) -> List[Dict[str, Any]]:
        return [u for u in self.units.get(exp, []) if u.get("status") != "ok"]

    def records(self, exp: str) -> List[Dict[str, Any]]:
        return self.store.records(exp)

    def availability(self, exp: str, *, what: str = "") -> str:
        """Lines saying why (part of) a section is missing: errors, or not selected."""
        errs = self.err_units(exp)
        lines = []
        if errs:
            by_reason: Dict[str, List[str]] = defaultdict(list)
            for u in errs:
                by_reason[(u.get("error") or "unknown error").splitlines()[0][:300]].append(u["unit_id"])
            for reason, ids in by_reason.items():
                shown = ", ".join(f"`{i}`" for i in ids[:4]) + (f" and {len(ids) - 4} more" if len(ids) > 4 else "")
                lines.append(f"- not available: {reason} ({shown})")
        if not self.units.get(exp) and not errs:
            if self.selected and exp not in self.selected and not (exp == "strong" and "table5" in self.selected):
                lines.append(f"- not run: {what or exp} was not selected (`--only`).")
            else:
                lines.append(f"- not run yet: no finished unit of {what or exp} in this folder.")
        return "\n".join(lines)

    def shrunk_note(self) -> str:
        return "quick run" if self.preset_name == "quick" else ("smoke run" if self.preset_name == "smoke" else "")

    # -- sections ---------------------------------------------------------------------------
    def about(self) -> str:
        ident = self.cfg.get("identity", {})
        sample = self.cfg.get("sample", {})
        lines = [
            "## About this run",
            "",
            f"- Model: **{ident.get('model', '?')}**; images: `{ident.get('data', '?')}`; seed {ident.get('seed', '?')}; "
            f"preset **{self.preset_name}** ({self.preset.get('n_images', '?')} protocol images).",
            f"- The paper used {P.MODEL_AND_DATA}. **Our model and images differ from the paper's** "
            "(by default EfficientNet-Lite0, 224x224, on the shared 1000-image ImageNet sample, one image per class), "
            "so the numbers below are not expected to match the paper's: compare trends and orders "
            "(which defense holds, which breaks, how accuracy moves with the attack), not values.",
            "- ACC: fraction of images predicted as their true label; ASR: fraction predicted as the attacker's target "
            "(targeted attacks; DeepFool and the strong attack are untargeted). For random defenses, ACC/ASR are "
            f"expected values over {self.preset.get('eval_draws', '?')} fresh draws of the defense unless said otherwise.",
        ]
        if sample:
            lines.append(f"- Protocol sample: {sample}")
        return "\n".join(lines)

    def banner(self) -> str:
        if self.preset_name == "paper":
            return ""
        shr = self.preset.get("shrunk") or []
        title = "QUICK RUN" if self.preset_name == "quick" else f"{self.preset_name.upper()} RUN"
        lines = [f"> **{title}**: sizes shrunk from the paper's so that the whole run is short. "
                 "Numbers are noisy and attacks weaker than in `--preset paper`. What was shrunk:"]
        lines += [f"> - {s}" for s in shr]
        return "\n".join(lines)

    def table1(self) -> str:
        recs = self.records("table1")
        by = defaultdict(list)
        for r in recs:
            by[r["defense"]].append(r)
        header = ["Defense", "l2 (paper)", "l2 (ours)", "SSIM (paper)", "SSIM (ours)", "ACC (paper)", "ACC (ours)", "n"]
        rows = []
        order = [OUR_DEFENSE, "rand", "fd", "shield", "tv", "bdr", "pd", "jpeg"]
        for d in order + sorted(set(by) - set(order)):
            if d not in by and d not in P.TABLE1:
                continue
            rs = by.get(d, [])
            paper = P.TABLE1.get(d, (None, None, None))
            rows.append([_label(d), _f(paper[0]), _f(_mean(r["l2"] for r in rs), 3), _f(paper[1]), _f(_mean(r["ssim"] for r in rs), 3),
                         _f(paper[2]), _f(_mean(float(r["correct"]) for r in rs)), len(rs)])
        _write_csv(self.tables / "table1.csv", header, rows)
        n = self.preset.get("table1_images", "?")
        text = [
            "## Table 1: randomness of the defenses",
            "",
            f"Two independent outputs of each defense on the same image: normalised l2 and SSIM between them (mean over "
            f"{n} images drawn at random from the source, any label; paper: 1000 images), and the defended model's "
            "top-1 accuracy on those clean images (one draw).",
            "",
            _md_table(header, rows),
        ]
        av = self.availability("table1")
        return "\n".join(text + (["", av] if av else []))

    def _table2_rows(self):
        recs = self.records("table2")
        by = defaultdict(list)
        for r in recs:
            by[r["attack"]].append(r)
        return by

    def _spec_notes(self) -> Dict[str, Dict[str, Any]]:
        return {a["label"]: a for a in self.preset.get("table2_attacks", [])}

    def table2(self) -> str:
        by = self._table2_rows()
        specs = self._spec_notes()
        header = ["Attack", "setting", "Linf (paper)", "Linf (ours)", "l2 (paper)", "l2 (ours)", "ACC (paper)", "ACC (ours)", "ASR (paper)", "ASR (ours)", "n"]
        rows = []
        sample = self.store.load_tensors("sample")
        n_clean = len(sample.get("ids", [])) if sample else None
        p = P.TABLE2["clean"]
        rows.append(["Clean", "-", _f(p[0], 3), "0.000", _f(p[1], 4), "0.0000", _f(p[2]), "1.00" if n_clean else "-", "Nan", "Nan", n_clean or "-"])
        for label in [a["label"] for a in self.preset.get("table2_attacks", [])]:
            rs = by.get(label, [])
            spec = specs.get(label, {})
            setting = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(spec.get("params", {}).items()))
            if spec.get("paper"):
                setting += f" (paper: {spec['paper']})"
            if not spec.get("targeted", True):
                setting += "; untargeted (ASR = fooled rate)"
            p = P.TABLE2.get(label, (None, None, None, None))
            asr = _mean((not r["correct"]) if not spec.get("targeted", True) else r["success"] for r in rs)
            rows.append([label, setting, _f(p[0], 3), _f(_mean(r.get("linf") for r in rs), 3), _f(p[1], 4), _f(_mean(r.get("l2") for r in rs), 4),
                         _f(p[2]), _f(_mean(float(r["correct"]) for r in rs)), _f(p[3]) if p[2] is not None else "-", _f(asr), len(rs)])
        _write_csv(self.tables / "table2.csv", header, rows)
        text = [
            "## Table 2: standard attacks on the bare model",
            "",
            "Targeted attacks (target drawn uniformly among the other 999 classes) generated on the undefended model; "
            "Linf and l2 are the mean distances of the returned images (l2 = RMS, the paper's normalised l2). "
            "The paper's PGD rows come from its Table 3 and DeepFool is not in the paper.",
            "",
            _md_table(header, rows),
        ]
        av = self.availability("table2")
        return "\n".join(text + (["", av] if av else []))

    def table3(self) -> str:
        recs = self.records("table3")
        by = defaultdict(list)
        for r in recs:
            by[r["attack"]].append(r)
        bare = self._table2_rows()
        specs = self._spec_notes()
        header = ["Attack", "l2 (paper)", "l2 (ours)", "no defense ACC (paper)", "no defense ACC (ours)", "no defense ASR (paper)",
                  "no defense ASR (ours)", "our defense ACC (paper)", "our defense ACC (ours)", "our defense ASR (paper)", "our defense ASR (ours)", "n"]
        rows = []
        labels = ["clean"] + [a["label"] for a in self.preset.get("table2_attacks", [])]
        for label in labels:
            rs = by.get(label, [])
            b = bare.get(label, [])
            p = P.TABLE3.get(label, (None, None, None, None, None))
            untargeted = not specs.get(label, {}).get("targeted", True)
            b_acc = 1.0 if label == "clean" and rs else _mean(float(r["correct"]) for r in b)
            b_asr = None if label == "clean" else _mean((not r["correct"]) if untargeted else r["success"] for r in b)
            acc = _mean(r["correct_rate"] for r in rs)
            asr = None if label == "clean" else _mean((1 - r["correct_rate"]) if untargeted else r["success_rate"] for r in rs)
            rows.append(["No attack" if label == "clean" else label, _f(p[0], 3), _f(_mean(r.get("l2") for r in rs), 4) if label != "clean" else "0.0",
                         _f(p[1]), _f(b_acc), _f(p[2]) if label != "clean" else "Nan", _f(b_asr) if label != "clean" else "Nan",
                         _f(p[3]), _f(acc), _f(p[4]) if label != "clean" else "Nan", _f(asr) if label != "clean" else "Nan", len(rs)])
        _write_csv(self.tables / "table3.csv", header, rows)
        text = [
            "## Table 3: the same adversarial examples against our defense",
            "",
            f"The Table 2 examples (made on the bare model) fed to `Defended({OUR_DEFENSE})`; our ACC/ASR are expected values "
            f"over {self.preset.get('eval_draws', '?')} draws of the defense. The paper's \"I-FGSM\" row is set beside our I-FGSM eps=0.03 "
            "(same l2, 0.010); the paper has no FGSM or DeepFool row here.",
            "",
            _md_table(header, rows),
        ]
        av = self.availability("table3")
        return "\n".join(text + (["", av] if av else []))

    def table4(self) -> str:
        recs = self.records("table4")
        by = defaultdict(list)
        for r in recs:
            by[(r["attack"], float(str(r["variant"]).split("=", 1)[1]))].append(r)
        deltas = [float(d) for d in self.preset.get("deltas", P.TABLE4_DELTAS)]
        specs = self._spec_notes()
        labels = ["clean"] + [a["label"] for a in self.preset.get("table2_attacks", [])]
        header = ["Attack"] + [f"delta={d:g}" for d in deltas]
        rows_acc, rows_asr, csv_rows = [], [], []
        for label in labels:
            ra, rs_ = ["No attack" if label == "clean" else label], ["No attack" if label == "clean" else label]
            paper = P.TABLE4.get(label)
            untargeted = not specs.get(label, {}).get("targeted", True)
            for d in deltas:
                rs = by.get((label, d), [])
                acc = _mean(r["correct_rate"] for r in rs)
                asr = None if label == "clean" else _mean((1 - r["correct_rate"]) if untargeted else r["success_rate"] for r in rs)
                pa = ps = None
                if paper is not None and d in P.TABLE4_DELTAS:
                    pa, ps = paper[P.TABLE4_DELTAS.index(d)]
                ra.append(f"{_f(acc)} ({_f(pa)})")
                rs_.append("Nan" if label == "clean" else f"{_f(asr)} ({_f(ps)})")
                csv_rows.append([label, d, acc, pa, asr, ps, len(rs)])
            rows_acc.append(ra)
            rows_asr.append(rs_)
        _write_csv(self.tables / "table4.csv", ["attack", "delta", "acc_ours", "acc_paper", "asr_ours", "asr_paper", "n"], csv_rows)
        text = [
            "## Table 4: distortion limit delta sweep",
            "",
            f"Clean images and the Table 2 examples through `{OUR_DEFENSE}` with the grid-distortion limit delta swept "
            "(the paper's default is 0.15). Each cell: **ours (paper)**; ours is the expected value over draws.",
            "",
            "ACC:",
            "",
            _md_table(header, rows_acc),
            "",
            "ASR:",
            "",
            _md_table(header, rows_asr),
        ]
        av = self.availability("table4")
        return "\n".join(text + (["", av] if av else []))

    def fig4_curves(self) -> Dict[Tuple[str, str], Dict[str, Any]]:
        """(attack, defense) -> merged history and per-image stop information."""
        out: Dict[Tuple[str, str], Dict[str, Any]] = {}
        groups: Dict[Tuple[str, str], List[Dict[str, Any]]] = defaultdict(list)
        for u in self.ok_units("fig4"):
            groups[(u["key"]["attack"], u["key"]["defense"])].append(u)
        recs = self.records("fig4")
        for key, us in groups.items():
            us = sorted(us, key=lambda u: u["key"]["shard"])
            hist = merge_histories([u["summary"].get("history", []) for u in us], [u["summary"].get("initial") for u in us])
            rs = [r for r in recs if (r["attack"], r["defense"]) == key]
            bound_rounds = [r["bound_round"] for r in rs if isinstance(r.get("bound_round"), int) and r["bound_round"] >= 0]
            out[key] = {"history": hist, "records": rs, "bound_rounds": bound_rounds, "n": len(rs)}
        return out

    def fig4(self) -> Tuple[str, Dict[Tuple[str, str], Dict[str, Any]]]:
        from .plots import plot_curves

        curves = self.fig4_curves()
        rounds = int(self.preset.get("bpda_rounds", 50) or 50)
        at = min(50, rounds)
        note = f"{self.shrunk_note()}: {self.preset.get('n_images')} images, {rounds} rounds, EOT {self.preset.get('eot')}" if self.shrunk_note() else ""
        figs = []
        for attack, tag, panels in (("bpda", "BPDA", ("a", "b")), ("bpda-eot", "BPDA+EOT", ("c", "d"))):
            for metric, panel, ylabel in (("accuracy", panels[0], "ACC"), ("asr", panels[1], "ASR")):
                data = {_label(d): [(h["round"], h[metric]) for h in c["history"]] for (a, d), c in sorted(curves.items()) if a == attack}
                paper_pts = {}
                for (a, d), pts in P.FIG4.items():
                    if a != attack:
                        continue
                    key = "acc" if metric == "accuracy" else "asr"
                    xs = []
                    for r, vals in pts.items():
                        if r == "bound" or vals.get(key) is None:
                            continue
                        xs.append((int(r), float(vals[key])))
                    if xs and _label(d) in data:
                        paper_pts[_label(d)] = xs
                path = self.figures / f"fig4{panel}_{attack}_{metric}.png"
                if data:
                    plot_curves(path, data, title=f"Fig. 4({panel}): {ylabel} under {tag}", ylabel=ylabel, paper_points=paper_pts, note=note)
                    figs.append((panel, tag, ylabel, path.name))
        header = ["Defense", "Attack", "paper (Sections 6.2-6.3)", f"ACC ours @ round {at}", f"ASR ours @ round {at}",
                  "ACC ours (end)", "ASR ours (end)", "rounds run", "images at l2 bound", "mean round at bound", "n"]
        rows = []
        for (attack, d), c in sorted(curves.items(), key=lambda kv: (kv[0][0], kv[0][1] != OUR_DEFENSE, kv[0][1])):
            hist = c["history"]
            h_at = next((h for h in hist if h["round"] == at), hist[-1] if hist else None)
            end = hist[-1] if hist else None
            br = c["bound_rounds"]
            rows.append([_label(d), "BPDA" if attack == "bpda" else "BPDA+EOT", P.FIG4_QUALIFIERS.get((attack, d), "-"),
                         _f(h_at and h_at["accuracy"]), _f(h_at and h_at["asr"]), _f(end and end["accuracy"]), _f(end and end["asr"]),
                         end["round"] if end else "-", f"{len(br)}/{c['n']}", _f(_mean(br), 0) if br else "-", c["n"]])
        _write_csv(self.tables / "fig4.csv", ["defense", "attack", "round", "accuracy", "asr", "n"],
                   [[d, a, h["round"], h["accuracy"], h["asr"], h["n"]] for (a, d), c in sorted(curves.items()) for h in c["history"]])
        text = [
            "## Fig. 4: BPDA and BPDA+EOT",
            "",
            "The paper's protocol attacks (PROTOCOL.md): targeted, per round `x <- clip(x - 0.1 * grad CE(f(g(x)), target))`, "
            "gradient through g by BPDA (identity for the non-differentiable parts), BPDA+EOT averaging the gradient over "
            f"{self.preset.get('eot', '?')} draws (paper: 30); an image stops at success (target with l2 < 0.05) or when its l2 would exceed 0.05. "
            "ACC/ASR per round count each image's last judged prediction (one draw), as the paper's curves do. "
            "The paper's quoted values are drawn as hollow markers.",
            "",
        ]
        for panel, tag, ylabel, name in figs:
            text.append(f"![Fig. 4({panel}) {ylabel} under {tag}](figures/{name})")
        text += ["", _md_table(header, rows)]
        av = self.availability("fig4")
        if av:
            text += ["", av]
        return "\n".join(text), curves

    def strong_stats(self) -> Dict[Tuple[str, str], Dict[str, Any]]:
        recs = [r for r in self.records("strong") if r.get("attack") == "adaptive"]
        by = defaultdict(list)
        for r in recs:
            by[(r["defense"], str(r["variant"]).split("=", 1)[1])].append(r)
        out = {}
        for key, rs in by.items():
            frac = [float(r["correct_fraction"]) for r in rs]
            worst = sum(1 for r in rs if r["robust_worst"])
            out[key] = {
                "n": len(rs),
                "expected": sum(frac) / len(frac),
                "expected_ci": bootstrap_mean_interval(frac),
                "worst": worst / len(rs),
                "worst_ci": wilson_interval(worst, len(rs)),
                "draws": rs[0].get("draws"),
                "max_distance": max(float(r["distance"]) for r in rs),
            }
        return out

    def table5(self, curves, strong) -> str:
        header = ["Solution", "Requirement", "Attack", "Linf = 0.031", "l2 = 0.05", "source"]
        rows = [list(r) + ["quoted from the paper (literature)"] for r in P.TABLE5]
        rows.append(["Our method (paper)", "preprocessing", "BPDA+EOT", "-", "58%", "quoted from the paper"])
        eot = curves.get(("bpda-eot", OUR_DEFENSE))
        if eot and eot["history"]:
            rows.append(["Our method (ours, paper protocol)", "preprocessing", f"BPDA+EOT, {eot['history'][-1]['round']} rounds", "-",
                         f"{100 * eot['history'][-1]['accuracy']:.0f}%", "measured"])
        s_l2, s_li = strong.get((OUR_DEFENSE, "l2")), strong.get((OUR_DEFENSE, "linf"))
        if s_l2 or s_li:
            def cell(s):
                return f"{100 * s['expected']:.0f}% (worst {100 * s['worst']:.0f}%)" if s else "-"

            rows.append(["Our method (ours, strong adaptive)", "preprocessing", "EOT-PGD + BPDA, untargeted", cell(s_li), cell(s_l2), "measured"])
        _write_csv(self.tables / "table5.csv", header, rows)
        text = [
            "## Table 5: broader comparison on bounded attacks",
            "",
            "Robust accuracy under bounded attacks. **The literature rows are quoted from the paper's Table 5, not measured here.** "
            "Our rows are measured: the paper's BPDA+EOT protocol (accuracy at the end of the Fig. 4 run) and the strong adaptive "
            "attack (expected robust accuracy over fresh draws; worst case over draws in brackets).",
            "",
            _md_table(header, rows),
        ]
        if not (eot or s_l2 or s_li):
            text.append("")
            text.append("- not available: neither the Fig. 4 BPDA+EOT run nor the strong attack on our defense has finished.")
        return "\n".join(text)

    def table6(self) -> str:
        groups = defaultdict(list)
        for u in self.ok_units("table6"):
            groups[u["key"]["defense"]].append(u)
        rounds = self.preset.get("table6_rounds", "?")
        header = ["Defense", "ACC (paper, 50 rounds)", f"ACC (ours, {rounds} rounds)", "ASR (paper)", "ASR (ours)", "n"]
        rows = []
        order = list(P.TABLE6) + sorted(set(groups) - set(P.TABLE6))
        for d in order:
            us = sorted(groups.get(d, []), key=lambda u: u["key"]["shard"])
            hist = merge_histories([u["summary"].get("history", []) for u in us])
            end = hist[-1] if hist else None
            p = P.TABLE6.get(d, (None, None))
            rows.append([_label(d), _f(p[0]), _f(end and end["accuracy"]), _f(p[1]), _f(end and end["asr"]), end["n"] if end else 0])
        _write_csv(self.tables / "table6.csv", header, rows)
        text = ["## Table 6: combinations after BPDA rounds", "",
                "The paper's BPDA protocol against the four combinations of a quantization step and a randomisation step.", "",
                _md_table(header, rows)]
        av = self.availability("table6")
        return "\n".join(text + (["", av] if av else []))

    def learned(self) -> str:
        recs = self.records("learned")
        units = self.ok_units("learned")
        train = next((u["summary"].get("train") for u in units if u["key"]["attack"] == "train"), None)
        evals = [u["summary"] for u in units if u["key"]["attack"] != "train"]

        def weighted(key):
            pairs = [(s["approximator"].get(key), s["approximator"].get("n", s.get("n", 1))) for s in evals if s.get("approximator")]
            pairs = [(v, n) for v, n in pairs if v is not None and n]
            return sum(v * n for v, n in pairs) / sum(n for _, n in pairs) if pairs else None

        acc = _mean(float(r.get("protocol_correct", r.get("correct"))) for r in recs)
        asr = _mean(float(r.get("protocol_success", r.get("success"))) for r in recs)
        header = ["Quantity", "paper", "ours"]
        rows = [
            ["approximator l2 to g(x)", _f(P.SECTION_6_4["l2"]), _f(weighted("l2"), 3)],
            ["approximator SSIM to g(x)", _f(P.SECTION_6_4["ssim"]), _f(weighted("ssim"), 3)],
            ["identity (x) l2 to g(x), for reference", "-", _f(weighted("identity_l2"), 3)],
            ["identity (x) SSIM to g(x), for reference", "-", _f(weighted("identity_ssim"), 3)],
            [f"BPDA through the approximator: ASR after {self.preset.get('learned_rounds', '?')} rounds", _f(P.SECTION_6_4["asr"]), _f(asr)],
            ["BPDA through the approximator: ACC", "-", _f(acc)],
            ["images", "100", len(recs)],
        ]
        _write_csv(self.tables / "section6_4.csv", header, rows)
        p = self.preset
        patch = p.get("learned_patch")
        text = ["## Section 6.4: learned BPDA", "",
                f"A DenseNet-style convolutional auto-encoder (6 conv layers) trained to map x to g(x) for `{OUR_DEFENSE}` on "
                f"{p.get('learned_train_images', '?')} images disjoint from the evaluation sample ({p.get('learned_steps', '?')} steps of "
                f"{p.get('learned_batch', '?')} {'random ' + str(patch) + 'x' + str(patch) + ' patches' if patch else 'whole images'}), "
                "then used as the backward pass of the paper's BPDA attack. l2/SSIM compare the network's output with a fresh draw of g(x) "
                "on the evaluation images.", "", _md_table(header, rows)]
        if train:
            text += ["", "Training: " + ", ".join(f"{k} {v}" for k, v in train.items() if not isinstance(v, (list, dict)))]
        av = self.availability("learned")
        return "\n".join(text + (["", av] if av else []))

    def strong(self, strong) -> str:
        order = _defense_order(d for (d, _n) in strong)
        header = ["Defense", "paper's claim", "RMS 0.05: expected", "RMS 0.05: worst case", "Linf 8/255: expected", "Linf 8/255: worst case", "n", "draws R"]
        rows = []
        csv_rows = []
        for d in order:
            cells = []
            for norm in ("l2", "linf"):
                s = strong.get((d, norm))
                if s:
                    cells += [f"{s['expected']:.2f}{_ci(s['expected_ci'])}", f"{s['worst']:.2f}{_ci(s['worst_ci'])}"]
                    csv_rows.append([d, norm, s["expected"], *s["expected_ci"], s["worst"], *s["worst_ci"], s["n"], s["draws"], s["max_distance"]])
                else:
                    cells += ["-", "-"]
            any_s = strong.get((d, "l2")) or strong.get((d, "linf"))
            rows.append([_label(d), P.ROBUST_CLAIMS.get(d, (None, "-"))[1]] + cells + [any_s["n"], any_s["draws"]])
        _write_csv(self.tables / "strong.csv", ["defense", "norm", "expected", "expected_lo", "expected_hi", "worst", "worst_lo", "worst_hi", "n", "draws", "max_distance"], csv_rows)
        p = self.preset
        text = ["## Strong adaptive attack", "",
                "Beyond the paper (PROTOCOL.md \"Strong adaptive attack\"): untargeted projected gradient descent inside the bound "
                f"(L2 ball of RMS radius 0.05, or Linf 8/255), random start, {p.get('adaptive_steps', '?')} steps per restart "
                f"(losses: {', '.join(p.get('adaptive_losses', []) or ['?'])}), EOT over {p.get('adaptive_eot', '?')} draws, BPDA through the "
                f"non-differentiable parts, best iterate kept; success judged on R = {p.get('adaptive_draws', '?')} fresh draws of the defense. "
                "**Expected** = mean over images of the fraction of draws still classified correctly; **worst case** = fraction of images "
                "classified correctly under every draw. Brackets: 95% intervals over images (percentile bootstrap for the expected value, "
                "Wilson for the worst case).", "", _md_table(header, rows)]
        av = self.availability("strong", what="the strong adaptive attack")
        return "\n".join(text + (["", av] if av else []))

    def diagnostics(self) -> str:
        units = [u for u in self.ok_units("strong") if u["key"]["attack"] == "diagnostics"]
        text = ["## Diagnostics of the strong attack", "",
                "Carlini et al. (2019) checklist run beside the strong attack: the same attack on the undefended model, "
                "success with K and 2K steps, an unbounded run (should reach ~100%), gradient agreement across EOT draws, "
                "zero/NaN gradients.", ""]
        for u in sorted(units, key=lambda u: u["unit_id"]):
            text += [f"**{_label(u['key']['defense'])}, {u['key']['variant']}**", "", "```", u["summary"].get("text", "(no text)"), "```", ""]
        for u in sorted([u for u in self.ok_units("strong") if u["key"]["attack"] == "adaptive"], key=lambda u: u["unit_id"]):
            st = (u["summary"].get("info") or {}).get("gradient_stats")
            if st and (st.get("zero_gradients") or st.get("nonfinite_gradients")):
                text.append(f"- WARNING `{u['unit_id']}`: {st.get('zero_gradients', 0)} zero and {st.get('nonfinite_gradients', 0)} "
                            f"non-finite gradients out of {st.get('gradient_evaluations', '?')}")
        errs = [u for u in self.err_units("strong") if u["key"]["attack"] == "diagnostics"]
        for u in errs:
            text.append(f"- not available: {(u.get('error') or '').splitlines()[0][:300]} (`{u['unit_id']}`)")
        if not units and not errs:
            text.append("- not run: no diagnostics unit has finished.")
        return "\n".join(text)

    def samples(self) -> str:
        text = ["## Sample images", ""]
        path = self.figures / "samples.png"
        if path.is_file():
            text.append("Clean, defended, adversarial and defended adversarial images (first images of the sample), with the "
                        "defended model's prediction under each (the adversarial column gives the bare model's).")
            text += ["", "![sample images](figures/samples.png)"]
        else:
            why = self.cfg.get("sample_strip_error") or "no adversarial example of our defense is cached yet"
            text.append(f"- not available: {why}")
        return "\n".join(text)

    def verdict(self, strong, curves) -> str:
        text = ["## Verdict", ""]
        quick = self.preset_name != "paper"
        if quick:
            text.append(f"_This is a {self.preset_name} run: its attacks are far weaker than the paper preset's, so a defense that "
                        "survives here is not shown robust; a defense broken here is broken._")
            text.append("")
        defs = _defense_order(d for (d, _n) in strong)
        if not defs:
            text.append("- No strong-attack result yet, so no verdict (see the sections above for what is missing).")
        for d in defs:
            s = strong.get((d, "l2")) or strong.get((d, "linf"))
            norm = "RMS 0.05" if strong.get((d, "l2")) else "Linf 8/255"
            robust_claim, claim = P.ROBUST_CLAIMS.get(d, (None, "no claim in the paper"))
            e, w = s["expected"], s["worst"]
            figures = f"expected robust accuracy {e:.2f}, worst case {w:.2f} at {norm}, n={s['n']}"
            if robust_claim:
                if e <= BROKEN_BELOW:
                    line = f"**{_label(d)}: broken.** The strong adaptive attack breaks {_label(d)}, which the paper calls robust ({claim}); {figures}."
                elif e < 0.5 * (P.TABLE5_OURS["l2"] if d == OUR_DEFENSE else 0.6):
                    line = f"**{_label(d)}: much weaker than claimed.** The paper reports it robust ({claim}); the strong attack leaves {figures}."
                else:
                    line = f"**{_label(d)}: holds against this attack** ({figures}), consistent with the paper's claim ({claim})" + (
                        ", but only a full-size run can support that claim." if quick else ".")
            elif robust_claim is False:
                if e <= BROKEN_BELOW:
                    line = f"**{_label(d)}: broken**, as the paper reports ({claim}); {figures}."
                else:
                    line = (f"**{_label(d)}: not broken here** although the paper reports it broken ({claim}); {figures}. "
                            "The attack may be too weak at this size: check the diagnostics.")
            else:
                line = f"**{_label(d)}**: {figures}."
            text.append(f"- {line}")
        eot = curves.get(("bpda-eot", OUR_DEFENSE))
        if eot and eot["history"] and (OUR_DEFENSE, "l2") in strong:
            a = eot["history"][-1]["accuracy"]
            e = strong[(OUR_DEFENSE, "l2")]["expected"]
            text.append(f"- Paper protocol vs strong attack on our defense: BPDA+EOT leaves ACC {a:.2f}, the strong adaptive attack "
                        f"{e:.2f} at the same l2 bound.")
        return "\n".join(text)

    def metadata(self) -> str:
        md = self.cfg.get("metadata", {})
        last = (self.cfg.get("last_session") or {}).get("metadata", md)
        versions = last.get("versions", md.get("versions", {}))
        lines = ["## Run metadata", "",
                 f"- Preset: {self.preset_name}; seed {self.cfg.get('identity', {}).get('seed')}; model {self.cfg.get('identity', {}).get('model')}",
                 f"- Images: `{self.cfg.get('identity', {}).get('data')}`",
                 f"- Device: {last.get('device_description', md.get('device_description', '?'))}",
                 f"- Git revision: {last.get('git_revision', md.get('git_revision', '?'))}",
                 f"- Started: {md.get('time', '?')}; platform {last.get('platform', md.get('platform', '?'))}",
                 "- Package versions: " + ", ".join(f"{k} {v}" for k, v in versions.items())]
        sessions = self.store.sessions()
        if sessions:
            total = sum(float(s.get("seconds", 0)) for s in sessions)
            lines.append(f"- Sessions: {len(sessions)} (wall time {total / 60:.1f} min in all; a resumed run has several)")
        header = ["Part", "units ok", "units failed", "wall time (s)", "CPU time (s)"]
        rows = []
        for exp in self.units:
            us = self.units[exp]
            rows.append([EXPERIMENT_TITLES.get(exp, exp), sum(u["status"] == "ok" for u in us), sum(u["status"] != "ok" for u in us),
                         f"{sum(float(u.get('seconds', 0)) for u in us):.1f}",
                         f"{sum(float((u.get('summary') or {}).get('cpu_seconds', 0)) for u in us):.1f}"])
        lines += ["", "Duration of each part (sum of its units' times; CPU time is summed over threads, so on a machine shared with "
                  "other jobs it is the better measure of cost):", "", _md_table(header, rows)]
        lines += ["", "Files: `results/<experiment>.jsonl` (one record per unit and image), `tables/*.csv`, `figures/*.png`, "
                  "`units/` (one atomic file per unit of work), `run.json` (configuration)."]
        return "\n".join(lines)

    def build(self) -> str:
        self.tables.mkdir(parents=True, exist_ok=True)
        self.figures.mkdir(parents=True, exist_ok=True)
        title = "# Reproduction report: An Efficient Preprocessing-based Approach to Mitigate Advanced Adversarial Attacks"
        parts = [title]
        b = self.banner()
        if b:
            parts.append(b)
        parts.append(self.about())
        parts.append(self.table1())
        fig4_text, curves = self.fig4()
        parts.append(fig4_text)
        parts.append(self.table2())
        parts.append(self.table3())
        parts.append(self.table4())
        strong = self.strong_stats()
        parts.append(self.table5(curves, strong))
        parts.append(self.table6())
        parts.append(self.learned())
        parts.append(self.strong(strong))
        parts.append(self.diagnostics())
        parts.append(self.samples())
        parts.append(self.verdict(strong, curves))
        parts.append(self.metadata())
        return "\n\n".join(parts) + "\n"


def write_report(store: ResultStore) -> Path:
    """Write ``report.md``, ``tables/*.csv`` and the Fig. 4 PNGs; returns the report's path."""
    text = _Report(store).build()
    path = store.root / "report.md"
    atomic_write_text(path, text)
    return path
