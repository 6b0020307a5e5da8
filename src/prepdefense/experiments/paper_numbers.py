"""The paper's numbers, quoted, to set beside ours in the report.

Sources: PROTOCOL.md "The paper's numbers to set beside ours" and the paper's Tables 1-6,
Section 6.2-6.4 text (Qiu et al.). The paper ran Inception V3 on 100 ImageNet validation
images (Table 1: 1000 images); we run another model on other images, so the report compares
trends and orders, never asks for equality. Nothing here is used to check our results.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

__all__ = [
    "MODEL_AND_DATA",
    "TABLE1",
    "FIG4",
    "TABLE2",
    "TABLE3",
    "TABLE4_DELTAS",
    "TABLE4",
    "TABLE5",
    "TABLE5_OURS",
    "TABLE6",
    "SECTION_6_4",
    "ROBUST_CLAIMS",
    "DEFENSE_LABELS",
]

MODEL_AND_DATA = "Inception V3 (299x299) on 100 correctly classified ImageNet validation images (Table 1: 1000 images)"

#: Our registry names -> the paper's row labels.
DEFENSE_LABELS: Dict[str, str] = {
    "dct-distort": "Our method",
    "rand": "Rand",
    "fd": "FD",
    "shield": "SHIELD",
    "tv": "TV",
    "jpeg": "JPEG",
    "bdr": "BdR",
    "pd": "PD",
    "crop": "Random Crop",
    "dct-quant+rand": "Our quantization + Rand",
    "fd+grid-distort": "FD + our image distortion",
    "fd+rand": "FD + Rand",
    "none": "No defense",
}

#: Table 1: defense -> (l2, SSIM, ACC) between two random outputs of g on the same image.
TABLE1: Dict[str, Tuple[float, float, float]] = {
    "dct-distort": (0.22, 0.30, 0.95),
    "rand": (0.21, 0.31, 0.96),
    "fd": (0.00, 1.00, 0.97),
    "shield": (0.03, 0.88, 0.94),
    "tv": (0.02, 0.97, 0.95),
    "bdr": (0.00, 1.00, 0.92),
    "pd": (0.02, 0.98, 0.97),
}

#: Fig. 4 as quoted in Sections 6.2-6.3 (the figure itself gives curves we cannot read off
#: exactly). Keys: (attack, defense) -> {"round": r, "acc": a, "asr": s} points; "bound" marks
#: the values where the l2 bound is reached. ``None`` = not stated.
FIG4: Dict[Tuple[str, str], Dict[str, Dict[str, Optional[float]]]] = {
    ("bpda", "dct-distort"): {"50": {"acc": 0.70, "asr": 0.0}, "bound": {"round": 231, "acc": 0.57, "asr": 0.02}},
    ("bpda", "fd"): {"50": {"acc": 0.40, "asr": 0.20}},  # "ASR lower than 20%, ACC around 40%"
    ("bpda", "rand"): {"50": {"acc": None, "asr": None}},  # "slightly lower ACC than ours"
    ("bpda", "shield"): {"50": {"acc": 0.05, "asr": 0.90}},  # "below 5% ACC, ASR higher than 90%"
    ("bpda", "tv"): {"50": {"acc": 0.05, "asr": 0.90}},
    ("bpda", "jpeg"): {"50": {"acc": 0.05, "asr": 0.90}},
    ("bpda", "bdr"): {"50": {"acc": 0.05, "asr": 0.90}},
    ("bpda", "pd"): {"50": {"acc": 0.05, "asr": 0.90}},
    ("bpda-eot", "dct-distort"): {"50": {"acc": 0.60, "asr": 0.10}, "bound": {"acc": 0.58, "asr": 0.07}},
    ("bpda-eot", "rand"): {"20": {"acc": 0.20, "asr": None}, "50": {"acc": None, "asr": 1.0}},
    ("bpda-eot", "crop"): {"20": {"acc": 0.20, "asr": None}, "50": {"acc": None, "asr": 1.0}},
}

#: Which Fig. 4 quotes are upper / lower bounds rather than values ("below 5%", "higher than 90%").
FIG4_QUALIFIERS: Dict[Tuple[str, str], str] = {
    ("bpda", "fd"): "ACC around 0.40, ASR below 0.20",
    ("bpda", "rand"): "ACC slightly below ours, ASR near 0",
    ("bpda", "shield"): "ACC below 0.05, ASR above 0.90",
    ("bpda", "tv"): "ACC below 0.05, ASR above 0.90",
    ("bpda", "jpeg"): "ACC below 0.05, ASR above 0.90",
    ("bpda", "bdr"): "ACC below 0.05, ASR above 0.90",
    ("bpda", "pd"): "ACC below 0.05, ASR above 0.90",
    ("bpda", "dct-distort"): "ACC about 0.70, ASR about 0 at 50 rounds; 0.57 / 0.02 at the bound (231 rounds)",
    ("bpda-eot", "dct-distort"): "ACC about 0.60, ASR below 0.10 at 50 rounds; 0.58 / 0.07 at the bound",
    ("bpda-eot", "rand"): "ACC below 0.20 after 20 rounds, ASR 1.0 after 50",
    ("bpda-eot", "crop"): "ACC below 0.20 after 20 rounds, ASR 1.0 after 50",
}

#: Table 2 (bare model): attack label -> (linf, l2, ACC, ASR); ASR None = "Nan".
TABLE2: Dict[str, Tuple[Optional[float], Optional[float], Optional[float], Optional[float]]] = {
    "clean": (0.000, 0.0000, 1.00, None),
    "FGSM (eps=0.01)": (0.010, 0.0099, 0.36, 0.00),
    "FGSM (eps=0.03)": (0.030, 0.0294, 0.39, 0.00),
    "I-FGSM (eps=0.01)": (0.010, 0.0040, 0.13, 0.79),
    "I-FGSM (eps=0.03)": (0.030, 0.0098, 0.02, 0.95),
    "L-BFGS": (0.021, 0.0013, 0.00, 1.00),
    "C&W": (0.156, 0.0162, 0.00, 1.00),
    # Table 3 gives these two for the bare model (l2, ACC, ASR):
    "PGD-50": (None, 0.002, 0.08, 0.86),
    "PGD-1000": (None, 0.003, 0.00, 1.00),
    "DeepFool": (None, None, None, None),  # not reported by the paper
}

#: Table 3 (our defense): attack label -> (l2, ACC no defense, ASR no defense, ACC ours, ASR ours).
TABLE3: Dict[str, Tuple[Optional[float], Optional[float], Optional[float], Optional[float], Optional[float]]] = {
    "clean": (0.0, 1.00, None, 0.95, None),
    "I-FGSM (eps=0.03)": (0.010, 0.02, 0.95, 0.93, 0.00),  # the paper's "I-FGSM" row (l2 0.010)
    "L-BFGS": (0.001, 0.00, 1.00, 0.91, 0.00),
    "C&W": (0.016, 0.00, 1.00, 0.87, 0.00),
    "PGD-50": (0.002, 0.08, 0.86, 0.92, 0.00),
    "PGD-1000": (0.003, 0.00, 1.00, 0.92, 0.00),
}

TABLE4_DELTAS: Tuple[float, ...] = (0.01, 0.05, 0.10, 0.15, 0.20, 0.25, 0.30)
#: Table 4: attack label -> [(ACC, ASR) per delta in TABLE4_DELTAS]; ASR None = "Nan".
TABLE4: Dict[str, Tuple[Tuple[float, Optional[float]], ...]] = {
    "clean": ((0.95, None), (0.96, None), (0.95, None), (0.95, None), (0.96, None), (0.93, None), (0.91, None)),
    "FGSM (eps=0.01)": ((0.70, 0.0), (0.66, 0.0), (0.69, 0.0), (0.73, 0.0), (0.69, 0.0), (0.75, 0.0), (0.72, 0.0)),
    "FGSM (eps=0.03)": ((0.51, 0.0), (0.51, 0.0), (0.51, 0.0), (0.53, 0.0), (0.55, 0.0), (0.55, 0.0), (0.62, 0.0)),
    "I-FGSM (eps=0.01)": ((0.96, 0.0), (0.05, 0.0), (0.93, 0.0), (0.89, 0.0), (0.90, 0.0), (0.91, 0.0), (0.93, 0.0)),
    "I-FGSM (eps=0.03)": ((0.88, 0.01), (0.90, 0.0), (0.86, 0.0), (0.93, 0.0), (0.92, 0.0), (0.89, 0.0), (0.89, 0.0)),
    "L-BFGS": ((0.95, 0.0), (0.97, 0.0), (0.93, 0.0), (0.91, 0.0), (0.94, 0.0), (0.94, 0.0), (0.88, 0.0)),
    "C&W": ((0.86, 0.0), (0.87, 0.0), (0.85, 0.0), (0.87, 0.0), (0.83, 0.0), (0.83, 0.0), (0.84, 0.0)),
}

#: Table 5 (quoted from the literature by the paper): solution, requirement, attack,
#: robust accuracy at Linf 0.031, at l2 0.05 ("-" = not evaluated).
TABLE5: Tuple[Tuple[str, str, str, str, str], ...] = (
    ("Rand [8]", "preprocessing", "EOT", "0%", "-"),
    ("PixelDefend [43]", "preprocessing, adversarial training", "BPDA", "9%", "-"),
    ("Crop [6]", "preprocessing, adversarial training", "BPDA+EOT", "-", "0%"),
    ("JPEG [6]", "preprocessing, adversarial training", "BPDA", "-", "0%"),
    ("TV [6]", "preprocessing, adversarial training", "BPDA+EOT", "-", "0%"),
    ("Quilting [6]", "preprocessing, adversarial training", "BPDA+EOT", "-", "0%"),
    ("SHIELD [30]", "preprocessing, adversarial training", "BPDA", "-", "0%"),
    ("PD [7]", "preprocessing", "BPDA", "0%", "-"),
    ("Guided Denoiser [44]", "preprocessing", "BPDA", "-", "0%"),
    ("ME-Net [45]", "model modification, preprocessing, adversarial training", "BPDA+EOT", "13%", "-"),
    ("FD [36]", "preprocessing", "BPDA", "-", "10%"),
)
#: The paper's own Table 5 row: BPDA+EOT, l2 bound 0.05 -> 58% accuracy.
TABLE5_OURS = {"attack": "BPDA+EOT", "linf": None, "l2": 0.58}

#: Table 6 (50 rounds of BPDA): defense -> (ACC, ASR).
TABLE6: Dict[str, Tuple[float, float]] = {
    "dct-distort": (0.72, 0.01),
    "dct-quant+rand": (0.70, 0.01),
    "fd+grid-distort": (0.64, 0.02),
    "fd+rand": (0.63, 0.03),
}

#: Section 6.4: approximator quality (mean over 100 images) and the attack's ASR.
SECTION_6_4 = {"l2": 0.16, "ssim": 0.36, "asr": 0.0, "fig5_example": {"l2": 0.22, "ssim": 0.35}}

#: What the paper claims about each defense against its strongest evaluated attack:
#: (robust?, claim in words). Used for the plain-words verdict.
ROBUST_CLAIMS: Dict[str, Tuple[bool, str]] = {
    "dct-distort": (True, "robust: ACC 0.58 / ASR 0.07 under BPDA+EOT at the l2 bound (Section 6.3, Table 5)"),
    "rand": (False, "broken by BPDA+EOT (ASR 1.0 after 50 rounds, Section 6.3)"),
    "crop": (False, "broken by BPDA+EOT (ASR 1.0 after 50 rounds, Section 6.3)"),
    "fd": (False, "partly: ACC about 0.40 under BPDA (Section 6.2); 10% at l2 0.05 in Table 5"),
    "shield": (False, "broken by BPDA (ACC below 0.05, Section 6.2)"),
    "tv": (False, "broken by BPDA (ACC below 0.05, Section 6.2)"),
    "jpeg": (False, "broken by BPDA (ACC below 0.05, Section 6.2)"),
    "bdr": (False, "broken by BPDA (ACC below 0.05, Section 6.2)"),
    "pd": (False, "broken by BPDA (ACC below 0.05, Section 6.2)"),
    "dct-quant+rand": (True, "robust: ACC 0.70 after 50 BPDA rounds (Table 6)"),
    "fd+grid-distort": (True, "robust: ACC 0.64 after 50 BPDA rounds (Table 6)"),
    "fd+rand": (True, "robust: ACC 0.63 after 50 BPDA rounds (Table 6)"),
}
