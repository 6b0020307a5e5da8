"""``adaptive``: the strong adaptive attack (PROTOCOL.md "Strong adaptive attack", beyond the paper).

Projected gradient descent inside the bound, built to answer "how robust is the defense
really" (Athalye et al. 2018; Carlini et al. 2019; Tramer et al. 2020):

* **Threat model**: the L2 ball of normalised radius ``eps`` (default 0.05, i.e. a Euclidean
  radius ``0.05 * sqrt(C*H*W)``) or the Linf ball of radius ``eps`` (default 8/255),
  intersected with the [0,1] box.
* **Gradient**: BPDA through the non-differentiable parts of the defense (real gradient
  through its differentiable parts; see :class:`~.bpda.BPDA`, ``approx=None``) and EOT over
  ``eot`` draws per step (default 30): the objective is the mean over draws of the per-draw
  loss, so its gradient is the mean of the per-draw gradients (Athalye et al.'s EOT).
* **Steps**: random start (uniform in the Linf ball; uniform radius and direction in the L2
  ball), ``steps`` (default 200) sign (Linf) or L2-normalised (L2) steps with a cosine-decayed
  step size from ``step_fraction * eps`` (0.25) down to 1% of it, projection after each step.
* **Losses**: cross-entropy and the C&W margin (``kappa`` 20, so a met goal keeps being
  pushed for a margin), one restart per loss by default; an image already fooled by every draw
  of a previous restart is not attacked again (auto-attack's "only still-robust points").
* **Best iterate**: per image, the iterate with the highest success frequency over the EOT
  draws of its step (draws the attack sees anyway), ties broken by the lowest mean probability
  of the true class (untargeted) / highest of the target (targeted). This selection uses the
  attack's own draws only.
* **Verdict on fresh draws**: the kept images are judged on ``draws`` (R >= 10) fresh draws of
  the defended model, from generators never used during the attack. Reported in
  ``AttackResult.info``:

  - ``robust_accuracy_expected``: mean over images of the fraction of draws classified
    correctly (the expected robust accuracy over draws); ``robust_accuracy_worst``: fraction of
    images classified correctly under *every* draw (an image counts as broken if any draw is
    fooled);
  - ``asr_expected`` / ``asr_worst``: the same for success (targeted: predicted as the target;
    untargeted: not predicted as the label), worst = fooled under *some* draw;
  - 95% intervals: Wilson score intervals for the worst-case figures (one Bernoulli per image)
    and percentile bootstrap over images (2000 resamples, seeded) for the expected figures
    (a mean of per-image fractions). Intervals are over the image sample, draws held fixed.

``success`` in the result is the worst-case verdict (fooled under some fresh draw). The
``model`` is the deployed model ``Defended(defense, classifier)`` (or a bare classifier);
the attack differentiates ``with_bpda(model, approx)`` and judges on ``model`` as given.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from ..metrics import PAPER_L2_BOUND, PAPER_LINF_BOUND, l2_rms, linf
from ..seeding import child_seed, ensure_generator, make_generator, rand, randn
from ._registry import register
from .base import AttackResult
from .bpda import with_bpda
from .eot import EOT
from .losses import objective

__all__ = ["AdaptiveAttack", "wilson_interval", "bootstrap_interval", "evaluate_on_draws", "project"]


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> Tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = successes / n
    den = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    lo, hi = centre - half, centre + half
    return (0.0 if lo < 1e-12 else lo, 1.0 if hi > 1 - 1e-12 else hi)


def bootstrap_interval(values: torch.Tensor, *, generator: torch.Generator, resamples: int = 2000, level: float = 0.95) -> Tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampling images)."""
    v = values.detach().double().cpu().flatten()
    n = v.numel()
    if n == 0:
        return (float("nan"), float("nan"))
    idx = torch.randint(0, n, (resamples, n), generator=generator)
    means = v[idx].mean(dim=1)
    lo = float(torch.quantile(means, (1 - level) / 2))
    hi = float(torch.quantile(means, 1 - (1 - level) / 2))
    m = float(v.mean())
    return (min(lo, m), max(hi, m))


def project(x_adv: torch.Tensor, x: torch.Tensor, norm: str, radius: float) -> torch.Tensor:
    """Project onto the ``norm`` ball of Euclidean/Linf ``radius`` around ``x`` and the [0,1] box."""
    d = x_adv - x
    if norm == "linf":
        d = d.clamp(-radius, radius)
    else:
        nrm = d.flatten(1).norm(dim=1).clamp_min(1e-12)
        d = d * (radius / nrm).clamp(max=1.0).view(-1, *([1] * (d.dim() - 1)))
    return (x + d).clamp(0.0, 1.0)


def _forward(model: nn.Module, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return model(x, generator=g) if getattr(model, "randomized", False) else model(x)


@torch.no_grad()
def evaluate_on_draws(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor], *, draws: int, generator: torch.Generator) -> Dict[str, Any]:
    """Judge ``x`` on ``draws`` fresh draws of ``model``; per-image and summary figures.

    Returns a dict with ``correct`` and ``fooled`` (draws x N bool), and the summary keys
    documented in the module docstring.
    """
    r = draws if getattr(model, "randomized", False) else 1
    preds = torch.stack([_forward(model, x, make_generator(child_seed(generator))).argmax(1) for _ in range(r)]).cpu()
    labels_c = labels.cpu()
    correct = preds == labels_c
    fooled = preds == targets.cpu() if targets is not None else ~correct
    n = x.shape[0]
    boot_g = make_generator(child_seed(generator))
    acc_frac = correct.float().mean(0)
    fool_frac = fooled.float().mean(0)
    acc_worst = int(correct.all(0).sum())
    fool_worst = int(fooled.any(0).sum())
    return {
        "draws": r,
        "n": n,
        "robust_accuracy_expected": float(acc_frac.mean()),
        "robust_accuracy_expected_ci95": bootstrap_interval(acc_frac, generator=boot_g),
        "robust_accuracy_worst": acc_worst / n,
        "robust_accuracy_worst_ci95": wilson_interval(acc_worst, n),
        "asr_expected": float(fool_frac.mean()),
        "asr_expected_ci95": bootstrap_interval(fool_frac, generator=boot_g),
        "asr_worst": fool_worst / n,
        "asr_worst_ci95": wilson_interval(fool_worst, n),
        "per_image_correct_fraction": acc_frac.tolist(),
        "per_image_fooled_fraction": fool_frac.tolist(),
        "correct": correct,
        "fooled": fooled,
    }


class AdaptiveAttack:
    """EOT-PGD with BPDA, two losses, best iterate, verdict on fresh draws (module docstring).

    Args:
        norm: ``"l2"`` (normalised radius) or ``"linf"``.
        eps: bound; normalised RMS for L2 (default 0.05), max-abs for Linf (default 8/255).
        steps: PGD steps per restart (>= 200 recommended; default 200).
        eot: draws averaged per step (default 30; ignored for deterministic models).
        losses: losses to run, one restart each (``"ce"``, ``"margin"``).
        restarts: total restarts (default ``len(losses)``), cycling through ``losses``.
        step_fraction: initial step size as a fraction of the radius (0.25).
        kappa: margin-loss confidence (20).
        draws: fresh draws for the verdict (R >= 10).
        approx: BPDA approximation (None: auto, see ``BPDA``).
        chunk: EOT draws per classifier call (memory).
        batch_size: images attacked together (None: all).
        random_start: start from a random point of the ball.
        progress: optional ``progress(done_steps, total_steps)`` callable.

    Shape: x (N, C, H, W) in [0,1]; labels, targets (N,) int64 (targets None: untargeted).
    """

    #: ``eps`` in L2 is the normalised (RMS) radius, not a Euclidean one.
    eps_is_normalised = True

    def __init__(
        self,
        *,
        norm: str = "l2",
        eps: Optional[float] = None,
        steps: int = 200,
        eot: int = 30,
        losses: Sequence[str] = ("ce", "margin"),
        restarts: Optional[int] = None,
        step_fraction: float = 0.25,
        kappa: float = 20.0,
        draws: int = 10,
        approx: Any = None,
        chunk: Optional[int] = None,
        batch_size: Optional[int] = None,
        random_start: bool = True,
        progress: Optional[Callable[[int, int], None]] = None,
    ) -> None:
        norm = norm.lower()
        if norm not in ("l2", "linf"):
            raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
        if isinstance(losses, str):
            losses = tuple(s.strip() for s in losses.split(","))
        if not losses or any(l not in ("ce", "margin") for l in losses):
            raise ValueError(f"losses must be a non-empty subset of ('ce', 'margin'), got {losses!r}")
        if steps < 1 or eot < 1 or draws < 1:
            raise ValueError("steps, eot and draws must be >= 1")
        self.norm = norm
        self.eps = float(eps) if eps is not None else (PAPER_L2_BOUND if norm == "l2" else PAPER_LINF_BOUND)
        self.steps = int(steps)
        self.eot = int(eot)
        self.losses = tuple(losses)
        self.restarts = int(restarts) if restarts is not None else len(self.losses)
        self.step_fraction = float(step_fraction)
        self.kappa = float(kappa)
        self.draws = int(draws)
        self.approx = approx
        self.chunk = chunk
        self.batch_size = batch_size
        self.random_start = bool(random_start)
        self.progress = progress

    def radius(self, shape) -> float:
        """Euclidean (L2) or Linf radius for images of ``shape`` (C, H, W)."""
        if self.norm == "linf":
            return self.eps
        c, h, w = shape[-3:]
        return self.eps * math.sqrt(c * h * w)

    def _start(self, x: torch.Tensor, radius: float, g: torch.Generator) -> torch.Tensor:
        if not self.random_start:
            return x.clone()
        if self.norm == "linf":
            d = (rand(x.shape, g, device=x.device, dtype=x.dtype) * 2 - 1) * radius
        else:
            d = randn(x.shape, g, device=x.device, dtype=x.dtype)
            d = d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            d = d * radius * rand((x.shape[0], 1, 1, 1), g, device=x.device, dtype=x.dtype)
        return project(x + d, x, self.norm, radius)

    def _pgd(self, grad_model, x, labels, targets, loss_name, g, stats, tick):
        """One restart; returns (best images, best success frequency, best goal probability)."""
        n = x.shape[0]
        radius = self.radius(x.shape)
        targeted = targets is not None
        x_adv = self._start(x, radius, make_generator(child_seed(g)))
        best_x = x_adv.clone()
        best_freq = torch.full((n,), -1.0, device=x.device)
        best_prob = torch.full((n,), float("inf"), device=x.device)  # lower is better (sign-adjusted)
        eot = EOT(grad_model, self.eot, chunk=self.chunk, reduce="none")
        alpha0 = self.step_fraction * radius
        for t in range(self.steps + 1):
            xa = x_adv.detach().requires_grad_(t < self.steps)
            with torch.set_grad_enabled(t < self.steps):
                z = eot(xa, generator=make_generator(child_seed(g)))  # (draws, N, K)
                k = z.shape[0]
                zf = z.reshape(k * n, -1)
                obj = objective(loss_name, zf, labels.repeat(k), None if targets is None else targets.repeat(k), kappa=self.kappa)
                obj = obj.view(k, n).mean(0)
            # Score of the current iterate from the draws just computed.
            with torch.no_grad():
                zd = z.detach()
                pred = zd.argmax(2)
                hit = (pred == targets) if targeted else (pred != labels)
                freq = hit.float().mean(0)
                probs = zd.softmax(2).mean(0)
                goal_p = probs.gather(1, (targets if targeted else labels)[:, None]).squeeze(1)
                score_p = -goal_p if targeted else goal_p
                better = (freq > best_freq) | ((freq == best_freq) & (score_p < best_prob))
                best_x[better] = x_adv[better].detach()
                best_freq = torch.where(better, freq, best_freq)
                best_prob = torch.where(better, score_p, best_prob)
            if t == self.steps:
                break
            (grad,) = torch.autograd.grad(obj.sum(), xa)
            flat = grad.flatten(1)
            bad = ~torch.isfinite(flat).all(1)
            zero = flat.abs().amax(1) == 0
            stats["nonfinite_gradients"] += int(bad.sum())
            stats["zero_gradients"] += int((zero & ~bad).sum())
            stats["gradient_evaluations"] += n
            grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
            alpha = alpha0 * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t / self.steps)))
            with torch.no_grad():
                if self.norm == "linf":
                    step = grad.sign()
                else:
                    step = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
                x_adv = project(x_adv + alpha * step, x, self.norm, radius)
            tick()
        return best_x, best_freq, best_prob

    def _attack_batch(self, model, x, labels, targets, g, tick, stats):
        grad_model = with_bpda(model, self.approx)
        n = x.shape[0]
        best_x = x.clone()
        best_freq = torch.full((n,), -1.0, device=x.device)
        best_prob = torch.full((n,), float("inf"), device=x.device)
        per_loss_best: Dict[str, int] = {}
        for r in range(self.restarts):
            loss_name = self.losses[r % len(self.losses)]
            idx = (best_freq < 1.0).nonzero(as_tuple=True)[0]
            rg = make_generator(child_seed(g))
            if idx.numel() == 0:
                for _ in range(self.steps):
                    tick()
                continue
            bx, bf, bp = self._pgd(
                grad_model, x[idx], labels[idx], None if targets is None else targets[idx], loss_name, rg, stats,
                tick,
            )
            better = (bf > best_freq[idx]) | ((bf == best_freq[idx]) & (bp < best_prob[idx]))
            sel = idx[better]
            best_x[sel] = bx[better]
            best_freq[sel] = bf[better]
            best_prob[sel] = bp[better]
            per_loss_best[loss_name] = per_loss_best.get(loss_name, 0) + int(better.sum())
        return best_x, best_freq, per_loss_best

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        *,
        labels: torch.Tensor,
        targets: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> AttackResult:
        g = ensure_generator(generator)
        attack_g = make_generator(child_seed(g))
        verdict_g = make_generator(child_seed(g))  # never used while attacking
        bs = self.batch_size or x.shape[0]
        total = self.restarts * self.steps * math.ceil(x.shape[0] / bs)
        done = [0]

        def tick() -> None:
            done[0] += 1
            if self.progress is not None:
                self.progress(done[0], total)

        stats = {"zero_gradients": 0, "nonfinite_gradients": 0, "gradient_evaluations": 0}
        outs, freqs, per_loss = [], [], {}
        for start in range(0, x.shape[0], bs):
            sl = slice(start, start + bs)
            bx, bf, pl = self._attack_batch(model, x[sl], labels[sl], None if targets is None else targets[sl], make_generator(child_seed(attack_g)), tick, stats)
            outs.append(bx)
            freqs.append(bf)
            for k, v in pl.items():
                per_loss[k] = per_loss.get(k, 0) + v
        x_adv = torch.cat(outs)
        verdict = evaluate_on_draws(model, x_adv, labels, targets, draws=self.draws, generator=verdict_g)
        fooled = verdict.pop("fooled")
        verdict.pop("correct")
        success = fooled.any(0)
        dist = l2_rms(x_adv, x) if self.norm == "l2" else linf(x_adv, x)
        info = {
            **verdict,
            "attack_draw_success_frequency": torch.cat(freqs).tolist(),
            "best_from_loss": per_loss,
            "norm": self.norm,
            "eps": self.eps,
            "radius": self.radius(x.shape),
            "steps": self.steps,
            "eot": self.eot,
            "restarts": self.restarts,
            "losses": list(self.losses),
            "targeted": targets is not None,
            "max_distance": float(dist.max()) if dist.numel() else 0.0,
            "gradient_stats": stats,
        }
        return AttackResult(adversarial=x_adv, success=success, history=[], info=info)


register("adaptive", help="strong adaptive attack: EOT-PGD with BPDA, CE+margin, best iterate, verdict on fresh draws")(AdaptiveAttack)
