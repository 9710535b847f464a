"""The training loop: plain PyTorch, one process or many under torchrun.

Reproducibility: model init uses ``train.seed`` on every rank; the data of a step is a function of
(seed, step) (see ``data.batches``); dropout and any other in-model randomness is reseeded from
(seed, step, rank) at every step. So a run resumed from a checkpoint continues exactly as the
uninterrupted run would have, without saving RNG state, and the data order does not depend on the
number of processes for a fixed global batch.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from ..config import Config, save_config
from ..data.batches import BatchPlan, TrainBatches, draw_random_inputs, make_views, mix_seed
from ..data.datasets import ImageSet
from ..errors import GenrepError
from ..eval.periodic import PeriodicEval, check_periodic
from ..locks import LOCK_FILE, RunLock
from ..methods import Method
from ..runs import (CONFIG_FILE, FROZEN_FILE, INIT_FILE, PREPARED_FILE, RUN_MARKER, build_for_data, check_init_source,
                    check_new_run_dir, check_no_links, check_resumable, create_run_dir, data_spec, fit_prepared,
                    install_run_state, is_marked_run, load_split, load_splits, mark_run, read_init_record,
                    read_init_source, save_prepared, write_frozen, write_init_record)
from .checkpoint import CKPT_DIR, checkpoint_dirs, checkpoint_step, load_checkpoint, save_checkpoint
from .dist import barrier, cleanup, init_distributed
from .ema import EMA
from .logger import LOG_FILE, Logger, check_tensorboard, truncate_log
from .optim import build_optimizer, phase_start, phased_lr_at


@dataclass
class TrainResult:
    steps: int
    start_step: int
    seconds: float
    images_per_s: float
    last_log: dict


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision not in ("auto", "bf16", "fp32"):
        raise GenrepError(f"train.precision '{precision}' is unknown; choose auto, bf16 or fp32")
    if precision == "bf16" and device.type != "cuda":
        raise GenrepError("train.precision bf16 needs a CUDA device here; use --train.precision fp32 on the CPU")
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def schedule(cfg: Config, steps_per_epoch: int) -> tuple[int, int]:
    total = cfg.train.steps if cfg.train.steps > 0 else math.ceil(cfg.train.epochs * steps_per_epoch)
    if total <= 0:
        raise GenrepError("training would run 0 steps; set --train.epochs or --train.steps to a positive value")
    o = cfg.optim
    warmup = o.warmup_steps if o.warmup_steps > 0 else round(o.warmup_epochs * steps_per_epoch)
    warmup = min(warmup, max(total - 1, 0))
    return total, warmup


def check_train_config(cfg: Config, world: int) -> None:
    """What the config cannot know alone: the split of the batch over this run's processes (every key's own
    range was checked when the config was built)."""
    t = cfg.train
    if t.batch_size % (world * t.accum_steps):
        raise GenrepError(f"train.batch_size {t.batch_size} must be divisible by processes x accum_steps "
                          f"= {world} x {t.accum_steps}")


def check_accumulation(cfg: Config, method: Method) -> None:
    """Accumulation splits a batch into micro-batches; a loss that couples the samples of a batch (NT-Xent's
    negatives) would then optimise another objective, so it is refused rather than silently changed."""
    if method.batch_coupled and cfg.train.accum_steps > 1:
        raise GenrepError(f"train.accum_steps {cfg.train.accum_steps}: {method.name}'s loss couples the samples "
                          f"of a batch (the contrastive negatives), so accumulating micro-batches would change the "
                          f"objective; use --train.accum_steps 1 (more processes give a bigger batch: their "
                          f"negatives are gathered)")


class Trainer:
    """Train ``cfg`` into ``run``: a new run, a resumed one (``resume``), or a new run that continues the trained
    weights and fitted state of run ``init`` (``genrep pretrain --init RUN``: GCRL's section 4.2, ImageNet32 models
    continued on CIFAR) with a fresh optimizer and schedule."""

    def __init__(self, cfg: Config, run: Path, resume: bool = False, train_set: ImageSet | None = None,
                 init: Path | None = None):
        if resume and init is not None:
            raise GenrepError("--init starts a new run from another run's weights; a resumed run continues its own "
                              "checkpoint: drop --init (or --resume)")
        self.cfg, self.run, self.resume, self.init = cfg, Path(run), resume, init
        self.info, self.device = init_distributed(cfg.train.device)
        check_train_config(cfg, self.info.world)
        # one writer per run (rank 0 holds the lock for all ranks); a resumed run is locked before it is read
        self._lock = RunLock(self.run, "resume" if resume else "train into")
        if resume:
            check_resumable(self.run)  # read-only: a folder genrep did not make gets no lock file either
            if self.info.main:
                self._lock.acquire()
        try:
            if resume:
                check_no_links(self.run)
            self._build(cfg, resume, train_set)
        except BaseException:
            self._lock.release()  # a failed start must not keep the run locked for the rest of the process
            raise

    def _build(self, cfg: Config, resume: bool, train_set: ImageSet | None) -> None:
        # every rank checks before _load_data's barrier, so before rank 0 can have made the folder; a resumed
        # run is checked again now that it is locked
        (check_resumable if resume else check_new_run_dir)(self.run)
        self._made: list[Path] | None = None  # folders this run created, once it has claimed its folder
        self._stepped = False
        self.bf16 = use_bf16(cfg.train.precision, self.device)

        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self._test_set: ImageSet | None = None  # loaded with the training set, for the evaluation during training
        if train_set is None:
            train_set = self._load_data()
        self.train_set = train_set
        self.method: Method = build_for_data(cfg, train_set, self.device, training=True)
        check_accumulation(cfg, self.method)
        self._init = self._init_source(resume)
        self.periodic = self._periodic_eval()
        self._inherited: dict[str, str] | None = None  # prepared.safetensors' record of a state from --init
        self._prepared = self._prepare(resume)  # before the EMA copies the method: it holds the fitted state
        if self._init is not None:  # the source's weights replace the fresh ones, before the EMA copies them
            try:
                self.method.load_state_dict(self._init[0])
            except RuntimeError as e:
                raise GenrepError(f"--init {self._init[2]['run']}: its weights do not fit this config's model "
                                  f"({str(e).splitlines()[0][:160]})") from None
        self.method.to(self.device)
        self.plan = BatchPlan(len(train_set), cfg.train.batch_size, cfg.train.seed, self.info.rank, self.info.world,
                              streams=self.method.num_streams)
        self.batches = TrainBatches(train_set.images, train_set.labels, self.plan, self.device,
                                    cfg.data.device_resident, cfg.data.num_workers, cfg.data.decode)
        self.total_steps, self.warmup_steps = schedule(cfg, self.plan.steps_per_epoch)
        self.second_phase_start = phase_start(self.total_steps, cfg.optim.second_phase_at)

        o = cfg.optim
        self.optimizer = build_optimizer(self.method, o.lr, o.weight_decay, o.betas, o.eps,
                                         self.method.no_weight_decay(), fused=self.device.type == "cuda",
                                         exclusions=o.decay_exclusions)
        self.ema = EMA(self.method, cfg.train.ema_decay, cfg.train.ema_warmup)
        self._trainable = self.method.trainable_parameters()
        self.start_step = self._restore() if resume else 0

        model = self.method
        if self.info.enabled:
            model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.model = torch.compile(model) if cfg.train.compile else model
        if cfg.train.tensorboard:
            check_tensorboard()
        self.logger: Logger | None = None  # opened by fit(): a run that fails to build leaves no folder

    def _init_source(self, resume: bool):
        """(weights, fitted state and its record, INIT_FILE's record) of the run this one continues: ``--init``'s,
        or, for a continuation resumed before its first checkpoint, the recorded source (the same bytes)."""
        spec = data_spec(self.train_set)
        if self.init is not None:
            check_init_source(self.init, self.cfg, spec)
            return read_init_source(self.init, self.method)
        record = read_init_record(self.run) if resume and not checkpoint_dirs(self.run) else None
        if record is None:
            return None
        check_init_source(record["run"], self.cfg, spec)
        return read_init_source(record["run"], self.method, expect_sha256=record["sha256"])

    def _prepare(self, resume: bool) -> dict[str, torch.Tensor] | None:
        """The method's data-fitted state: read back from the run on resume (never refitted), taken from the run
        it continues (``--init``: never refitted either), else fitted on rank 0 and broadcast. Returns the state
        still to be written into the run folder (None: nothing)."""
        m = self.method
        if not m.has_prepare:
            if resume:
                install_run_state(self.run, m, self.train_set)  # frozen parts must be the files trained with
            return None
        if resume and ((self.run / PREPARED_FILE).exists() or checkpoint_dirs(self.run)):
            install_run_state(self.run, m, self.train_set)
            return None
        if self._init is not None:
            state, self._inherited = self._init[1]
            m.load_prepared(state)
            m.prepared_meta = dict(self._inherited)
            return state
        state = [fit_prepared(m, self.train_set, self.device, self.cfg.train.seed) if self.info.main else None]
        if self.info.enabled:
            torch.distributed.broadcast_object_list(state, src=0)
        m.load_prepared(state[0])
        return state[0]

    def _open_run(self) -> None:
        """Create the run folder (everything that could be wrong with the config has been checked)."""
        if self.info.main:
            if not self.resume:
                self._made = create_run_dir(self.run, self._lock)
            elif not is_marked_run(self.run):
                mark_run(self.run, adopted=True)  # a run from before the marker, recognised by check_resumable
            save_config(self.cfg, self.run / CONFIG_FILE)
            if self._prepared is not None:
                save_prepared(self.run, self.method, self._prepared, self.train_set, self._inherited)
            write_frozen(self.run, self.method)
            if self._init is not None:
                write_init_record(self.run, self._init[2])
        self.logger = Logger(self.run, self.info.main, self.cfg.train.tensorboard)

    def _discard_run(self) -> None:
        """Undo a new run that failed before its first step: remove the files genrep writes at the start and
        the folders it created, never anything else (an empty folder given as --out is kept)."""
        if self.logger is not None:
            self.logger.close()
            self.logger = None
        if not self.info.main or self._made is None:  # not claimed: the folder may be someone else's
            return
        for name in (LOG_FILE, CONFIG_FILE, PREPARED_FILE, FROZEN_FILE, INIT_FILE, "tensorboard", CKPT_DIR, RUN_MARKER,
                     LOCK_FILE):
            path = self.run / name
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
        for folder in self._made:
            with contextlib.suppress(OSError):  # not empty: something else is in it, so it stays
                folder.rmdir()

    def _load_data(self) -> ImageSet:
        """Rank 0 first, so that a download happens once, not once per process into the same folder."""
        if not self.info.main:
            barrier(self.info)
        train_set, self._test_set = load_splits(self.cfg)
        if self.info.main:
            barrier(self.info)
        return train_set

    def _periodic_eval(self) -> PeriodicEval | None:
        """The evaluation during training (``train.eval_every``), checked before the run folder exists."""
        if self.cfg.train.eval_every is None:
            return None
        check_periodic(self.cfg, self.method)
        test_set = self._test_set if self._test_set is not None else load_split(self.cfg, "test")
        return PeriodicEval(self.cfg, self.train_set, test_set, self.device)

    def _evaluate(self, done: int) -> None:
        """Evaluate the EMA weights after step ``done`` (rank 0; the others wait) and log the row."""
        if self.info.main:
            row = {"step": done, **self.periodic(self.ema.model, done)}
            self.logger.log(row)
            if self.cfg.train.progress:
                shown = ", ".join(f"{k[5:]} {v:.4g}" for k, v in row.items() if k.startswith("eval_"))
                print(f"genrep: step {done}: {shown}", flush=True)
        barrier(self.info)

    # ------------------------------------------------------------------ checkpoints
    def _restore(self) -> int:
        ckpts = checkpoint_dirs(self.run)
        if not ckpts:  # killed before the first checkpoint (check_resumable: no weights): start over
            if self.info.main:
                truncate_log(self.run, 0)
            return 0
        model_sd, ema_sd, state = load_checkpoint(ckpts[-1])
        try:
            self.method.load_state_dict(model_sd)
            self.ema.model.load_state_dict(ema_sd)
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise GenrepError(f"checkpoint {ckpts[-1]} does not fit the model of this config "
                              f"({str(e).splitlines()[0][:160]}); resume with the run's own config.yaml") from None
        step = state["step"]
        if self.info.main:
            truncate_log(self.run, step)
        return step

    def _save(self, step: int) -> None:
        if self.info.main:
            meta = {"method": self.cfg.method, "recipe": self.cfg.recipe}
            save_checkpoint(self.run, step, self.method.state_dict(), self.ema.state_dict(),
                            {"optimizer": self.optimizer.state_dict(), "world_size": self.info.world}, meta,
                            keep=self.cfg.train.keep_checkpoints)
        barrier(self.info)

    def _last_good(self) -> str:
        ckpts = checkpoint_dirs(self.run)
        return f"the last good checkpoint (step {checkpoint_step(ckpts[-1])}) is kept in {ckpts[-1]}" if ckpts \
            else "no checkpoint had been written yet"

    # ------------------------------------------------------------------ one step
    def _lr_at(self, step: int) -> float:
        o = self.cfg.optim
        return phased_lr_at(step, self.total_steps, self.warmup_steps, o.lr, o.min_lr, self.second_phase_start,
                            o.second_phase_lr)

    def _train_step(self, step: int, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        torch.manual_seed(mix_seed(cfg.train.seed, step, self.info.rank, 0xD809))
        lr = self._lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        start, total = self.info.rank * self.plan.local_batch, self.plan.global_batch
        views = make_views(images, self.method.views(), cfg.train.seed, step, start=start, total=total,
                           streams=self.method.view_streams)
        views.update(draw_random_inputs(self.method.random_inputs(), views, cfg.train.seed, step, start, total,
                                        progress=step / self.total_steps))
        if self.method.needs_labels:
            views["label"] = labels[:self.plan.local_batch]  # the labels of stream 0
        accum = cfg.train.accum_steps
        micro = self.plan.local_batch // accum
        terms: dict[str, torch.Tensor] = {}
        stats: dict[str, torch.Tensor] = {}  # sums over the samples: summed, not averaged, and not logged
        for j in range(accum):
            batch = {k: v[j * micro:(j + 1) * micro] for k, v in views.items()}
            sync = contextlib.nullcontext() if not self.info.enabled or j == accum - 1 else self.model.no_sync()
            with sync, torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                out = self.model(batch)
                (out["loss"] / accum).backward()
            for k, v in out.items():
                if k in self.method.state_stats:
                    stats[k] = stats.get(k, 0.0) + v.detach().float()
                else:
                    terms[k] = terms.get(k, 0.0) + v.detach().float() / accum
        max_norm = cfg.optim.clip_grad if cfg.optim.clip_grad > 0 else float("inf")
        terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(self._trainable, max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.method.state_stats:
            self._apply_state_stats(stats)
        self.ema.update(step)  # after the state update: the EMA copies the method's floating buffers
        return terms

    @torch.no_grad()
    def _apply_state_stats(self, stats: dict[str, torch.Tensor]) -> None:
        """Hand the method its state statistics summed over the whole global batch: one all-reduce of them all,
        so 2 processes update the state as 1 does (up to the order of float sums)."""
        names = self.method.state_stats
        missing = [k for k in names if k not in stats]
        if missing:
            raise TypeError(f"{self.method.name}.loss must return its state_stats {names}; missing {missing}")
        if self.info.enabled:
            flat = torch.cat([stats[k].reshape(-1) for k in names])
            torch.distributed.all_reduce(flat)
            sizes = [stats[k].numel() for k in names]
            stats = {k: part.view_as(stats[k]) for k, part in zip(names, flat.split(sizes))}
        self.method.apply_state_stats(stats)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainResult:
        try:
            return self._fit()
        except Exception:
            # a start that fails before one step (a loss that raises, bad labels) leaves nothing behind; once a
            # step ran (a NaN), the run is kept, to resume from its checkpoint or from step 0 with other settings
            if not self.resume and not self._stepped:
                self._discard_run()
            raise

    def _fit(self) -> TrainResult:
        cfg, info = self.cfg, self.info
        start, total = self.start_step, self.total_steps
        self._open_run()
        if not self._trainable:
            # all frozen parts (a pretrained U-Net read for its features): nothing to optimise; the run holds the
            # config, the frozen parts' record and the (empty) weights of step 0 the evaluation loads
            if not checkpoint_dirs(self.run):
                self._save(0)
            return TrainResult(0, 0, 0.0, 0.0, {})
        bar = None
        if info.main and cfg.train.progress and start < total:
            from tqdm.auto import tqdm
            bar = tqdm(total=total, initial=start, desc=f"train {cfg.recipe or cfg.method}", unit="step",
                       dynamic_ncols=True, leave=False,
                       disable=None)  # None: no bar when stderr is not a terminal (CI logs)
        sums: dict[str, torch.Tensor] = {}
        count, bad = 0, torch.zeros((), device=self.device, dtype=torch.bool)
        t_start = t_log = time.perf_counter()
        last_log: dict = {}
        self.method.train()
        for step, images, labels in self.batches(start, total):
            terms = self._train_step(step, images, labels)
            self._stepped = True
            bad |= ~torch.isfinite(terms["loss"]) | ~torch.isfinite(terms["grad_norm"])
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
            done = step + 1
            is_last = done == total
            if done % cfg.train.log_every == 0 or done % cfg.train.ckpt_every == 0 or is_last:
                last_log = self._log(done, sums, count, bad, time.perf_counter() - t_log)
                sums, count, t_log = {}, 0, time.perf_counter()
                if bar is not None:
                    bar.set_postfix(loss=f"{last_log['loss']:.4f}", refresh=False)
            if self.periodic is not None and self.periodic.due(done):
                self._evaluate(done)  # before the checkpoint: a resume from it never misses this row
                t_log = time.perf_counter()  # images/s counts training only
            if done % cfg.train.ckpt_every == 0 or is_last:
                self._save(done)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - t_start
        images = (total - start) * cfg.train.batch_size
        return TrainResult(total, start, seconds, images / seconds if seconds > 0 else 0.0, last_log)

    def _log(self, done: int, sums: dict, count: int, bad: torch.Tensor, seconds: float) -> dict:
        names = sorted(sums)
        vec = torch.stack([sums[k].float() / count for k in names] + [bad.float()])
        if self.info.enabled:
            torch.distributed.all_reduce(vec)
            vec[:-1] /= self.info.world
        values = vec.tolist()  # the one host sync of a log interval
        if values[-1] > 0:
            barrier(self.info)
            # resuming with the same settings would replay the same steps into the same NaN
            raise GenrepError(f"loss or gradient became NaN/inf by step {done}; training stopped and "
                              f"{self._last_good()}; resume from it with a lower learning rate: genrep "
                              f"pretrain --resume {self.run} --optim.lr {self.cfg.optim.lr / 2:g}")
        row = {"step": done, "epoch": round(done / self.plan.steps_per_epoch, 4)}
        row.update({k: round(v, 6) for k, v in zip(names, values[:-1])})
        row["lr"] = self._lr_at(done - 1)
        row["images_per_s"] = round(count * self.cfg.train.batch_size / max(seconds, 1e-9), 1)
        self.logger.log(row)
        return row

    def close(self, finished: bool = False) -> None:
        if self.logger is not None:
            self.logger.close()
        self._lock.release()
        if finished:
            # the DDP wrapper holds the process group: dropped, the group is freed by cleanup and its threads joined
            # now. After a failure it is kept: a bucket's all-reduce may still wait on a peer, and joining it would
            # hang until gloo's timeout instead of ending the process
            self.model = self.method
        cleanup(self.info, finished)


def pretrain(cfg: Config, run: Path, resume: bool = False, init: Path | None = None) -> TrainResult:
    trainer = Trainer(cfg, run, resume, init=init)
    finished = False
    try:
        result = trainer.fit()
        finished = True
        return result
    finally:
        trainer.close(finished)
