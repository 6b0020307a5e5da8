"""Sanity checks printed with every strong evaluation (Carlini et al. 2019, "On Evaluating
Adversarial Robustness", Section 5 checklist; auto-attack's ``checks.py`` idea; issue 4 item 6).

:func:`run_diagnostics` runs, on a small subset of the evaluated images:

1. **the same attack on the undefended classifier** (it should succeed at least as often as
   on the defended model; if not, the attack, not the defense, is the weak link);
2. **success vs number of steps**: the attack with ``K`` and ``2K`` steps; if doubling the
   steps still raises the success rate the attack had not converged;
3. **an unbounded run** (radius covering the whole [0,1] box): it must reach ~100%, otherwise
   the gradient is masked or the attack is broken;
4. **gradient variance across EOT draws**: single-draw gradients of the BPDA model against
   their mean (mean cosine similarity, and the norm of the mean over the mean of the norms);
   values near 0 mean a single draw says little and EOT is needed (or is not enough);
5. **zero or NaN gradients**: the fraction of single-draw gradients that are all zero or hold
   non-finite values (plus those the attack itself counted in ``info["gradient_stats"]``);
6. **randomness**: whether two draws of the defended model disagree on a prediction.

Every costly part can be switched off or sized (``n``, ``steps``, ``gradient_draws``).
:func:`format_diagnostics` renders the dict as text, warnings first.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..seeding import child_seed, ensure_generator, make_generator
from .base import AttackResult
from .bpda import with_bpda

__all__ = ["run_diagnostics", "format_diagnostics", "success_rate", "gradient_agreement"]

#: An unbounded attack below this success rate triggers a warning.
UNBOUNDED_MIN_SUCCESS = 0.95
#: Doubling the steps raising success by more than this triggers a warning.
DOUBLING_TOLERANCE = 0.05


def success_rate(result: AttackResult) -> float:
    """Expected success over fresh draws when the attack reports it, else the mean of ``success``."""
    if "asr_expected" in result.info:
        return float(result.info["asr_expected"])
    return float(result.success.float().mean()) if result.success.numel() else float("nan")


def _with(attack: Any, **overrides: Any) -> Optional[Any]:
    """A shallow copy of ``attack`` with attributes replaced; None if one does not exist."""
    if any(not hasattr(attack, k) for k in overrides):
        return None
    clone = copy.copy(attack)
    for k, v in overrides.items():
        setattr(clone, k, v)
    if hasattr(clone, "progress"):
        clone.progress = None
    return clone


def gradient_agreement(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor], *, draws: int, generator: torch.Generator, approx: Any = None) -> Dict[str, Any]:
    """Single-draw gradients of the BPDA model (cross-entropy toward the goal) vs their mean.

    Returns mean cosine similarity of single-draw gradients to their mean, the ratio
    ``|mean gradient| / mean |single gradient|`` (1: every draw agrees; ~1/sqrt(draws):
    pure noise), and the fractions of zero and non-finite single-draw gradients.
    """
    grad_model = with_bpda(model, approx)
    randomized = bool(getattr(grad_model, "randomized", False))
    k = draws if randomized else 1
    grads = []
    for _ in range(k):
        xa = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            z = grad_model(xa, generator=make_generator(child_seed(generator))) if randomized else grad_model(xa)
            loss = F.cross_entropy(z, targets if targets is not None else labels, reduction="none").sum()
            (gr,) = torch.autograd.grad(loss, xa)
        grads.append(gr.flatten(1))
    G = torch.stack(grads)  # (k, N, D)
    nonfinite = ~torch.isfinite(G).all(2)
    zero = (G.abs().amax(2) == 0) & ~nonfinite
    G = torch.nan_to_num(G, nan=0.0, posinf=0.0, neginf=0.0)
    mean = G.mean(0)
    cos = F.cosine_similarity(G, mean.unsqueeze(0).expand_as(G), dim=2, eps=1e-20)
    ratio = mean.norm(dim=1) / G.norm(dim=2).mean(0).clamp_min(1e-30)
    return {
        "draws": k,
        "mean_cosine_to_mean": float(cos.mean()),
        "mean_norm_ratio": float(ratio.mean()),
        "zero_fraction": float(zero.float().mean()),
        "nonfinite_fraction": float(nonfinite.float().mean()),
    }


def run_diagnostics(
    attack: Any,
    model: nn.Module,
    classifier: Optional[nn.Module],
    x: torch.Tensor,
    *,
    labels: torch.Tensor,
    targets: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    n: int = 8,
    steps: Optional[int] = None,
    undefended: bool = True,
    doubling: bool = True,
    unbounded: bool = True,
    gradient_draws: int = 30,
    main_result: Optional[AttackResult] = None,
    approx: Any = None,
) -> Dict[str, Any]:
    """Run the checklist on the first ``n`` images (module docstring). Returns a dict with
    one entry per check and a list of ``warnings``.

    Args:
        attack: the attack object (``AdaptiveAttack`` or any attack with ``steps``/``eps``).
        model: the deployed (defended) model the evaluation attacked.
        classifier: the undefended classifier (None: skip check 1).
        steps: K for the doubling check (default: the attack's own ``steps``).
        main_result: the evaluation's result, for the gradient counts it recorded.
    """
    g = ensure_generator(generator)
    x, labels = x[:n], labels[:n]
    targets = targets[:n] if targets is not None else None
    out: Dict[str, Any] = {"n": int(x.shape[0]), "warnings": []}
    warn: List[str] = out["warnings"]
    kw = dict(labels=labels, targets=targets)

    defended_rate = None
    if doubling or undefended:
        k = int(steps if steps is not None else getattr(attack, "steps", 0) or 0)
        a_k = _with(attack, steps=k) if k else None
        if a_k is None:
            out["steps"] = {"skipped": "attack has no 'steps'"}
        else:
            defended_rate = success_rate(a_k(model, x, generator=make_generator(child_seed(g)), **kw))
            out["steps"] = {"k": k, "success_k": defended_rate}
            if doubling:
                a_2k = _with(attack, steps=2 * k)
                r2 = success_rate(a_2k(model, x, generator=make_generator(child_seed(g)), **kw))
                out["steps"].update({"2k": 2 * k, "success_2k": r2, "doubling_helps": r2 - defended_rate > DOUBLING_TOLERANCE})
                if r2 - defended_rate > DOUBLING_TOLERANCE:
                    warn.append(f"doubling the steps ({k} -> {2 * k}) raised success {defended_rate:.2f} -> {r2:.2f}: the attack has not converged; use more steps")

    if undefended and classifier is not None:
        a = _with(attack) or attack
        r = success_rate(a(classifier, x, generator=make_generator(child_seed(g)), **kw))
        out["undefended"] = {"success": r}
        if defended_rate is not None and r + 1e-9 < defended_rate:
            warn.append(f"the attack succeeds less on the undefended model ({r:.2f}) than on the defended one ({defended_rate:.2f}): the attack is the weak link")
        elif r < 0.9:
            warn.append(f"the attack reaches only {r:.2f} on the undefended model: check the attack")

    if unbounded:
        # A radius covering the whole [0,1] box in the attack's own unit.
        big = {"eps": 1.0}  # Linf radius, or normalised (RMS) L2: the whole [0,1] box either way
        a = _with(attack, **big)
        if a is None:
            out["unbounded"] = {"skipped": "attack has no 'eps'"}
        else:
            r = success_rate(a(model, x, generator=make_generator(child_seed(g)), **kw))
            out["unbounded"] = {**big, "success": r}
            if r < UNBOUNDED_MIN_SUCCESS:
                warn.append(f"an unbounded attack reaches only {r:.2f} (< {UNBOUNDED_MIN_SUCCESS}): gradient masking or a broken attack")

    if gradient_draws > 0:
        ga = gradient_agreement(model, x, labels, targets, draws=gradient_draws, generator=make_generator(child_seed(g)), approx=approx)
        out["gradients"] = ga
        warn.extend(gradient_warnings(ga))

    if main_result is not None and "gradient_stats" in main_result.info:
        st = main_result.info["gradient_stats"]
        out["attack_gradient_stats"] = st
        if st.get("nonfinite_gradients", 0):
            warn.append(f"the attack met {st['nonfinite_gradients']} non-finite gradients")
        if st.get("zero_gradients", 0):
            warn.append(f"the attack met {st['zero_gradients']} all-zero gradients (of {st.get('gradient_evaluations', '?')})")

    with torch.no_grad():
        if getattr(model, "randomized", False):
            p1 = model(x, generator=make_generator(child_seed(g))).argmax(1)
            p2 = model(x, generator=make_generator(child_seed(g))).argmax(1)
            out["randomized"] = {"prediction_disagreement": float((p1 != p2).float().mean())}
        else:
            out["randomized"] = {"prediction_disagreement": 0.0}
    return out


def format_diagnostics(d: Dict[str, Any]) -> str:
    """Human-readable rendering of :func:`run_diagnostics`'s dict (warnings first)."""
    lines = [f"Diagnostics (Carlini et al. 2019 checklist) on {d.get('n', '?')} images:"]
    for w in d.get("warnings", []):
        lines.append(f"  WARNING: {w}")
    if not d.get("warnings"):
        lines.append("  no warnings")
    s = d.get("steps")
    if s and "skipped" not in s:
        line = f"  success with {s['k']} steps: {s['success_k']:.3f}"
        if "success_2k" in s:
            line += f"; with {s['2k']} steps: {s['success_2k']:.3f} (doubling helps: {'yes' if s['doubling_helps'] else 'no'})"
        lines.append(line)
    if "undefended" in d:
        lines.append(f"  same attack on the undefended model: success {d['undefended']['success']:.3f}")
    u = d.get("unbounded")
    if u and "skipped" not in u:
        lines.append(f"  unbounded run ({', '.join(f'{k} {v:g}' for k, v in u.items() if k != 'success')}): success {u['success']:.3f}")
    lines += describe_randomness(d)
    return "\n".join(lines)


def gradient_warnings(ga: Dict[str, Any]) -> List[str]:
    """The warnings a :func:`gradient_agreement` result calls for (NaN/inf, zero, noisy)."""
    warn = []
    if ga["nonfinite_fraction"] > 0:
        warn.append(f"{ga['nonfinite_fraction']:.1%} of single-draw gradients hold NaN/inf values")
    if ga["zero_fraction"] > 0:
        warn.append(f"{ga['zero_fraction']:.1%} of single-draw gradients are exactly zero (shattered gradients: use BPDA)")
    if ga["draws"] > 1 and ga["mean_cosine_to_mean"] < 0.2:
        warn.append(f"single-draw gradients barely agree with their mean (cosine {ga['mean_cosine_to_mean']:.2f}): use more EOT draws")
    return warn


def describe_randomness(d: Dict[str, Any], suffix=lambda part: "") -> List[str]:
    """The lines for the gradient-agreement and two-draws checks of a diagnostics dict
    (shared by :func:`format_diagnostics` and the CLI's report; ``suffix(part)`` is appended)."""
    lines = []
    ga = d.get("gradients")
    if ga:
        lines.append(
            f"  gradients over {ga['draws']} draws: mean cosine to the EOT mean {ga['mean_cosine_to_mean']:.3f}, "
            f"|mean|/mean|g| {ga['mean_norm_ratio']:.3f}, zero {ga['zero_fraction']:.1%}, non-finite {ga['nonfinite_fraction']:.1%}"
            + suffix(ga)
        )
    if "randomized" in d:
        lines.append(f"  two draws disagree on {d['randomized']['prediction_disagreement']:.1%} of predictions" + suffix(d["randomized"]))
    return lines
