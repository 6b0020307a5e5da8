"""Learn the defensive quantization table from C&W adversarial examples (paper Section 5.2,
Algorithm 2; PROTOCOL.md "The defense g(x)"; issue 4, item 7).

1. Draw the evaluation protocol sample (``exclude_n`` images, ``exclude_sample_seed``, the
   sample every table-3 style evaluation uses) and the usability images
   (``exclude_usability_n``, the same seed) and set them aside, so the table is never learned
   on images it is later judged on. (Table 1 at the paper's size reads 1000 images, nearly
   every image of a 1001-image folder; it cannot be kept disjoint there.)
2. Among the remaining images, draw ``n`` that the undefended model classifies correctly,
   each with a protocol-style random target (uniform over the 999 other classes), with
   ``seed`` (:func:`prepdefense.data.protocol_sample` with ``exclude_ids``).
3. Run targeted C&W L2 on the undefended model (:class:`~prepdefense.attacks.carlini_wagner.CarliniWagnerL2`).
4. Keep the successful (clean, adversarial) pairs -- a failed image comes back unchanged and
   would only add "no change" blocks -- and learn ``Q`` with
   :func:`~prepdefense.defenses.quant_tables.learn_quantization_table`.
5. Save ``Q`` with everything that produced it (model, image ids, targets, attack settings,
   seed, success rate, distances, counts, date, package versions) via ``save_table``.

Resumable: every finished batch of step 3 is saved atomically under ``<out>.partial/`` with
the run's identity (images, targets, model, attack settings); a run killed part-way and
started again with the same arguments attacks only the batches still missing (C&W is
deterministic, so the table equals an uninterrupted run's), and the folder is removed once
the table is written. A folder from other settings is refused (``fresh=True`` clears it).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import torch

from .. import data as data_api
from .. import models
from ..atomic_io import atomic_write_text, atomic_write_with
from ..attacks.carlini_wagner import CarliniWagnerL2
from ..defenses.quant_tables import learn_quantization_table, save_table
from ..errors import DataError
from .metadata import collect_metadata

__all__ = ["learn_table"]


def learn_table(
    *,
    data: str,
    out: Union[str, os.PathLike],
    n: int = 100,
    seed: int = 1,
    exclude_sample_seed: Optional[int] = 0,
    exclude_n: int = 100,
    exclude_usability_n: int = 0,
    steps: int = 1000,
    binary_steps: int = 5,
    lr: float = 0.1,
    initial_const: float = 1e-2,
    abort_early: bool = True,
    batch_size: int = 8,
    model_name: str = models.DEFAULT_MODEL,
    model: Optional[torch.nn.Module] = None,
    device: Union[str, torch.device] = "cpu",
    on_batch: Optional[Callable[[int, int], None]] = None,
    note: str = "",
    fresh: bool = False,
) -> Dict[str, Any]:
    """Run Algorithm 2 end to end and write the table to ``out``.

    Args:
        data: image folder (labels.csv or synset sub-folders) or ``"builtin"``.
        out: JSON file to write (``save_table`` format).
        n: images to attack (correctly classified, disjoint from the evaluation sample).
        seed: draws the learning images and their targets.
        exclude_sample_seed: seed of the evaluation protocol sample to keep out; None
            disables the exclusion.
        exclude_n: size of that evaluation sample (the protocol's 100).
        exclude_usability_n: also keep out the images ``usability`` (and ``reproduce``'s
            usability section) measures clean accuracy on with ``exclude_sample_seed``
            (:func:`~prepdefense.experiments.usability.usability_sample`; its default 200);
            0: not.
        steps, binary_steps, lr, initial_const: C&W settings (paper: 1000, 5, 0.1; c0 0.01).
        abort_early: C&W's abort early (its default): an image whose loss stopped falling is
            frozen for the rest of a binary-search step, checked every ``max(10, steps / 10)``
            iterations (first against the loss at iteration 0), so a step can end at its first
            check (the metadata's ``iterations_run`` says how many ran); False runs every iteration.
        batch_size: images attacked together.
        model_name: classifier to attack (the default model unless told).
        model: an already built classifier (then ``model_name`` is only recorded).
        device: where the model runs.
        on_batch: called as ``on_batch(done, total)`` after each batch (progress).
        note: free text stored in the metadata.
        fresh: delete the checkpoints of an earlier, unfinished run first (otherwise it is
            resumed; see the module docstring).

    Returns:
        A summary dict: ``table`` (8x8 list), ``counts``, ``out``, ``n``, ``n_successful``,
        ``success_rate``, ``mean_l2_rms``, ``seconds`` and the metadata written.

    Raises:
        DataError: too few correctly classified images, no C&W attack succeeded, or the
            checkpoint folder holds a run with other settings.
    """
    device = torch.device(device)
    started = time.time()
    if model is None:
        model = models.create(model_name)
    model = model.to(device).eval()
    size = int(getattr(model, "input_size", 224))
    dataset = data_api.load_dataset(data, size=size)

    excluded: List[str] = []
    if exclude_sample_seed is not None and exclude_n > 0:
        evaluation = data_api.protocol_sample(model, dataset, n=exclude_n, seed=exclude_sample_seed, device=device)
        excluded = list(evaluation.ids)
    usability_ids: List[str] = []
    if exclude_sample_seed is not None and exclude_usability_n > 0:
        from .usability import usability_sample

        try:
            usability_ids = [dataset.ids[i] for i in usability_sample(model, dataset, seed=exclude_sample_seed,
                                                                      n=exclude_usability_n, device=device)]
        except DataError as e:
            raise DataError(f"cannot keep the usability images out: {e}; lower --exclude-usability-n "
                            "(0 disables it)") from None
    sample = data_api.protocol_sample(model, dataset, n=n, seed=seed, device=device, exclude_ids=excluded + usability_ids)
    if set(sample.ids) & (set(excluded) | set(usability_ids)):  # protocol_sample guarantees it; a cheap guard
        raise DataError("learning images overlap the evaluation sample")

    attack = CarliniWagnerL2(binary_search_steps=binary_steps, steps=steps, lr=lr, initial_const=initial_const,
                             abort_early=abort_early)
    adversarial = torch.empty_like(sample.x)
    success = torch.zeros(n, dtype=torch.bool)
    l2_rms = torch.full((n,), math.inf)
    const = torch.full((n,), math.nan, dtype=torch.float64)
    iterations: List[Optional[List[int]]] = []  # per batch: iterations run in each binary-search step
    batch_seconds: List[Optional[float]] = []  # per batch: the attack's wall time, whichever invocation completed it
    identity = {"model": model_name, "weights_sha256": _weights_digest(model), "image_ids": list(sample.ids),
                "targets": sample.targets.tolist(),
                "attack": attack.hyperparameters(), "size": size, "batch_size": int(batch_size)}
    partial = _checkpoints(Path(out), identity, fresh)
    resumed = 0
    for start in range(0, n, batch_size):
        sl = slice(start, min(n, start + batch_size))
        part = partial / f"batch-{sl.start:06d}-{sl.stop:06d}.pt"
        if part.is_file():
            saved = torch.load(part, map_location="cpu", weights_only=True)
            resumed += sl.stop - sl.start
        else:
            batch_started = time.perf_counter()
            res = attack(model, sample.x[sl].to(device), labels=sample.labels[sl].to(device), targets=sample.targets[sl].to(device))
            saved = {"adversarial": res.adversarial.cpu(), "success": res.success.cpu(), "l2_rms": res.info["l2_rms"].float().cpu(),
                     "const": res.info["const"].double().cpu(), "iterations": torch.tensor(res.info["iterations"], dtype=torch.int64),
                     "seconds": torch.tensor(time.perf_counter() - batch_started, dtype=torch.float64)}
            atomic_write_with(part, lambda fh: torch.save(saved, fh))
        adversarial[sl] = saved["adversarial"]
        success[sl] = saved["success"]
        l2_rms[sl] = saved["l2_rms"]
        if "const" in saved:  # checkpoints written before these were kept have neither
            const[sl] = saved["const"]
        iterations.append(saved["iterations"].tolist() if "iterations" in saved else None)
        batch_seconds.append(float(saved["seconds"]) if "seconds" in saved else None)
        if on_batch is not None:
            on_batch(sl.stop, n)

    n_ok = int(success.sum())
    if n_ok == 0:
        raise DataError(f"C&W found no adversarial example on the {n} images; raise --steps or --binary-steps")
    table, counts = learn_quantization_table(sample.x[success], adversarial[success], return_counts=True)
    seconds = time.time() - started

    metadata: Dict[str, Any] = {
        "what": "defensive quantization table learned with Algorithm 2 (paper Section 5.2) from C&W L2 adversarial examples",
        "algorithm": "Q0[argmax |DCT(clean) - DCT(adv)|] += 1 per 8x8 block per channel (0..255 domain); Q = Q0/max(Q0)*80 + 20",
        "model": model_name,
        "attack": "cw",
        "attack_settings": dict(attack.hyperparameters(), targeted=True, loss="C&W margin, kappa 0"),
        "data": sample.source,
        "n_images": n,
        "n_successful": n_ok,
        "success_rate": n_ok / n,
        "mean_l2_rms_successful": float(l2_rms[success].mean()),
        # C&W stops a binary-search step once every image of the batch has stopped improving
        # (abort early, C&W's default): the iterations actually run, per batch and step.
        "iterations_run": {"per_batch_and_binary_step": iterations, "budget_per_binary_step": int(steps),
                           "mean_per_binary_step": _mean_iterations(iterations)},
        "const_of_best": [None if math.isnan(c) else c for c in const.tolist()],
        "image_ids": list(sample.ids),
        "labels": sample.labels.tolist(),
        "targets": sample.targets.tolist(),
        "successful": success.tolist(),
        "seed": int(seed),
        "excluded_evaluation_sample": {
            "seed": exclude_sample_seed,
            "n": exclude_n if excluded else 0,
            "ids": excluded,
        },
        "excluded_usability_sample": {
            "seed": exclude_sample_seed,
            "n": len(usability_ids),
            "ids": usability_ids,
        },
        "counts": counts.tolist(),
        # this invocation's wall time; a resumed run's attack time is spread over invocations:
        # ``attack_seconds`` sums every completed batch's (None for a batch checkpointed before they
        # were kept); the time of a batch killed part-way is not counted
        "seconds": round(seconds, 1),
        "attack_seconds": {"per_batch": [None if t is None else round(t, 1) for t in batch_seconds],
                           "total": None if None in batch_seconds else round(sum(batch_seconds), 1)},
        "note": note,
        "resumed_images": resumed,
        "run": collect_metadata(device),
    }
    path = save_table(out, table, metadata)
    shutil.rmtree(partial, ignore_errors=True)
    return {
        "table": table.tolist(),
        "counts": counts.tolist(),
        "out": str(path),
        "n": n,
        "n_successful": n_ok,
        "success_rate": n_ok / n,
        "mean_l2_rms": metadata["mean_l2_rms_successful"],
        "seconds": round(seconds, 1),
        "metadata": metadata,
    }


def _mean_iterations(iterations: List[Optional[List[int]]]) -> Optional[float]:
    """Mean iterations run per binary-search step over the batches that recorded them."""
    known = [i for batch in iterations if batch for i in batch]
    return round(sum(known) / len(known), 1) if known else None


def _weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the model's parameters and buffers (names, shapes and values), so a checkpoint
    made with other weights under the same model name is not resumed."""
    import hashlib

    h = hashlib.sha256()
    for name, t in list(model.state_dict().items()):
        h.update(name.encode("utf-8"))
        h.update(str(tuple(t.shape)).encode("utf-8"))
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _checkpoints(out: Path, identity: Dict[str, Any], fresh: bool) -> Path:
    """The checkpoint folder ``<out>.partial`` of this run, created or checked against ``identity``."""
    partial = out.with_name(out.name + ".partial")
    if fresh:
        shutil.rmtree(partial, ignore_errors=True)
    record = partial / "identity.json"
    if record.is_file():
        if json.loads(record.read_text(encoding="utf-8")) != json.loads(json.dumps(identity)):
            raise DataError(f"{partial} holds an unfinished learn-table run with other settings (images, targets, model "
                            f"or C&W settings); rerun with its settings to resume it (a run started before the usability "
                            f"images were kept out: --exclude-usability-n 0), or delete it or pass --fresh to start over")
    else:
        partial.mkdir(parents=True, exist_ok=True)
        atomic_write_text(record, json.dumps(identity))
    return partial
