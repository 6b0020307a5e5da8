"""``prepdefense reproduce``: the paper's evaluation (Section 6) as one resumable run (issue 5).

The generic driver: plan -> run -> store -> report over the registered experiments
(``registry.py``). :func:`reproduce` resolves the preset, checks ``OUT/run.json`` (a different
configuration is refused unless ``fresh``), draws (or reloads) the protocol sample, asks every
selected experiment for its units (``Experiment.plan``), runs each unit not done yet
(``Experiment.run``; each unit writes one atomic file, ``store.py``), draws the sample-image
strip (``sample_strip.py``) and writes the report, whose sections each experiment writes
(``report.py``).

A unit whose piece is missing or raises is stored with status "error" and its message; the
run goes on, the report says "not available: <reason>", and the next run tries it again.
A unit's randomness comes only from the run's seed and the unit's id (``unit_seed``); where a
unit attacks or judges images, each image's draws come from a key over the run's seed, the
unit's id without its image shard and the image's own id (``RunContext.image_key``), so a unit
gives the same records whichever process, machine, shard (``--shard K/N``, ``sharding.py``)
or order computes it.

The experiments, one module each:

* ``table1.py``  two independent defended outputs per image: l2, SSIM, defended accuracy
  (Table 1, Section 5.4);
* ``standard_attacks.py``  ``table2``: a standard attack on the bare model (Table 2,
  Section 6.5), its examples cached for Tables 3 and 4; ``table3``: those examples through
  ``Defended(dct-distort)``, judged on R draws (Table 3);
* ``delta_sweep.py``  ``table4``: the same with the distortion limit ``delta`` swept (Table 4);
* ``fig4.py`` / ``table6.py``  the protocol attacks ``bpda`` / ``bpda-eot`` with their
  per-round history (Fig. 4 a-d, Sections 6.2-6.3; Table 6);
* ``learned.py``  the Section 6.4 approximator (trained once on images disjoint from the
  sample, cached), its l2/SSIM to g(x), and BPDA through it;
* ``strong.py``  the attack ensemble of ``prepdefense evaluate`` (``attacks.ensemble``: APGD,
  the adaptive EOT-PGD, transfer, Square; L2 RMS 0.05 and Linf 8/255, untargeted) with its
  verdict on R fresh draws, the Carlini et al. diagnostics (``attacks.diagnostics``) and the
  report's verdict;
* ``table5.py``  Table 5 from Fig. 4's BPDA+EOT run and the strong attack on our defense.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import seeding
from ..defenses.quant_tables import default_table, table_digest
from ..defenses.spec import referenced_files
from . import registry
from . import units as U
from .components import resolve_device
from .context import UNIT_DRAWS, RunContext, Sample
from .executors import EXECUTORS, Executor, LocalExecutor, compute_unit, write_result
from .metadata import collect_metadata, now_iso
from ..draws import DRAW_SCHEME
from .progress import Progress
from .report import write_report
from .sample_cache import load_or_draw_sample
from .sample_strip import sample_strip_figure
from .sharding import ShardSpec, select, shard_spec
from .store import ConfigMismatchError, ResultStore, to_jsonable
from .units import Preset, Unit

__all__ = ["ReproduceConfig", "ReproduceOutcome", "reproduce", "run_demo_pipeline", "run_unit", "RunContext"]


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
@dataclass
class ReproduceConfig:
    """Everything ``prepdefense reproduce`` takes (the CLI maps its flags onto this).

    Attributes:
        out: output folder (``run.json``, ``units/``, ``results/``, ``report.md``...).
        data: image folder or ``"builtin"``.
        preset: ``quick``, ``paper`` or ``smoke`` (``units.PRESETS``).
        model: classifier name (``models.names()``); ``weights`` a local weights file.
        device: ``cpu``, ``cuda[:N]`` or ``auto``.
        seed: the run's seed (sample, targets, every unit's generator).
        fresh: delete earlier results in ``out`` first.
        quiet: plain log lines instead of progress bars.
        only: experiments to run (``registry.names()``; None = all).
        overrides: preset fields to replace (part of the run's identity).
        report_only: only (re)write the report from the stored units.
        shard: run only this shard of the planned units (``sharding.py``; 1-based ``"K/N"``
            or a :class:`~prepdefense.experiments.sharding.ShardSpec`); part of the run's
            identity, so a shard's store refuses another shard. ``merge.py`` combines them.
        executor: who computes the units (``executors.py``): ``local`` (this process) or
            ``ray`` (Ray actors, ``ray_executor.py``; the ``ray`` extra), or an executor object.
            Not part of the run's identity: both give the same records, and a run may resume
            under the other.
        ray_address: with ``ray``, the cluster to join (None: start a local one on 127.0.0.1).
        ray_workers: with ``ray``, at most this many workers (a local Ray gets the CPUs for them).
        ray_threads: with ``ray``, torch threads (and reserved CPUs) per worker (default 1).
    """

    out: Path
    data: str = "builtin"
    preset: str = "quick"
    model: str = "efficientnet-lite0"
    weights: Optional[str] = None
    device: str = "auto"
    seed: int = 0
    fresh: bool = False
    quiet: bool = False
    only: Optional[Sequence[str]] = None
    overrides: Dict[str, Any] = field(default_factory=dict)
    report_only: bool = False
    shard: Optional[Any] = None
    executor: Any = "local"
    ray_address: Optional[str] = None
    ray_workers: Optional[int] = None
    ray_threads: int = 1


@dataclass
class ReproduceOutcome:
    out: Path
    report: Optional[Path]
    planned: int
    already_done: int
    ran: int
    failed: int
    seconds: float
    resumed: bool


# ---------------------------------------------------------------------------------------------
# one unit
# ---------------------------------------------------------------------------------------------
def run_unit(ctx: RunContext, unit: Unit) -> Dict[str, Any]:
    """Run one unit in this process and store it (status "ok", or "error" with the reason);
    returns a summary. ``executors.compute_unit`` computes, ``executors.write_result`` stores."""
    r = compute_unit(ctx, unit)
    write_result(ctx.store, unit, r)
    return {"status": r.status, "error": r.error, "seconds": r.seconds}


def make_executor(config: ReproduceConfig) -> Executor:
    """The executor ``config.executor`` names (``executors.EXECUTORS``), with its options, or
    ``config.executor`` itself when it is an executor already."""
    if not isinstance(config.executor, str):
        return config.executor
    if config.executor == "local":
        return LocalExecutor()
    if config.executor == "ray":
        from .ray_executor import RayExecutor

        return RayExecutor(address=config.ray_address, workers=config.ray_workers, threads=config.ray_threads,
                           device=config.device)
    raise ValueError(f"unknown executor {config.executor!r}; choose one of {', '.join(EXECUTORS)}")


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
def _identity(config: ReproduceConfig, preset: Preset, data_id: str, shard: Optional[ShardSpec] = None) -> Dict[str, Any]:
    # The draw scheme is part of what a run is: resuming under another scheme would mix draws.
    # A shard's store names its shard (an unsharded run's identity has no "shard" key).
    # So is the table the paper's defense uses by default (the shipped learned table): a new
    # one must not resume a run made with the old one.
    ident = {"data": data_id, "model": config.model, "weights": config.weights, "seed": int(config.seed),
             "preset": preset.name, "preset_sizes": preset.as_dict(), "draw_scheme": DRAW_SCHEME, "unit_draws": UNIT_DRAWS,
             "default_table": table_digest(default_table()[0]),
             # the protocol attacks' gradient (Fig. 4, Table 6, the demo pipeline): the paper's identity
             # over a non-differentiable defense, and Fig. 4's stage-wise variant beside it (runs before
             # this key differentiated dct-distort stage-wise as "bpda"); since "-shared-draws", the
             # stage-wise units take the draws of the paper's units (common random numbers)
             "bpda_gradient": "paper-identity+stagewise-variant-shared-draws"}
    files = {}  # a table file named in a preset's defense (an override from the API): its contents
    for key, names in preset.as_dict().items():
        if key.endswith("_defenses") and isinstance(names, (list, tuple)):
            for name in names:
                files.update({f"{name} {k}": v for k, v in referenced_files(str(name)).items()})
    if files:
        ident["defense_files"] = dict(sorted(files.items()))
    if shard is not None:
        ident["shard"] = shard.as_dict()
    return ident


def _data_id(data: Any) -> str:
    if isinstance(data, (str, Path)) and str(data) != "builtin":
        return str(Path(data).expanduser().resolve())
    return str(data)


def _tensor_digest(x: torch.Tensor, ids: Sequence[str]) -> str:
    h = hashlib.sha256()
    h.update(x.detach().cpu().contiguous().numpy().tobytes())
    h.update("|".join(ids).encode())
    return h.hexdigest()[:16]


def _shard_plan(plan: Sequence[Unit], shard: Optional[ShardSpec], store: ResultStore, only: Sequence[str]) -> list:
    """``plan`` itself, or shard ``shard``'s part of it (recorded in ``run.json`` for ``merge``)."""
    if shard is None:
        return list(plan)
    mine = select(plan, shard)
    store.update_config(shard={**shard.as_dict(), "only": list(only), "planned_units": len(plan), "units": [u.id for u in mine]})
    return mine


def reproduce(
    config: ReproduceConfig,
    *,
    classifier: Optional[nn.Module] = None,
    images: Optional[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Sequence[str]]] = None,
    stream=None,
) -> ReproduceOutcome:
    """Run (or resume) the evaluation and write the report. See the module docstring.

    Args:
        config: what to run.
        classifier: a ready model (default: ``models.create(config.model)``).
        images: ``(x, labels, targets_or_None, ids)`` to evaluate instead of drawing the
            protocol sample from ``config.data`` (the demo's use); targets are drawn from the
            seed when None.
        stream: where progress and log lines go (default stderr).

    Raises:
        ConfigMismatchError: ``config.out`` holds a run with another configuration.
        StoreLockedError: another run writes into ``config.out``.
    """
    t_start = time.perf_counter()
    started = now_iso()
    preset = U.get_preset(config.preset).with_overrides(**config.overrides) if config.overrides else U.get_preset(config.preset)
    experiments = registry.parse_only(config.only)
    shard = shard_spec(config.shard)
    device = resolve_device(config.device)
    store = ResultStore(Path(config.out))
    store.lock()
    try:
        if config.fresh:
            store.reset()
        store.open()
        store.clean_temporaries()
        if images is not None:
            x, labels, targets, ids = images
            data_id = f"given images sha256:{_tensor_digest(x, ids)}"
        else:
            data_id = _data_id(config.data)
        identity = _identity(config, preset, data_id, shard)
        run_cfg = {
            "identity": identity,
            "device": str(device),
            "only": list(experiments),
            "quiet": bool(config.quiet),
            "metadata": collect_metadata(device),
        }
        try:
            resumed = store.check_or_write_config(run_cfg)
        except ConfigMismatchError:
            # --report-only computes nothing, so a run made with an earlier shipped table can
            # still be reported (its units name their tables); any other difference is refused.
            stored = dict((store.read_config() or {}).get("identity", {}))
            if not config.report_only or {**stored, "default_table": identity["default_table"]} != to_jsonable(identity):
                raise
            resumed = True
        plan = _shard_plan(registry.plan(preset, experiments), shard, store, experiments)

        if config.report_only:
            report = write_report(store)
            return ReproduceOutcome(Path(config.out), report, len(plan), 0, 0, 0, time.perf_counter() - t_start, resumed)

        if classifier is None:
            from .. import models

            kw = {"weights": config.weights} if config.weights else {}
            classifier = models.create(config.model, **kw)
        classifier = classifier.to(device).eval()
        for p in classifier.parameters():
            p.requires_grad_(False)

        if images is not None:
            x, labels, targets, ids = images
            if targets is None:
                from ..data import draw_targets

                targets = draw_targets(labels.cpu(), seeding.make_generator(U.unit_seed(config.seed, "given-targets")))
            n = min(preset.n_images, len(ids))
            sample = Sample(x[:n].cpu(), labels[:n].cpu(), targets[:n].cpu(), list(ids)[:n], {"source": "given images"})
            if preset.n_images != n:
                preset = preset.with_overrides(n_images=n)
                plan = _shard_plan(registry.plan(preset, experiments), shard, store, experiments)
            data_source = None
        else:
            sample = load_or_draw_sample(store, classifier, config.data, preset.n_images, config.seed, device)
            data_source = config.data
        store.update_config(sample={**sample.info, "n": len(sample), "first_ids": sample.ids[:5]})
        ctx = RunContext(preset=preset, seed=config.seed, device=device, store=store, classifier=classifier,
                         sample=sample, data_source=data_source, model_name=config.model)

        todo = [u for u in plan if not store.is_done(u.experiment, u.id)]
        already = len(plan) - len(todo)
        executor = make_executor(config)
        progress = Progress(sum(u.cost for u in todo), len(todo), quiet=config.quiet, stream=stream)
        progress.log(
            f"{'resuming' if resumed else 'starting'} {preset.name} run in {config.out}"
            + (f" (shard {shard} of the units)" if shard else "") + f": {len(plan)} units planned, "
            f"{already} already done, {len(todo)} to run on {device}"
            + (f" ({executor.name} executor)" if executor.name != "local" else "")
        )
        ctx.progress_hook = progress.unit_fraction
        failed = 0
        ran = 0
        results = executor.run(ctx, todo, progress)
        try:
            # The executor computes; this process alone writes each unit as it arrives (once:
            # a unit already stored as done is never overwritten).
            for unit, result in results:
                if store.is_done(unit.experiment, unit.id):
                    continue
                write_result(store, unit, result)
                ran += 1
                failed += result.status != "ok"
                progress.end_unit(unit, result.status, result.seconds, result.error)
        finally:
            results.close()  # the executor's workers end here, whatever happened
            progress.close()
            store.append_session({"started": started, "ended": now_iso(), "seconds": time.perf_counter() - t_start,
                                  "units_run": ran, "units_failed": failed, "device": str(device), "only": list(experiments),
                                  "executor": executor.name})

        try:
            sample_strip_figure(ctx, store.root / "figures" / "samples.png")
        except Exception as e:  # noqa: BLE001 - the report says the strip is missing and why
            store.update_config(sample_strip_error=f"{type(e).__name__}: {e}")
        report = write_report(store)
        progress.log(f"report written to {report} ({ran} unit(s) run, {failed} failed, {already} reused)")
        return ReproduceOutcome(Path(config.out), report, len(plan), already, ran, failed, time.perf_counter() - t_start, resumed)
    finally:
        store.unlock()


def run_demo_pipeline(
    out: Path,
    *,
    x: torch.Tensor,
    labels: torch.Tensor,
    ids: Sequence[str],
    targets: Optional[torch.Tensor] = None,
    experiments: Sequence[str] = ("fig4",),
    preset: str = "smoke",
    overrides: Optional[Dict[str, Any]] = None,
    classifier: Optional[nn.Module] = None,
    model: str = "efficientnet-lite0",
    device: str = "auto",
    seed: int = 0,
    fresh: bool = True,
    quiet: bool = True,
    stream=None,
) -> ReproduceOutcome:
    """Run a named subset of the evaluation on given images and write ``out/report.md``.

    For ``prepdefense demo``: e.g. ``experiments=("fig4",)`` with
    ``overrides={"fig4_bpda_defenses": (), "fig4_eot_defenses": ("dct-distort",), "bpda_rounds": 5,
    "bpda_max_rounds": 5, "eot": 4}`` gives a short BPDA+EOT attack on each image. Images the
    classifier gets wrong are kept (the caller chooses them). Table 1 and the learned
    approximator need an image source and are not available here.
    """
    ov = dict(overrides or {})
    ov.setdefault("n_images", len(ids))
    ov.setdefault("shard_size", max(1, len(ids)))
    cfg = ReproduceConfig(out=Path(out), data="given", preset=preset, model=model, device=device, seed=seed,
                          fresh=fresh, quiet=quiet, only=list(experiments), overrides=ov)
    return reproduce(cfg, classifier=classifier, images=(x, labels, targets, list(ids)), stream=stream)
