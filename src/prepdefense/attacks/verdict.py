"""The verdict: judging adversarial images on fresh draws of a random defense, the 95%
intervals reported with it, and merging per-batch round histories.

PROTOCOL.md "Conventions": for a random defense report the expected value over R >= 10
independent draws, not only one draw. Figures over N images:

* ``robust_accuracy_expected``: the mean over images of the fraction of draws classified
  correctly; ``robust_accuracy_worst``: the fraction of images classified correctly under
  *every* draw (an image counts as broken if any draw is fooled);
* ``asr_expected`` / ``asr_worst``: the same for success (targeted: predicted as the target;
  untargeted: not predicted as the label), worst = fooled under *some* draw.

Intervals (over the image sample, draws held fixed): Wilson score intervals for the
worst-case figures (one Bernoulli per image; ``scipy.stats.binomtest``) and a percentile
bootstrap over images (``scipy.stats.bootstrap``, 2000 resamples, seeded) for the expected
figures (a mean of per-image fractions), with two pseudo-images at 0 and two at 1 in the
resampled sample: the percentile bootstrap alone collapses to a point when every image has
the same fraction (0.00 robust on every draw of 100 images would read "[0.00, 0.00]"), a
certainty that 100 images do not give (:func:`bootstrap_interval`).

Draw ``r`` of the verdict is the model's draw under the run key's sub-stream
``("verdict", r)``: never used while attacking, and for each image a function of the seed and
its id alone, so a kept image is judged the same whatever batch it was attacked in, and the
draw that fooled it can be replayed.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy import stats
from torch import nn

from ..draws import KeyLike, as_key
from .eot import EOT_CHUNK_IMAGES

__all__ = ["predictions_on_draws", "round_record", "wilson_interval", "bootstrap_interval", "judge_on_draws", "summarize", "evaluate_on_draws", "merge_histories", "VERDICT_STREAM"]

#: Sub-stream of the run key the verdict draws from.
VERDICT_STREAM = "verdict"


def wilson_interval(successes: int, n: int, level: float = 0.95) -> Tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default); (nan, nan) for n = 0."""
    if n <= 0:
        return (float("nan"), float("nan"))
    ci = stats.binomtest(int(successes), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return (max(0.0, float(ci.low)), min(1.0, float(ci.high)))


def bootstrap_interval(values: Sequence[float], *, seed: int = 0, resamples: int = 2000, level: float = 0.95) -> Tuple[float, float]:
    """Interval of the mean of per-image fractions ``values`` (each in [0, 1]): the percentile
    bootstrap over images (seeded, so reports repeat), with ``ceil(z**2 / 2)`` pseudo-images at
    0 and as many at 1 added to the resampled sample (two of each at 95%: Agresti and Coull's
    "add two successes and two failures", 1998, carried over to fractions); the interval always
    contains the observed mean.

    Why the pseudo-images: the percentile bootstrap only knows the spread it sees, so a sample
    with none (every image robust on 0 of 10 draws) would get the point interval [0, 0] whatever
    ``n``, a certainty the sample size does not give. With them, 100 images at 0 give about
    [0, 0.05] (the Wilson interval is [0, 0.037]); a sample with spread keeps, within about
    ``4 / n``, its bootstrap interval. (nan, nan) for no values.

    Raises:
        ValueError: a value outside [0, 1] or not finite.
    """
    v = np.asarray(torch.as_tensor(values, dtype=torch.float64).cpu().flatten())
    if v.size == 0:
        return (float("nan"), float("nan"))
    if not np.all(np.isfinite(v)) or v.min() < 0.0 or v.max() > 1.0:
        raise ValueError(f"bootstrap_interval takes per-image fractions in [0, 1]; got values in [{v.min()}, {v.max()}]")
    m = float(v.mean())
    pseudo = int(np.ceil(float(stats.norm.ppf(0.5 + level / 2)) ** 2 / 2))
    augmented = np.concatenate([v, np.zeros(pseudo), np.ones(pseudo)])
    res = stats.bootstrap((augmented,), np.mean, n_resamples=resamples, confidence_level=level, method="percentile",
                          random_state=np.random.default_rng(seed), vectorized=True)
    return (max(0.0, min(float(res.confidence_interval.low), m)), min(1.0, max(float(res.confidence_interval.high), m)))


@torch.no_grad()
def predictions_on_draws(model: nn.Module, x: torch.Tensor, *, draws: int, key: KeyLike) -> torch.Tensor:
    """Predicted classes under ``draws`` fresh draws of ``model``, (N, R) on the CPU; draw
    ``r`` is ``key``'s sub-stream ``("verdict", r)``. A deterministic model runs once (R = 1).
    The images go :data:`~prepdefense.attacks.eot.EOT_CHUNK_IMAGES` at a time (per-image draws
    make the chunking invisible)."""
    verdict = as_key(key, x.shape[0]).child(VERDICT_STREAM)
    randomized = bool(getattr(model, "randomized", False))
    out = []
    for start in range(0, x.shape[0], EOT_CHUNK_IMAGES):  # bounded memory: a chunk of images per call
        rows = slice(start, min(start + EOT_CHUNK_IMAGES, x.shape[0]))
        xs, ks = x[rows], verdict.select(rows)
        preds = [model(xs, generator=ks.child(i)).argmax(1) for i in range(int(draws))] if randomized else [model(xs).argmax(1)]
        out.append(torch.stack(preds, dim=1).cpu())
    return torch.cat(out) if out else torch.zeros(0, int(draws) if randomized else 1, dtype=torch.long)


@torch.no_grad()
def judge_on_draws(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor], *, draws: int, key: KeyLike) -> Dict[str, torch.Tensor]:
    """Classify ``x`` under ``draws`` fresh draws of ``model`` (one for a deterministic model),
    draw ``r`` under ``key``'s sub-stream ``("verdict", r)``.

    Returns per-image matrices on the CPU, shape (N, R): ``prediction``, ``correct`` and
    ``fooled`` (targeted: predicted as the target; untargeted: not the label).
    """
    pred = predictions_on_draws(model, x, draws=draws, key=key)
    correct = pred == labels.cpu()[:, None]
    fooled = pred == targets.cpu()[:, None] if targets is not None else ~correct
    return {"prediction": pred, "correct": correct, "fooled": fooled}


def summarize(correct: torch.Tensor, fooled: torch.Tensor, *, seed: int = 0) -> Dict[str, Any]:
    """The verdict's figures (module docstring) from per-image (N, R) matrices."""
    n, r = correct.shape
    acc_frac = correct.float().mean(1)
    fool_frac = fooled.float().mean(1)
    acc_worst = int(correct.all(1).sum())
    fool_worst = int(fooled.any(1).sum())
    return {
        "draws": r,
        "n": n,
        "robust_accuracy_expected": float(acc_frac.mean()) if n else float("nan"),
        "robust_accuracy_expected_ci95": bootstrap_interval(acc_frac, seed=seed),
        "robust_accuracy_worst": acc_worst / n if n else float("nan"),
        "robust_accuracy_worst_ci95": wilson_interval(acc_worst, n),
        "asr_expected": float(fool_frac.mean()) if n else float("nan"),
        "asr_expected_ci95": bootstrap_interval(fool_frac, seed=seed + 1),
        "asr_worst": fool_worst / n if n else float("nan"),
        "asr_worst_ci95": wilson_interval(fool_worst, n),
        "per_image_correct_fraction": acc_frac.tolist(),
        "per_image_fooled_fraction": fool_frac.tolist(),
    }


def evaluate_on_draws(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor], *, draws: int, key: KeyLike) -> Dict[str, Any]:
    """:func:`judge_on_draws` then :func:`summarize`; the (N, R) matrices are kept under
    ``correct`` and ``fooled``."""
    key = as_key(key, x.shape[0])
    judged = judge_on_draws(model, x, labels, targets, draws=draws, key=key)
    out = summarize(judged["correct"], judged["fooled"], seed=key.seed % (2**32))
    out["correct"], out["fooled"] = judged["correct"], judged["fooled"]
    return out


def round_record(round_: int, pred: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor], **extra: Any) -> Dict[str, Any]:
    """One per-round history record: ACC (prediction == label) and ASR (targeted: == target;
    untargeted: != label), with the counts :func:`merge_histories` needs."""
    n = int(pred.numel())
    correct = int((pred == labels).sum())
    success = int((pred == targets).sum()) if targets is not None else n - correct
    return {"round": int(round_), "accuracy": correct / n if n else float("nan"), "asr": success / n if n else float("nan"),
            "n": n, "n_correct": correct, "n_success": success, **extra}


def merge_histories(histories: Sequence[List[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """Merge per-batch round records (each with counts ``n``, ``n_correct``, ``n_success``)
    into records over all images.

    A batch whose run ended earlier (every image stopped) contributes its last record to the
    later rounds: its images keep their state.
    """
    histories = [h for h in histories if h]
    if not histories:
        return []
    length = max(len(h) for h in histories)
    merged = []
    for i in range(length):
        recs = [h[min(i, len(h) - 1)] for h in histories]
        n = sum(r["n"] for r in recs)
        c = sum(r["n_correct"] for r in recs)
        s = sum(r["n_success"] for r in recs)
        rec = {"round": max(r["round"] for r in recs), "accuracy": c / n, "asr": s / n, "n": n, "n_correct": c, "n_success": s}
        if all("n_running" in r for r in recs):
            rec["n_running"] = sum(r["n_running"] for r in recs)
        merged.append(rec)
    return merged
