"""The train stage: one magnification-aware diffusion model from the tile store.

``run(ctx)`` trains on every level of the ingest store's ``train`` split at once, with
AdamW and an EMA of the weights (post-processing, so free under DP), and writes into the
stage folder:

- ``model.safetensors`` (EMA weights), ``model_raw.safetensors``, ``config.json`` (model
  config + tile_px, levels, classes, recipe hash, steps, privacy summary) -- through
  :func:`synthpath.models.save_checkpoint`;
- ``ledger.json`` (the privacy ledger, also written at every checkpoint);
- ``losses.csv``, ``loss.png``, ``samples/step_<step:05d>.png``;
- while running, ``state/`` (see :mod:`synthpath.train.state`): an interrupted run resumes
  from the last checkpoint and ends with the same weights, bit for bit on the CPU.

Private and non-private runs share the whole loop and :func:`~synthpath.train.engine.gradient_step`;
only the gradient wrapper differs (:func:`build_gradients`).
"""

from __future__ import annotations

import copy
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import write_json
from ..models import build_model, save_checkpoint
from ..pipeline import StageContext, StageError
from . import distributed as D
from . import dprandom
from . import adapters as A
from . import label_shares as L
from . import public_init as PI
from . import privacy as P
from .batches import DiffusionLoss, FixedSizeSampler, PoissonSampler, RowMaker, level_balanced_weights
from .engine import PlainGradients, PrivateGradients, ghost_privacy, gradient_step
from .report import grid_conditions, plot_losses, read_losses, sample_grid, write_losses
from .guard import DONE, check_resume, read_done, remove_temp_files, settings_of
from .state import load_state, restore, save_state

log = logging.getLogger("synthpath.train")


class TrainingInterrupted(StageError):
    """Training stopped early on request (``stop_after``); its state is saved for resume."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; a named device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StageError(f"train.device is {name!r} but no CUDA device is available; use 'auto' or 'cpu'")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


@dataclass
class Setup:
    """What :func:`build_gradients` decided: the wrapper, the unit sampler, and the plan."""

    grads: object
    sampler_factory: object  # steps_left -> sampler
    n_units: int
    unit: str
    plan: P.PrivacyPlan | None
    accountant: object | None


def build_gradients(recipe, model: torch.nn.Module, optimizer: torch.optim.Optimizer, dataset,
                    gens: dict[str, torch.Generator], device: torch.device, prior: list | tuple = (),
                    dist: D.DistContext | None = None) -> Setup:
    """Wrap ``model``/``optimizer`` for the recipe's privacy setting. The only place where a
    private run differs from a non-private one. ``prior``: accountant entries composed with
    training (the DP label shares), so that the total meets ``privacy.target_epsilon``."""
    tcfg, pcfg = recipe.train, recipe.privacy
    if not pcfg.enabled:
        module = model
        if tcfg.compile:
            module = torch.compile(model)
        grads = PlainGradients(model, optimizer, max_units=tcfg.physical_batch_size, grad_clip=tcfg.grad_clip,
                               module=module)
        if dist is not None and dist.active:
            grads.reduce = dist.all_reduce_sum
        n = len(dataset)
        w = level_balanced_weights(dataset._level) if tcfg.level_balance else None  # non-DP only (recipe check)
        return Setup(grads, lambda left: FixedSizeSampler(n, tcfg.batch_size, gens["units"], w), n, "tile", None, None)

    P.check_supported(model)
    if tcfg.compile:
        log.warning("train.compile is ignored under DP: Opacus' per-sample hooks need the eager model")
    noise_gen = gens.get("noise")  # None on a rank other than 0, which adds no noise
    K = pcfg.noise_multiplicity
    multi = dist is not None and dist.active
    if multi and pcfg.clipping != "ghost":
        raise StageError(f"training with DP on {dist.world} processes needs privacy.clipping: ghost (the noise is "
                         f"added once, by rank 0, before the all-reduce); got {pcfg.clipping!r}")
    if pcfg.clipping == "ghost":
        plan, grads, accountant = ghost_privacy(recipe, model, optimizer, dataset, noise_gen, prior,
                                                reduce=dist.all_reduce_sum if multi else None,
                                                add_noise=dist is None or dist.main)
        max_units = max(1, tcfg.physical_batch_size // (K * (pcfg.tiles_per_patient if pcfg.unit == "patient" else 1)))
    elif pcfg.unit == "tile":
        plan, grads, accountant = _tile_privacy(recipe, model, optimizer, dataset, noise_gen, prior)
        max_units = max(1, tcfg.physical_batch_size // K)
    else:
        plan, grads, accountant = _patient_privacy(recipe, model, optimizer, dataset, noise_gen, prior)
        max_units = max(1, tcfg.physical_batch_size // (K * pcfg.tiles_per_patient))
    grads.max_units = max_units
    rows_per_unit = K * (pcfg.tiles_per_patient if pcfg.unit == "patient" else 1)
    if rows_per_unit > tcfg.physical_batch_size:
        log.warning("one %s is %d rows (noise_multiplicity x tiles), more than train.physical_batch_size=%d: "
                    "each physical batch holds one whole %s", pcfg.unit, rows_per_unit, tcfg.physical_batch_size,
                    pcfg.unit)
    q, n = plan.sample_rate, plan.n_units
    return Setup(grads, lambda left: PoissonSampler(n, q, gens["units"], left), n, plan.unit, plan, accountant)



def _tile_privacy(recipe, model, optimizer, dataset, noise_gen, prior=()):
    """Tile-level DP through Opacus' ``PrivacyEngine.make_private`` (Poisson sampling over
    tiles at Opacus' rate 1 / number of batches), with sigma calibrated here so that training
    composed with ``prior`` spends exactly the target epsilon."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader

    tcfg, pcfg = recipe.train, recipe.privacy
    n = len(dataset)
    delta = P.resolve_delta(pcfg.delta, n)
    n_batches = math.ceil(n / tcfg.batch_size)
    if n_batches <= 1:
        raise StageError(f"privacy: train.batch_size={tcfg.batch_size} covers all {n} training tiles, so the "
                         f"sampling rate would be 1; lower train.batch_size")
    q = 1.0 / n_batches
    sigma = P.calibrate_sigma(target_epsilon=pcfg.target_epsilon, delta=delta, sample_rate=q, steps=tcfg.steps,
                              accountant=pcfg.accountant, n_units=n, unit="tile",
                              prior=tuple(tuple(p) for p in prior))
    engine = PrivacyEngine(accountant=pcfg.accountant, secure_mode=False)
    loader = DataLoader(dataset, batch_size=tcfg.batch_size)
    gsm, dp_opt, dp_loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma,
        max_grad_norm=pcfg.max_grad_norm, loss_reduction="sum", poisson_sampling=True,
        noise_generator=None if pcfg.secure_mode else noise_gen)
    if pcfg.secure_mode:
        dp_opt.generator = noise_gen  # the CSPRNG (PrivacyEngine itself was built without secure_mode)
        dp_opt.secure_mode = True
    if abs(float(dp_loader.sample_rate) - q) > 1e-12:
        raise RuntimeError(f"Opacus' sample rate {dp_loader.sample_rate} differs from the planned {q}")
    # Opacus issue #819: hooks see raw per-sample gradients (sum); the noised sum is divided by
    # the expected batch q*n, a public constant, never by the realised Poisson batch.
    dp_opt.loss_reduction = "mean"
    dp_opt.expected_batch_size = q * n
    plan = P.PrivacyPlan(
        unit="tile", n_units=n, sample_rate=q, expected_units=q * n, sigma=float(dp_opt.noise_multiplier),
        delta=delta, target_epsilon=pcfg.target_epsilon, steps=tcfg.steps, max_grad_norm=pcfg.max_grad_norm,
        noise_multiplicity=pcfg.noise_multiplicity, tiles_per_patient=None, accountant=pcfg.accountant,
        secure_mode=pcfg.secure_mode, delta_rule=P.delta_rule(pcfg.delta, "tile"),
        warnings=P.unit_warnings("tile", n), prior=[list(p) for p in prior])
    return plan, PrivateGradients(gsm, dp_opt, engine.accountant, max_units=1), engine.accountant


def _patient_privacy(recipe, model, optimizer, dataset, noise_gen, prior=()):
    """Patient-level DP assembled from Opacus parts: GradSampleModule, DPOptimizer, accountant."""
    from opacus import GradSampleModule
    from opacus.accountants import create_accountant
    from opacus.optimizers import DPOptimizer

    tcfg, pcfg = recipe.train, recipe.privacy
    n = len(dataset.patients)
    plan = P.plan_patient_privacy(pcfg, n_patients=n, batch_size=tcfg.batch_size, steps=tcfg.steps, prior=prior)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    dp_opt = DPOptimizer(optimizer, noise_multiplier=plan.sigma, max_grad_norm=plan.max_grad_norm,
                         expected_batch_size=plan.expected_units, loss_reduction="mean",
                         generator=noise_gen, secure_mode=pcfg.secure_mode)
    accountant = create_accountant(mechanism=pcfg.accountant)
    dp_opt.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=plan.sample_rate))
    return plan, PrivateGradients(gsm, dp_opt, accountant, max_units=1), accountant


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """EMA with the usual warm-up, ``min(decay, (1 + step) / (10 + step))``, so short runs
    are not dominated by the initial weights. Post-processing of the released weights only."""
    decay = min(decay, (1.0 + step) / (10.0 + step))
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - decay)



def train(recipe, store_dir: Path, workdir: Path, *, stop_after: int | None = None,
          progress: bool = True, dp_seed: int | None = None) -> dict:
    """Train (or resume training) into ``workdir``; returns the stage summary.

    ``stop_after``: save the resumable state after that many steps in total and raise
    :class:`TrainingInterrupted` (a test and ops hook that behaves like an interruption).
    ``dp_seed``: TESTS ONLY -- seed the private DP streams (unit sampling, noise) with this
    instead of OS entropy (also read from ``$SYNTHPATH_TEST_DP_SEED``); the ledger then says
    ``"test seed, not private"`` and carries a warning (see :mod:`synthpath.train.dprandom`).
    A saved state is resumed only if it was made with the same model, train and privacy
    settings (:mod:`synthpath.train.guard`).
    """
    from ..tiles.dataset import TileDataset
    from ..tiles.store import TileStoreError

    workdir = Path(workdir)
    tcfg, pcfg, mcfg = recipe.train, recipe.privacy, recipe.model
    settings = settings_of(recipe)
    state_dir = workdir / "state"
    dist, device = D.context(resolve_device(tcfg.device))  # torchrun / srun: one process per device
    # rank 0 alone looks after the folder and decides; the other ranks follow its decision (a
    # worker reading the folder itself could race rank 0 finalising or cleaning it)
    done = None
    if dist.main:
        workdir.mkdir(parents=True, exist_ok=True)
        done = read_done(workdir, settings)
    done = dist.broadcast_object(done)
    if done is not None:  # killed after the end of training, before the stage was finalised
        if dist.main:
            shutil.rmtree(state_dir, ignore_errors=True)
            remove_temp_files(workdir)
        log.info("training in %s had already finished (%s); not training again", workdir, DONE)
        return done
    if dist.main:
        remove_temp_files(workdir)  # what a killed writer left behind
    try:
        dataset = TileDataset(store_dir, split="train")
    except (TileStoreError, OSError) as e:
        raise StageError(f"cannot read the tile store in {store_dir}: {e}") from None
    if len(dataset) == 0:
        raise StageError(f"the tile store {store_dir} has no 'train' tiles; check ingest (split, tissue, labels)")
    classes = list(dataset.store.classes)
    levels = list(dataset.levels)
    tile_px = int(dataset.tile_px)

    seed_everything(recipe.seed)
    try:
        model = build_model(mcfg.size, len(classes), tile_px).to(device)
    except ValueError as e:
        raise StageError(f"model.size={mcfg.size!r} with ingest tile_px={tile_px}: {e}") from None
    init_prov = None
    if tcfg.init_from is not None:  # before adapters and before Opacus wraps the model
        init_prov = PI.init_model(tcfg.init_from, model, classes=classes, levels=levels, tile_px=tile_px,
                                  dp=pcfg.enabled, relative_to=recipe.output_dir)
    trainable = A.apply_trainable(model, pcfg.trainable, pcfg.lora_rank)
    model.train()
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    # three streams: unit sampling (CPU), rows (tile draws, t, noise, dropout) and DP noise. The
    # rows stream is public (recipe seed); under DP, units and noise are secret (dprandom).
    gens = {"units": torch.Generator().manual_seed(recipe.seed * 1000 + 0),
            "rows": torch.Generator(device=device).manual_seed(recipe.seed * 1000 + 1)}
    secure = pcfg.enabled and pcfg.secure_mode
    randomness, noise_note = None, None
    label_block, prior = None, []
    if pcfg.enabled and dist.main:
        injected = dp_seed if dp_seed is not None else dprandom.injected_seed_from_env()
        private, randomness, noise_note = dprandom.private_streams(device, secure=secure, test_seed=injected)
        gens.update(private)
    elif pcfg.enabled:  # another rank never holds the secret streams: rank 0 samples and adds the noise
        del gens["units"]
    if pcfg.enabled:
        n_units = len(dataset.patients) if pcfg.unit == "patient" else len(dataset)
        if recipe.generate.label_proportions:
            label_block = L.public_label_shares(recipe.generate.label_proportions)
        else:
            label_block = L.plan_label_shares(pcfg, P.resolve_delta(pcfg.delta, n_units))
            prior = label_block["history"]

    setup = build_gradients(recipe, model, optimizer, dataset, gens, device, prior=prior, dist=dist)
    dp = setup.plan is not None
    K = pcfg.noise_multiplicity if dp else 1
    rows = RowMaker(dataset, unit=setup.unit if dp else "tile", noise_multiplicity=K,
                    tiles_per_patient=pcfg.tiles_per_patient, num_classes=len(classes), device=device,
                    generator=gens["rows"], augment=tcfg.augment)
    loss_fn = DiffusionLoss(p_label=mcfg.p_drop_label, p_parent=mcfg.p_drop_parent, p_known=mcfg.p_known,
                            generator=gens["rows"])
    saved_gens = {k: g for k, g in gens.items() if not (secure and k in ("units", "noise"))}
    if not dist.main:
        saved_gens = {"rows": gens["rows"]}  # rank 0's state holds the unit and noise streams; never read here
    for w in (setup.plan.warnings if dp else [P.NO_GUARANTEE]):
        log.warning(w)
    if dp:
        log.info("DP plan: unit=%s n=%d q=%.4g sigma=%.4g delta=%.3g steps=%d C=%g K=%d", setup.plan.unit,
                 setup.plan.n_units, setup.plan.sample_rate, setup.plan.sigma, setup.plan.delta, setup.plan.steps,
                 setup.plan.max_grad_norm, setup.plan.noise_multiplicity)

    # ---------------------------------------------------------------- resume
    start, history = 0, []
    loss_rows: list[dict] = []
    st = load_state(state_dir) if dist.main else None
    chosen = dist.broadcast_object(None if st is None else st["folder"])  # every rank resumes rank 0's state
    if not dist.main and chosen is not None:
        st = load_state(state_dir, folder=chosen, skip=("gen.units", "gen.noise"))
    if st is not None:
        extra = st["meta"].get("extra", {})
        saved_hist = [tuple(h) for h in extra.get("history", [])]
        check_resume(state_dir, extra, settings, step=st["step"], dp=dp, steps_in_history=_steps_in(saved_hist))
        restore(st, model=model, ema=ema, optimizer=setup.grads.optimizer, generators=saved_gens, device=device)
        start = st["step"]
        history = saved_hist
        if setup.accountant is not None:
            setup.accountant.history = list(history)
        loss_rows = extra["losses"] if "losses" in extra else read_losses(workdir / "losses.csv", start)
        if dp:
            label_block, randomness = extra.get("label_shares", label_block), extra.get("dp_randomness", randomness)
        log.info("resuming training at step %d of %d", start, tcfg.steps)
    elif label_block is not None and label_block["source"] == "dp" and dist.main:
        # the label shares' noise is the first draw of the private noise stream
        label_block = L.release_label_shares(label_block, L.unit_label_vectors(dataset, setup.unit, len(classes)),
                                             gens["noise"])
    if start > tcfg.steps:
        raise StageError(f"the saved state is at step {start}, past train.steps={tcfg.steps}")
    dist.check_replicas(start, model, ema)  # same step, same weights on every rank, or stop here

    picks = grid_conditions(dataset, len(classes))
    summary_base = {"classes": classes, "levels": levels, "tile_px": tile_px, "model_size": mcfg.size,
                    "n_train_tiles": len(dataset), "n_train_patients": len(dataset.patients), "device": str(device),
                    "recipe_name": recipe.name, "recipe_full_hash": recipe.full_hash(), "data_public": recipe.data.public,
                    "init_from": init_prov, "trainable": trainable}

    def ledger() -> dict:
        led = _ledger()
        led["init_from"] = init_prov  # the public checkpoint's provenance (None: trained from scratch)
        led["trainable"] = trainable
        if init_prov is not None and dp:
            led["epsilon_covers"] = ("the private fine-tuning data only; the initial checkpoint's data is "
                                     + ("declared public" if init_prov.get("data_public") else
                                        "covered by its own, separate DP guarantee"))
        return led

    def _ledger() -> dict:
        warns = list(rows.messages)
        if not dp:
            return P.ledger_public(len(dataset), warns)
        if randomness == dprandom.TEST_SEED:
            warns.append(dprandom.TEST_WARNING)
        hist = setup.accountant.history if setup.accountant is not None else []
        extra = {"label_shares": label_block, "dp_randomness": randomness, "noise_source": noise_note}
        led = P.ledger_private(setup.plan, hist, _steps_in(hist), warns, extra=extra)
        if randomness == dprandom.TEST_SEED:  # first, where nobody can miss it
            led["warnings"] = [dprandom.TEST_WARNING] + [w for w in led["warnings"] if w != dprandom.TEST_WARNING]
        if setup.plan.unit == "tile":
            led["group_privacy"] = P.group_privacy(led["epsilon"], led["delta"], levels)
        return led

    def checkpoint(step: int) -> None:
        hist = list(setup.accountant.history) if setup.accountant is not None else []
        save_state(state_dir, step=step, model=model, ema=ema, optimizer_state=setup.grads.optimizer.state_dict(),
                   generators=saved_gens, extra={"history": [list(h) for h in hist], "settings": settings,
                                                 "losses": loss_rows, "label_shares": label_block,
                                                 "dp_randomness": randomness})
        write_losses(workdir / "losses.csv", loss_rows)
        led = ledger()
        write_json(workdir / "ledger.json", led)
        save_checkpoint(workdir, A.merged(model), A.merged(ema), {**summary_base, "steps": step, "seed": recipe.seed,
                                              "recipe_hash": recipe.section_hash("model", "train", "privacy"),
                                              "privacy": _privacy_brief(led, dp)})

    sampler = setup.sampler_factory(tcfg.steps - start) if dist.main else None  # rank 0 draws the units
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=tcfg.steps, initial=start, desc="train" + (f" (DP, {setup.unit})" if dp else ""),
                   dynamic_ncols=True)
    t0 = time.time()
    step = start
    try:
        while step < tcfg.steps:
            if dp and _steps_in(setup.accountant.history) >= setup.plan.steps:
                break  # never train past the budget
            units = dist.broadcast_object(sampler.draw() if dist.main else None)  # global sampling, rank 0
            out = gradient_step(setup.grads, units, rows, loss_fn, dist=dist,
                                reseed=lambda j: gens["rows"].manual_seed(D.chunk_seed(recipe.seed, step, j)))
            if not out["stepped"]:
                raise RuntimeError("the optimiser did not step at the end of a logical batch")
            step += 1
            _ema_update(ema, model, tcfg.ema_decay, step)
            loss_rows.append({"step": step, "loss": out["loss"], "units": out["units"]})
            if bar is not None:
                bar.update(1)
                if step % tcfg.log_every == 0 or step == tcfg.steps:
                    recent = [r["loss"] for r in loss_rows[-tcfg.log_every:] if math.isfinite(r["loss"])]
                    bar.set_postfix(loss=f"{np.mean(recent):.4f}" if recent else "nan")
            if step % tcfg.sample_every == 0 and dist.main:
                sample_grid(ema, dataset, picks, len(classes), device, workdir / "samples" / f"step_{step:05d}.png", step)
            # the last step is always saved, so a kill while finishing resumes at the end, not at 0
            if (step % tcfg.checkpoint_every == 0 or step == stop_after or step == tcfg.steps) and dist.main:
                checkpoint(step)
            if stop_after is not None and step >= stop_after and step < tcfg.steps:
                dist.barrier()
                raise TrainingInterrupted(f"training stopped after step {step} on request; run again to resume")
    finally:
        if bar is not None:
            bar.close()

    # ---------------------------------------------------------------- final artifacts
    led = ledger()
    if dp and led["epsilon"] > setup.plan.target_epsilon + 0.05:
        raise StageError(f"privacy accounting spent epsilon={led['epsilon']:.3f}, above the target "
                         f"{setup.plan.target_epsilon}; the train stage does not finish")
    if not dist.main:  # rank 0 writes every artifact, once; the other ranks end with it
        dist.barrier()
        return {**summary_base, "steps": step, "rank": dist.rank, "world_size": dist.world}
    if not (workdir / "samples" / f"step_{step:05d}.png").exists():
        sample_grid(ema, dataset, picks, len(classes), device, workdir / "samples" / f"step_{step:05d}.png", step)
    extra = {**summary_base, "steps": step, "seed": recipe.seed,
             "recipe_hash": recipe.section_hash("model", "train", "privacy"), "privacy": _privacy_brief(led, dp)}
    save_checkpoint(workdir, A.merged(model), A.merged(ema), extra)  # adapters folded in: an ordinary model
    write_losses(workdir / "losses.csv", loss_rows)
    plot_losses(workdir / "loss.png", loss_rows, f"{recipe.name}: {mcfg.size} model" + (" (DP)" if dp else ""))
    write_json(workdir / "ledger.json", led)
    first = [r["loss"] for r in loss_rows[: max(1, len(loss_rows) // 10)] if math.isfinite(r["loss"])]
    last = [r["loss"] for r in loss_rows[-max(1, len(loss_rows) // 10):] if math.isfinite(r["loss"])]
    summary = {
        **summary_base,
        "steps": step,
        "seconds_this_run": round(time.time() - t0, 2),
        "loss_first_tenth": float(np.mean(first)) if first else None,
        "loss_last_tenth": float(np.mean(last)) if last else None,
        "privacy": {k: led.get(k) for k in ("enabled", "epsilon", "delta", "unit", "n_units", "sigma",
                                            "sample_rate", "accountant")},
        "warnings": led.get("warnings", []),
    }
    write_json(workdir / DONE, {"settings": settings, "summary": summary})  # before the state goes
    shutil.rmtree(state_dir, ignore_errors=True)
    remove_temp_files(workdir)
    dist.barrier()
    return summary


def _privacy_brief(led: dict, dp: bool) -> dict:
    return {"enabled": dp, "unit": led.get("unit"), "epsilon": led.get("epsilon"), "delta": led.get("delta")}


def _steps_in(history) -> int:
    return int(sum(h[2] for h in history)) if history else 0


def run(ctx: StageContext) -> dict:
    """Stage entry point: train from ``ctx.inputs["ingest"]`` into ``ctx.workdir``."""
    store = ctx.inputs.get("ingest")
    if store is None:
        raise StageError("the train stage needs the ingest stage's tile store (ctx.inputs['ingest'])")
    summary = train(ctx.recipe, Path(store), Path(ctx.workdir), stop_after=ctx.options.get("train_stop_after"),
                    progress=ctx.options.get("progress", True))
    p = summary["privacy"]
    if p.get("enabled"):
        log.info("trained with DP (%s level): epsilon=%.3f, delta=%.3g", p["unit"], p["epsilon"], p["delta"])
    else:
        log.info("trained without DP: no formal privacy guarantee")
    return summary
