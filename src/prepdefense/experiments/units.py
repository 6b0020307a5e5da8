"""Units of work of ``prepdefense reproduce`` and the presets that size them (issue 5, items 1-2, 4).

A unit is one (experiment x defense x attack [x variant] x image shard): it runs on its
own, from the run's seed and its own id (so its result does not depend on which units ran
before it, on which machine, or in which order), and writes one atomic file (``store.py``).
Each experiment's module plans its own units (``experiment.py``; the list of experiments is
``registry.py``). A *preset* fixes the sizes: ``paper`` (the paper's: 100 images, 50 BPDA rounds continued
to the l2 bound, EOT 30, PGD-1000, C&W 5x1000, adaptive 200 steps with EOT 30 judged on
R = 10 draws), ``quick`` (everything shrunk to finish within about 20 minutes on 2 CPU
cores, and the report lists what was shrunk), and ``smoke`` (tiny, for tests).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple

__all__ = [
    "AttackSpec",
    "Preset",
    "PRESETS",
    "Unit",
    "get_preset",
    "unit_seed",
    "n_shards",
    "shard_slice",
    "shard_len",
    "dedupe_units",
    "ensemble_size",
    "OUR_DEFENSE",
]

#: The paper's defense (Section 5): DCT quantization with the learned table, then grid distortion.
OUR_DEFENSE = "dct-distort"

@dataclass(frozen=True)
class AttackSpec:
    """A standard attack of Tables 2-4: its row label, registry name and hyperparameters.

    ``paper`` names the paper's setting when the preset shrinks it (e.g. PGD-1000 run with
    100 steps), so the report can say so.
    """

    label: str
    name: str
    params: Tuple[Tuple[str, Any], ...] = ()
    targeted: bool = True
    paper: str = ""
    cost_per_image: float = 1.0

    @property
    def kwargs(self) -> Dict[str, Any]:
        return dict(self.params)


def _spec(label: str, name: str, *, targeted: bool = True, paper: str = "", cost: float = 1.0, **params: Any) -> AttackSpec:
    return AttackSpec(label, name, tuple(sorted(params.items())), targeted, paper, cost)


@dataclass(frozen=True)
class Preset:
    """The sizes of a run (every field lands in ``run.json`` and in the report)."""

    name: str
    #: Protocol sample size (paper: 100 correctly classified images) and images per unit.
    n_images: int
    shard_size: int
    #: Table 1 images (paper: 1000 random ImageNet images; any label, not only correct ones).
    table1_images: int
    #: Fresh draws of a random defense when measuring its accuracy (PROTOCOL.md: R >= 10).
    eval_draws: int
    #: BPDA / BPDA+EOT: rounds of the curves, the round cap when continuing to the l2 bound,
    #: the EOT ensemble, and the defenses of Fig. 4 a/b (BPDA) and c/d (BPDA+EOT).
    bpda_rounds: int
    bpda_max_rounds: int
    eot: int
    fig4_bpda_defenses: Tuple[str, ...]
    fig4_eot_defenses: Tuple[str, ...]
    #: Tables 2-4.
    table2_attacks: Tuple[AttackSpec, ...]
    deltas: Tuple[float, ...]
    #: Table 6 combinations and their BPDA rounds.
    table6_defenses: Tuple[str, ...]
    table6_rounds: int
    #: Section 6.4: approximator training images (disjoint from the sample), optimisation steps,
    #: batch size, patch side (None: whole images), and the rounds of BPDA through it.
    learned_train_images: int
    learned_steps: int
    learned_batch: int
    learned_patch: Optional[int]
    learned_rounds: int
    #: Strong attack (the ensemble, ``strong_budget`` below): defenses, norms, image shards used; the
    #: adaptive attack's steps, EOT, draws R and losses size its diagnostics (R: at least 10 for the verdict).
    strong_defenses: Tuple[str, ...]
    strong_norms: Tuple[str, ...]
    adaptive_steps: int
    adaptive_eot: int
    adaptive_draws: int
    adaptive_losses: Tuple[str, ...]
    strong_shards: Optional[int]
    diagnostics_defenses: Tuple[str, ...]
    diagnostics_norms: Tuple[str, ...]
    #: Ensemble size of Guo et al.'s random crop (paper: 30); smaller in shrunk presets.
    crop_ensemble: int = 30
    #: Usability (clean accuracy of every defense, ``experiments/usability.py``): protocol
    #: images (paper Table 1: 1000) and draws per random defense.
    usability_images: int = 1000
    usability_draws: int = 3
    #: The attack ensemble of the strong-attack section (``attacks.ensemble.BUDGETS``, as
    #: ``prepdefense evaluate --budget``); ``adaptive_*`` above size its diagnostics.
    strong_budget: str = "paper"
    #: What differs from the paper's sizes, in words (the report prints it).
    shrunk: Tuple[str, ...] = ()

    def as_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["table2_attacks"] = [
            {"label": a.label, "name": a.name, "params": dict(a.params), "targeted": a.targeted, "paper": a.paper}
            for a in self.table2_attacks
        ]
        return d

    def attack_spec(self, label: str) -> AttackSpec:
        for a in self.table2_attacks:
            if a.label == label:
                return a
        raise KeyError(f"no standard attack {label!r} in preset {self.name!r}")

    def shards(self) -> range:
        """The image shards of the protocol sample (``shard_size`` images each, the last maybe fewer)."""
        return range(n_shards(self.n_images, self.shard_size))

    def shard_images(self, shard: int) -> int:
        """How many protocol images shard ``shard`` holds."""
        return shard_len(shard, self.shard_size, self.n_images)

    def with_overrides(self, **fields: Any) -> "Preset":
        return dataclasses.replace(self, **fields)


ALL_BASELINES = ("fd", "rand", "shield", "tv", "jpeg", "bdr", "pd")
TABLE6 = (OUR_DEFENSE, "dct-quant+rand", "fd+grid-distort", "fd+rand")
DELTAS = (0.01, 0.05, 0.10, 0.15, 0.20, 0.25, 0.30)
#: PGD's Linf radius in Tables 2-3: the paper does not state it; we take its Linf bound 8/255.
PGD_EPS = 8.0 / 255.0


def _table2(pgd_long: int, cw: Tuple[int, int], lbfgs: Tuple[int, int], deepfool_steps: int, bim_steps: int = 10, pgd_short: int = 50, initial_const: float = 0.01) -> Tuple[AttackSpec, ...]:
    """The standard attacks of Tables 2-4 (paper Section 6.5; PROTOCOL.md "Attacks").

    ``paper`` is filled only where the preset departs from the paper's setting.
    ``initial_const`` starts the C&W / L-BFGS binary search; the paper's 0.01 needs its full
    5 x 1000 budget to climb, so shortened presets start higher (a stronger, not weaker, start:
    with 0.01 and 2 x 25 iterations C&W finds nothing).
    """
    bim_note = "" if bim_steps == 10 else "10 iterations"
    search_note = "5 binary-search steps x 1000 iterations"
    return (
        _spec("FGSM (eps=0.01)", "fgsm", eps=0.01, cost=1),
        _spec("FGSM (eps=0.03)", "fgsm", eps=0.03, cost=1),
        _spec("I-FGSM (eps=0.01)", "bim", eps=0.01, steps=bim_steps, paper=bim_note, cost=bim_steps),
        _spec("I-FGSM (eps=0.03)", "bim", eps=0.03, steps=bim_steps, paper=bim_note, cost=bim_steps),
        _spec("PGD-50", "pgd", eps=PGD_EPS, steps=pgd_short, paper="" if pgd_short == 50 else "50 steps", cost=pgd_short),
        _spec("PGD-1000", "pgd", eps=PGD_EPS, steps=pgd_long, paper="" if pgd_long == 1000 else "1000 steps", cost=pgd_long),
        _spec("L-BFGS", "lbfgs", binary_search_steps=lbfgs[0], max_iterations=lbfgs[1], initial_const=initial_const,
              paper="" if tuple(lbfgs) == (5, 1000) else search_note, cost=1.5 * lbfgs[0] * lbfgs[1]),
        _spec("C&W", "cw", binary_search_steps=cw[0], steps=cw[1], lr=0.1, initial_const=initial_const,
              paper="" if tuple(cw) == (5, 1000) else search_note, cost=cw[0] * cw[1]),
        _spec("DeepFool", "deepfool", targeted=False, steps=deepfool_steps, cost=3 * deepfool_steps),
    )


PRESETS: Dict[str, Preset] = {
    "paper": Preset(
        name="paper",
        n_images=100,
        shard_size=10,
        table1_images=1000,
        eval_draws=10,
        bpda_rounds=50,
        bpda_max_rounds=300,
        eot=30,
        fig4_bpda_defenses=(OUR_DEFENSE,) + ALL_BASELINES,
        fig4_eot_defenses=(OUR_DEFENSE, "rand", "crop"),
        table2_attacks=_table2(pgd_long=1000, cw=(5, 1000), lbfgs=(5, 1000), deepfool_steps=50),
        deltas=DELTAS,
        table6_defenses=TABLE6,
        table6_rounds=50,
        learned_train_images=500,
        learned_steps=2000,
        learned_batch=16,
        learned_patch=None,
        learned_rounds=50,
        strong_defenses=(OUR_DEFENSE,) + ALL_BASELINES + ("crop",),
        strong_norms=("l2", "linf"),
        adaptive_steps=200,
        adaptive_eot=30,
        adaptive_draws=10,
        adaptive_losses=("ce", "margin"),
        strong_shards=None,
        diagnostics_defenses=(OUR_DEFENSE,) + ALL_BASELINES + ("crop",),
        diagnostics_norms=("l2",),
        crop_ensemble=30,
        shrunk=(),
    ),
    "quick": Preset(
        name="quick",
        n_images=8,
        shard_size=4,
        table1_images=16,
        eval_draws=3,
        bpda_rounds=10,
        bpda_max_rounds=10,
        eot=3,
        fig4_bpda_defenses=(OUR_DEFENSE,) + ALL_BASELINES,
        fig4_eot_defenses=(OUR_DEFENSE, "rand", "crop"),
        table2_attacks=_table2(pgd_long=60, cw=(2, 25), lbfgs=(2, 15), deepfool_steps=20, initial_const=10.0),
        deltas=DELTAS,
        table6_defenses=TABLE6,
        table6_rounds=10,
        learned_train_images=24,
        learned_steps=40,
        learned_batch=8,
        learned_patch=64,
        learned_rounds=10,
        strong_defenses=(OUR_DEFENSE,) + ALL_BASELINES + ("crop",),
        strong_norms=("l2", "linf"),
        adaptive_steps=10,
        adaptive_eot=2,
        adaptive_draws=4,
        adaptive_losses=("ce",),
        strong_shards=1,
        diagnostics_defenses=(OUR_DEFENSE,),
        diagnostics_norms=("l2",),
        crop_ensemble=4,
        strong_budget="reproduce-quick",
        usability_images=40,
        shrunk=(
            "usability (clean accuracy) on 40 protocol images instead of 1000",
            "8 protocol images instead of 100 (strong attack ensemble: the first 4 only)",
            "Table 1 on 16 images instead of 1000; accuracy of random defenses over 3 draws instead of 10",
            "BPDA / BPDA+EOT: 10 rounds instead of 50 (and not continued to the l2 bound); EOT 3 instead of 30",
            "PGD-1000 run with 60 steps; C&W with 2 binary-search steps x 25 iterations and L-BFGS with 2 x 15, instead of 5 x 1000, both starting the search at c = 10 instead of 0.01; DeepFool at most 20 steps",
            "Section 6.4: approximator trained on 24 images for 40 steps of 8 random 64x64 patches (paper preset: 500 images, 2000 steps of 16 whole images); its BPDA attack runs 10 rounds",
            "strong attack: the ensemble's reproduce-quick budget (APGD-CE, APGD-DLR, EOT-PGD and transfer with 10 steps, EOT 2, Square with 100 queries) instead of the paper budget; its diagnostics: 10 steps instead of 200, EOT 2 instead of 30, cross-entropy only",
            "random crop ensemble of 4 crops instead of 30",
            "diagnostics for our defense only, L2 only",
        ),
    ),
    "smoke": Preset(
        name="smoke",
        n_images=2,
        shard_size=2,
        table1_images=2,
        eval_draws=2,
        bpda_rounds=2,
        bpda_max_rounds=2,
        eot=2,
        fig4_bpda_defenses=(OUR_DEFENSE, "fd"),
        fig4_eot_defenses=(OUR_DEFENSE,),
        table2_attacks=_table2(pgd_long=3, cw=(1, 3), lbfgs=(1, 3), deepfool_steps=2, bim_steps=2, pgd_short=2),
        deltas=(0.05, 0.15),
        table6_defenses=(OUR_DEFENSE, "fd+rand"),
        table6_rounds=2,
        learned_train_images=2,
        learned_steps=2,
        learned_batch=2,
        learned_patch=32,
        learned_rounds=2,
        strong_defenses=(OUR_DEFENSE, "jpeg"),
        strong_norms=("l2", "linf"),
        adaptive_steps=2,
        adaptive_eot=2,
        adaptive_draws=2,
        adaptive_losses=("ce",),
        strong_shards=1,
        diagnostics_defenses=(OUR_DEFENSE,),
        diagnostics_norms=("l2",),
        crop_ensemble=2,
        usability_images=3,
        usability_draws=2,
        strong_budget="smoke",
        shrunk=("smoke test: 2 images, 2 rounds, 2 steps; the numbers mean nothing",),
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None


@dataclass(frozen=True)
class Unit:
    """One unit of work; ``id`` is its key in the store.

    Attributes:
        experiment: which table/figure it feeds (``registry.names()``); the unit's file lives
            under ``units/<experiment>/``.
        defense: defense name (``none`` for the bare model).
        attack: attack label (``clean`` for no attack, ``bpda``, ``bpda-eot``, a Table 2
            label, ``adaptive``, ``diagnostics``, ``train``...).
        variant: extra key, e.g. ``delta=0.05`` or ``norm=l2``.
        shard: image shard index (images ``shard*size .. (shard+1)*size-1`` of the sample).
        cost: rough cost in image forward+backward passes (only for progress/ETA).
    """

    experiment: str
    defense: str
    attack: str
    shard: int
    variant: str = ""
    cost: float = field(default=1.0, compare=False)

    @property
    def id(self) -> str:
        parts = [self.experiment, self.defense, self.attack]
        if self.variant:
            parts.append(self.variant)
        parts.append(f"s{self.shard}")
        return "/".join(parts)

    @property
    def stream(self) -> str:
        """The unit's id without its image shard: the seed of its per-image draw keys
        (``RunContext.image_key``), so an image's draws do not depend on which shard holds it.
        (Fig. 4's stage-wise units take the stream of the paper's unit instead, ``fig4.draw_unit``.)"""
        parts = [self.experiment, self.defense, self.attack] + ([self.variant] if self.variant else [])
        return "/".join(parts)

    @property
    def key(self) -> Dict[str, Any]:
        return {"defense": self.defense, "attack": self.attack, "variant": self.variant, "shard": self.shard}

    @property
    def params(self) -> Dict[str, str]:
        """``variant`` parsed (``"norm=l2,delta=0.05"`` -> dict)."""
        out: Dict[str, str] = {}
        for part in self.variant.split(","):
            if "=" in part:
                k, v = part.split("=", 1)
                out[k] = v
        return out


def unit_seed(run_seed: int, unit_id: str) -> int:
    """A 63-bit seed from the run's seed and the unit's id (order- and machine-independent)."""
    digest = hashlib.sha256(f"{int(run_seed)}|{unit_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def n_shards(n_images: int, shard_size: int) -> int:
    return max(1, -(-int(n_images) // int(shard_size)))


def shard_slice(shard: int, shard_size: int, n_images: int) -> slice:
    start = shard * shard_size
    return slice(start, min(n_images, start + shard_size))


def shard_len(shard: int, shard_size: int, n_images: int) -> int:
    """How many images shard ``shard`` holds (the last one may be short)."""
    return len(range(*shard_slice(shard, shard_size, n_images).indices(n_images)))


def ensemble_size(preset: Preset, defense: str) -> int:
    """Classifications per draw of ``defense`` (Guo et al.'s crop classifies an ensemble of crops)."""
    return preset.crop_ensemble if defense == "crop" else 1


def dedupe_units(units: Iterable[Unit]) -> List[Unit]:
    """``units`` in order, each id once (two experiments may plan the same unit)."""
    seen = set()
    out = []
    for u in units:
        if u.id not in seen:
            seen.add(u.id)
            out.append(u)
    return out
