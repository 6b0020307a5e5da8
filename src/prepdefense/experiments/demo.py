"""The main job on the built-in images: classify them bare and defended, save the clean image
beside two independent defended draws, and write a Markdown summary (issue 2, item 7;
issue 3, item 7).

Structured as small functions so that later sections (attacks) can be added to the same
report: :func:`classify_builtin` computes everything, :func:`save_demo_images` writes the
PNGs, :func:`write_demo_report` the Markdown, and :func:`run_demo` ties them together.
Every file is written atomically (temporary file + ``os.replace``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import data, defenses
from ..defenses import Defended
from ..seeding import child_seed, make_generator
from .demo_attack import attack_builtin, attack_section
from .demo_verdict import StrongVerdict, strong_verdict, verdict_section
from .images import png_bytes, side_by_side, to_pil
from .store import atomic_write_bytes, atomic_write_text, unit_file_name

#: A top-k list: (ImageNet index, class name, probability).
TopK = List[Tuple[int, str, float]]


@dataclass
class DemoImage:
    """One built-in image, its two defended draws and the predictions of both models."""

    id: str
    label: int
    label_name: str
    clean: torch.Tensor  # (3, S, S)
    draws: List[torch.Tensor]  # two independent defended outputs, (3, S', S') each
    top5_bare: TopK
    top5_defended: TopK
    files: Dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.id.split(":", 1)[-1].replace("/", "_")

    @property
    def bare_correct(self) -> bool:
        return self.top5_bare[0][0] == self.label

    @property
    def defended_correct(self) -> bool:
        return self.top5_defended[0][0] == self.label


def default_defense_name() -> str:
    """The paper's ``dct-distort`` when registered, otherwise ``none``."""
    return "dct-distort" if "dct-distort" in defenses.names() else "none"


def top_k(logits: torch.Tensor, k: int = 5) -> List[TopK]:
    """Per row of ``logits`` (N, 1000): the k most probable (index, name, probability)."""
    names = data.imagenet_class_names()
    probs = logits.float().softmax(dim=1)
    values, indices = probs.topk(k, dim=1)
    return [
        [(int(i), names[int(i)], float(v)) for v, i in zip(vs.tolist(), ix.tolist())]
        for vs, ix in zip(values, indices)
    ]


def classify_builtin(
    model: nn.Module,
    defense: nn.Module,
    *,
    seed: int = 0,
    device: torch.device = torch.device("cpu"),
    source: str = "builtin",
) -> List[DemoImage]:
    """Classify the built-in images with ``model`` and ``Defended(defense, model)``.

    Two independent draws of the defense are made per image with generators derived from
    ``seed``; the defended prediction uses a third, independent draw (or, for an ensemble
    defense, ``Defended``'s average over its ensemble).
    """
    x, labels, ids, _ = data.load_images(source, size=model.input_size)
    names = data.imagenet_class_names()
    root = make_generator(seed)
    draw_gens = [make_generator(child_seed(root)) for _ in range(2)]
    predict_gen = make_generator(child_seed(root))
    defended = Defended(defense, model)
    xd = x.to(device)
    with torch.no_grad():
        bare_logits = model(xd).cpu()
        defended_logits = defended(xd, generator=predict_gen).cpu()
        draws = [defense(xd, generator=g).cpu() for g in draw_gens]
    bare_top, defended_top = top_k(bare_logits), top_k(defended_logits)
    return [
        DemoImage(
            id=ids[i],
            label=int(labels[i]),
            label_name=names[int(labels[i])],
            clean=x[i],
            draws=[d[i] for d in draws],
            top5_bare=bare_top[i],
            top5_defended=defended_top[i],
        )
        for i in range(len(ids))
    ]


def save_demo_images(items: Sequence[DemoImage], out_dir: Path, defense_name: str) -> None:
    """Write, per image, the clean PNG, the two defended draws and a clean|draw1|draw2 panel."""
    img_dir = Path(out_dir) / "images"
    tag = defense_name.replace("+", "_")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", tag):  # brackets, commas, a table's path: a safe name + hash
        tag = unit_file_name(tag).rsplit(".", 1)[0]
    for it in items:
        files = {
            "clean": f"images/{it.name}_clean.png",
            "draw1": f"images/{it.name}_{tag}_draw1.png",
            "draw2": f"images/{it.name}_{tag}_draw2.png",
            "panel": f"images/{it.name}_{tag}_panel.png",
        }
        atomic_write_bytes(img_dir / Path(files["clean"]).name, png_bytes(to_pil(it.clean)))
        for j, d in enumerate(it.draws, start=1):
            atomic_write_bytes(img_dir / Path(files[f"draw{j}"]).name, png_bytes(to_pil(d)))
        atomic_write_bytes(img_dir / Path(files["panel"]).name, png_bytes(side_by_side([it.clean, *it.draws])))
        it.files = files


def _format_top5(top: TopK, label: int) -> str:
    return "<br>".join(
        f"{'**' if idx == label else ''}{name} ({idx}) {p:.3f}{'**' if idx == label else ''}" for idx, name, p in top
    )


def write_demo_report(
    items: Sequence[DemoImage],
    out_dir: Path,
    *,
    model_name: str,
    defense_name: str,
    defense_repr: str,
    seed: int,
    device: str,
    extra_sections: Sequence[str] = (),
    filename: str = "README.md",
    headline: Optional[str] = None,
) -> Path:
    """Write the Markdown summary (images, top-5 of bare and defended model) atomically.

    ``extra_sections`` are Markdown blocks appended at the end (for later attack sections).
    """
    n = len(items)
    bare_acc = sum(it.bare_correct for it in items) / max(n, 1)
    def_acc = sum(it.defended_correct for it in items) / max(n, 1)
    lines = [
        "# prepdefense demo",
        "",
        f"Model `{model_name}` on the {n} built-in scikit-image photos, bare and behind the "
        f"defense `{defense_name}` (seed {seed}, device {device}).",
        "",
        f"- Defense: `{defense_repr}`",
        f"- Top-1 accuracy, bare model: {bare_acc:.2f} ({sum(it.bare_correct for it in items)}/{n})",
        f"- Top-1 accuracy, defended model (one draw): {def_acc:.2f} ({sum(it.defended_correct for it in items)}/{n})",
        *([f"- **{headline}** (section 'Strong verdict' below)"] if headline else []),
        "",
        "Each row shows the clean image, then two independent draws of the defense. "
        "The true class is in bold where it appears in a top-5 list.",
        "",
    ]
    if defense_name == "none":
        lines += ["No defense is registered besides `none`, so the two draws equal the clean image.", ""]
    for it in items:
        lines += [
            f"## {it.name}: {it.label_name} ({it.label})",
            "",
            f"![{it.name}: clean | draw 1 | draw 2]({it.files.get('panel', '')})",
            "",
            "| bare model, top-5 | defended model, top-5 |",
            "|---|---|",
            f"| {_format_top5(it.top5_bare, it.label)} | {_format_top5(it.top5_defended, it.label)} |",
            "",
        ]
    for section in extra_sections:
        lines += [section.rstrip(), ""]
    path = Path(out_dir) / filename
    atomic_write_text(path, "\n".join(lines))
    return path


def run_demo(
    model: nn.Module,
    out_dir: os.PathLike,
    *,
    model_name: str,
    defense_name: Optional[str] = None,
    seed: int = 0,
    device: torch.device = torch.device("cpu"),
    attack_rounds: int = 20,
    attack_eot: int = 8,
    strong_budget: Optional[str] = "quick",
) -> Tuple[Path, List[DemoImage], Optional[Dict], Optional[StrongVerdict]]:
    """Classify the built-in images bare and defended, attack them with a short BPDA+EOT run
    (``attack_rounds=0`` skips it) and with the attack ensemble at ``strong_budget`` (None
    skips it; ``demo_verdict.py``), save the images and the report."""
    name = defenses.normalize_name(defense_name or default_defense_name())
    defense = defenses.create(name).to(device)
    items = classify_builtin(model, defense, seed=seed, device=device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_demo_images(items, out, name)
    sections: List[str] = []
    attack_results = None
    if attack_rounds > 0 and items:
        x = torch.stack([it.clean for it in items]).to(device)
        labels = torch.tensor([it.label for it in items])
        attack_results = attack_builtin(
            model, defense, name, x, labels, rounds=attack_rounds, eot=attack_eot, seed=seed, device=device
        )
        sections.append(
            attack_section(attack_results, defense, name, x, [it.id for it in items], out,
                           rounds=attack_rounds, eot=attack_eot, seed=seed)
        )
    verdict = None
    if strong_budget and items and name != "none":
        x = torch.stack([it.clean for it in items])
        labels = torch.tensor([it.label for it in items])
        verdict = strong_verdict(model, defense, name, x, labels, [it.id for it in items], seed=seed,
                                 budget=strong_budget, device=device)
        if verdict is not None:
            sections.append(verdict_section(verdict, x, out))
    report = write_demo_report(
        items, out, model_name=model_name, defense_name=name, defense_repr=" ".join(repr(defense).split()),
        seed=seed, device=str(device), extra_sections=sections,
        headline=verdict.sentence if verdict is not None else None,
    )
    return report, items, attack_results, verdict
