"""Training loop: data, model, optimizer, compiled step, validation, checkpoints, resume, data parallel.

``Trainer(cfg).fit()`` runs a whole configuration (see ``engine.config.TRAIN_OPTIONS``). Files written by
the writer rank (rank 0) into ``cfg.output_dir``:

* ``last.ckpt``: full training state, every ``save_every_epochs`` epochs, every ``save_every_steps`` steps,
  at ``stop_at_step`` and at the end; ``best.ckpt``: the state with the best validation top-1;
  ``epoch_NNN.ckpt`` with ``keep_epoch_checkpoints`` (the newest ``keep_checkpoint_max`` when set);
  ``config.yaml``, ``train.log``, ``metrics.jsonl``, ``curves.png``.

Run folders are protected: a new run refuses an ``output_dir`` that holds an earlier run's checkpoints or
metrics unless it resumes that run (``--resume auto``) or ``--overwrite`` deletes them first. A state holding
NaN or inf (weights, BatchNorm statistics, EMA, optimizer moments) is never written: training stops with
``TrainingDiverged`` naming the last checkpoint that was written, which is therefore good.
"""
import contextlib
import glob
import math
import os
import shutil
import time

import numpy as np

from . import checkpoint as ckpt
from .config import Config, ConfigError
from .data import DataError, find_bad_images, image_checker, steps_per_epoch
from .logger import MetricsWriter, PLOT_FILE, METRICS_FILE, ProgressMeter, format_duration, plot_curves, \
    setup_logging
from .runtime import (build_model, check_input_size, check_writable_folder, compile_then_release,
                      describe_attention_backends, init_distributed, model_kwargs, setup_context)

LAST, BEST = "last.ckpt", "best.ckpt"
EPOCH_PATTERN = "epoch_[0-9][0-9][0-9]*.ckpt"
# what a run writes into its folder (rank_<r>/ holds the same for the other ranks)
RUN_FILES = (LAST, BEST, EPOCH_PATTERN, METRICS_FILE, PLOT_FILE, "train.log", "config.yaml")


def earlier_run_files(folder):
    """Files of an earlier run in ``folder`` (checkpoints, metrics, logs, rank_<r>/ folders), sorted."""
    found = []
    for pattern in RUN_FILES:
        found += glob.glob(os.path.join(glob.escape(folder), pattern))
    found += [path for path in glob.glob(os.path.join(glob.escape(folder), "rank_*")) if os.path.isdir(path)
              and any(name.endswith(".ckpt") for name in os.listdir(path))]
    return sorted(set(found))


def holds_run(folder):
    """True when ``folder`` holds an earlier run's checkpoints or metrics (a log alone is an aborted start)."""
    names = [os.path.basename(path) for path in earlier_run_files(folder)]
    return any(name.endswith(".ckpt") or name == METRICS_FILE or name.startswith("rank_") for name in names)


MAX_CONSECUTIVE_OVERFLOWS = 100


class TrainingDiverged(RuntimeError):
    """The training loss, the gradients or the training state became NaN or infinite."""

    def __init__(self, what, global_step, epoch, step_in_epoch, last_checkpoint):
        self.global_step = global_step
        kept = f"; last good checkpoint: {last_checkpoint}" if last_checkpoint else "; no checkpoint was saved yet"
        super().__init__(f"{what} at step {global_step} (epoch {epoch + 1}, step {step_in_epoch} of the epoch): "
                         f"stopped{kept}. Lower --lr, set --clip_grad_norm, or use --amp_level O0")


class Trainer:
    """Builds everything for a config; ``fit()`` trains and returns a summary dict."""

    def __init__(self, cfg: Config):
        if cfg.model is None:
            raise ConfigError("option 'model' is required (a name from models.list_models())")
        self.cfg = cfg
        setup_context(cfg.mode, cfg.device_target, cfg.seed)
        self.rank, self.group_size = init_distributed(cfg.distributed)
        self.writer = self.rank == 0
        self.output_dir = cfg.output_dir or os.path.join("runs", cfg.model)
        self.save_dir = self.output_dir if self.writer else (
            os.path.join(self.output_dir, f"rank_{self.rank}") if cfg.save_on_all_ranks else None)
        removed, debris = self._prepare_output_dir()
        self.log = setup_logging(self.output_dir, self.writer)
        self.metrics = MetricsWriter(self.output_dir, self.writer)
        if removed:
            self.log.info(f"--overwrite: deleted the earlier run in {self.output_dir}: "
                          + ", ".join(os.path.basename(path) for path in removed))
        if debris:
            self.log.info(f"removed {len(debris)} partial checkpoint file(s) of an interrupted save: "
                          + ", ".join(os.path.basename(path) for path in debris))

        # the task (engine/tasks) says which data, loss and metrics; data first: a bad dataset fails before
        # any compilation (the image check runs on rank 0 only, see _check_images)
        from .tasks import resolve, task_options
        self.task = resolve(cfg)
        self.task_options = task_options(cfg, self.task)
        self.sync = None
        if self.group_size > 1:
            from .step import RankSync
            self.sync = RankSync(self.group_size)
        with image_checker(self._check_images):
            self.train_index, self.val_index, self.class_names = self.task.scan(cfg)
        self.num_classes = cfg.num_classes or len(self.class_names)
        if self.num_classes < len(self.class_names):
            raise ConfigError(f"option 'num_classes'={self.num_classes} is smaller than the "
                              f"{len(self.class_names)} classes of {cfg.data_dir}")
        self.steps_per_epoch = steps_per_epoch(len(self.train_index), cfg.batch_size, self.group_size)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.global_batch = cfg.batch_size * self.group_size

        self._build_model()
        self._build_step()
        self.save_schedule = ckpt.SaveSchedule(cfg.save_every_steps, cfg.save_every_epochs, cfg.epochs,
                                               cfg.stop_at_step)
        self.epochs_done, self.step_in_epoch, self.best_top1, self.best_epoch = 0, 0, None, None
        self.last_checkpoint, self.last_checkpoint_step = None, None
        resume_path = self._resume_path()
        if resume_path:
            self._restore(resume_path)
        if self.group_size > 1:
            # identical starting point on every rank (random init differs per process unless seeded alike)
            self.sync.broadcast([param for _, param in self._state_params()])
        # (global_step, loss) of every step run by this process (with data sinking: of each sunk call's last step)
        self.history = []
        self.skipped_steps = 0  # updates skipped for non-finite gradients (dynamic loss scaling)
        import mindspore as ms
        self.sinking = cfg.data_sink and ms.get_context("device_target") in ("Ascend", "GPU")
        self._sink_note_logged = False
        self._step_compiled = False

    # ---- construction -------------------------------------------------------------------------------
    def _prepare_output_dir(self):
        """Check the run folder before anything is written or compiled.

        Refuses an unwritable folder, and one holding an earlier run unless this run resumes it or
        ``overwrite`` is set (then deletes that run's files on the writer rank). Removes the temporary files
        of an interrupted checkpoint save. Returns (deleted run files, deleted temporary files).
        """
        cfg, folder = self.cfg, self.output_dir
        if cfg.overwrite and cfg.resume:
            raise ConfigError("options 'overwrite' and 'resume' exclude each other: --overwrite deletes the run "
                              "that --resume would continue")
        resume_here = cfg.resume == "auto" and os.path.isfile(os.path.join(folder, LAST)) or bool(
            cfg.resume and cfg.resume != "auto"
            and os.path.dirname(os.path.abspath(cfg.resume)) == os.path.abspath(folder))
        removed = []
        if holds_run(folder) and not resume_here:
            if not cfg.overwrite:
                what = "no last.ckpt to resume from" if cfg.resume == "auto" else "its checkpoints and metrics"
                raise ConfigError(f"output_dir {folder} holds an earlier run ({what}): continue it with --resume "
                                  f"auto, delete it with --overwrite true, or choose another --output_dir")
            if self.writer:
                removed = earlier_run_files(folder)
                for path in removed:
                    if os.path.isdir(path):
                        shutil.rmtree(path)
                    else:
                        os.remove(path)
        debris = []
        if self.save_dir is not None:  # the writer rank's save_dir is output_dir
            check_writable_folder(self.save_dir, "option 'output_dir'")
            debris = ckpt.remove_temp_files(self.save_dir)
        return removed, debris

    def _check_images(self, index):
        """The image check (cached) on rank 0 only: the other ranks learn how many files failed through one
        all-reduce, and check themselves (from the cache on the same machine) only when files are to be
        skipped. Returns [(path, reason)] of the unreadable files."""
        if self.sync is None:
            return find_bad_images(index)
        bad = find_bad_images(index) if self.rank == 0 else None
        count = int(round(self.sync.sum([len(bad) if bad is not None else 0])[0]))
        if bad is not None or not count:
            return bad or []
        if self.cfg.bad_images == "fail":  # rank 0 lists them and stops with the same error
            return [(index.root, f"rank 0 found {count} unreadable image(s) here (listed in its log)")]
        return find_bad_images(index)

    def _build_model(self):
        from mindspore import amp
        cfg = self.cfg
        self.model, self.model_kwargs = build_model(
            cfg.model, self.num_classes, model_kwargs(cfg.model_overrides, cfg.drop_path_rate, cfg.in_chans),
            cfg.image_size)
        check_input_size(self.model, cfg.model, cfg.image_size)
        if cfg.init_checkpoint:
            ckpt.load_checkpoint_into(self.model, cfg.init_checkpoint, strict=True)
        # structural names, taken before mixed precision wraps the network
        self.named_params = list(self.model.parameters_and_names())
        self.network = amp.auto_mixed_precision(self.model, cfg.amp_level) if cfg.amp_level != "O0" else self.model
        self.param_count = sum(int(np.prod(p.shape)) for _, p in self.named_params if p.requires_grad)

    def _build_step(self):
        from mindspore import nn
        from .optim import create_optimizer, optimizer_state
        from .step import EMA, BatchRandomErasing, MonitoredStep, TrainStep, create_loss_scaler, loss_scaler_state
        cfg = self.cfg
        self.optimizer, _, self.optim_info = create_optimizer(
            cfg, self.model, self.named_params, self.steps_per_epoch, self.global_batch)
        self.optimizer_state = optimizer_state(self.optimizer, {id(p) for _, p in self.named_params})
        self.ema = EMA(self.named_params, cfg.ema_decay) if cfg.ema_decay else None
        self.loss_scaler = create_loss_scaler(cfg.loss_scale, cfg.loss_scale_value, cfg.loss_scale_window)
        self.scaler_state = loss_scaler_state(self.loss_scaler)
        reducer = None
        if self.group_size > 1:
            reducer = nn.DistributedGradReducer(self.optimizer.parameters, mean=True, degree=self.group_size)
        net_with_loss = self.task.loss_network(self.network, cfg, self.num_classes)
        # random erasing on the device; the classification pipeline (engine.data) supplies its draws
        eraser = BatchRandomErasing(cfg.random_erasing) if cfg.random_erasing > 0 and \
            self.task.NAME == "classification" else None
        self.train_step = TrainStep(net_with_loss, self.optimizer, self.loss_scaler,
                                    cfg.clip_grad_norm, self.ema, reducer, self.group_size, eraser)
        self.monitored = MonitoredStep(self.train_step)

    # ---- state and checkpoints ----------------------------------------------------------------------
    def _state_params(self):
        """Every (checkpoint name, Parameter) of the training state."""
        state = list(self.named_params)
        if self.ema is not None:
            state += [(f"ema.{name}", param) for name, param in self.ema.named()]
        state += [(f"optimizer.{name}", param) for name, param in self.optimizer_state]
        state += [(f"loss_scaler.{name}", param) for name, param in self.scaler_state]
        return state

    def _meta(self):
        return {"model": self.cfg.model, "task": self.task.NAME, "num_classes": self.num_classes, "class_names": self.class_names,
                "epochs_done": self.epochs_done, "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step(), "steps_per_epoch": self.steps_per_epoch,
                "best_top1": self.best_top1, "best_epoch": self.best_epoch, "config": self.cfg.to_yaml(),
                "has_ema": self.ema is not None, "model_kwargs": self.model_kwargs}

    def global_step(self):
        return int(self.optimizer.global_step.asnumpy().reshape(-1)[0])

    def _save(self, name):
        """Write the training state to ``name``; a state with NaN/inf is refused (TrainingDiverged)."""
        if self.save_dir is None:
            return None
        path = os.path.join(self.save_dir, name)
        try:
            ckpt.save_checkpoint(path, self._state_params(), self._meta(), require_finite=True)
        except ckpt.NonFiniteStateError as err:
            self._diverged(f"the training state holds NaN or inf in {len(err.names)} tensor(s) "
                           f"({', '.join(err.names[:5])}{', ...' if len(err.names) > 5 else ''}); not saved")
        return path

    def _diverged(self, what):
        epoch, in_epoch = self.epochs_done, self.step_in_epoch
        if in_epoch == 0 and epoch > 0:  # at an epoch end: the last step of the finished epoch
            epoch, in_epoch = epoch - 1, self.steps_per_epoch
        raise TrainingDiverged(what, self.global_step(), epoch, in_epoch, self._last_good_description())

    def _last_good_description(self):
        if not self.last_checkpoint:
            return None
        return f"{self.last_checkpoint} (step {self.last_checkpoint_step})"

    def _save_last(self, reason, progress=None):
        self._read_window(progress)  # the steps since the last read must be finite before the state is saved
        path = self._save(LAST)
        if path:
            self.last_checkpoint, self.last_checkpoint_step = path, self.global_step()
            self.log.info(f"saved {path} ({reason}, step {self.global_step()})")
        if self.cfg.keep_epoch_checkpoints and self.step_in_epoch == 0 and self.epochs_done > 0:
            if self._save(f"epoch_{self.epochs_done:03d}.ckpt"):
                self._prune_epoch_checkpoints()

    def _prune_epoch_checkpoints(self):
        """Keep the newest ``keep_checkpoint_max`` epoch_NNN.ckpt files (all when 0)."""
        keep = self.cfg.keep_checkpoint_max
        if not keep:
            return
        found = glob.glob(os.path.join(glob.escape(self.save_dir), EPOCH_PATTERN))
        numbered = sorted((int(os.path.basename(path)[6:-5]), path) for path in found
                          if os.path.basename(path)[6:-5].isdigit())
        for _, path in numbered[:-keep]:
            os.remove(path)
            self.log.info(f"removed {path} (keep_checkpoint_max {keep})")

    def _check_state_finite(self):
        """Stop when the weights or BatchNorm statistics (or EMA) hold NaN/inf, before they are validated."""
        state = list(self.named_params) + ([(f"ema.{n}", p) for n, p in self.ema.named()] if self.ema else [])
        broken = ckpt.non_finite_names({name: param.asnumpy() for name, param in state})
        if broken:
            self._diverged(f"weights or statistics hold NaN or inf after epoch {self.epochs_done} in "
                           f"{len(broken)} tensor(s) ({', '.join(broken[:5])}{', ...' if len(broken) > 5 else ''})")

    def _resume_path(self):
        resume = self.cfg.resume
        if not resume:
            return None
        if resume == "auto":
            path = os.path.join(self.output_dir, LAST)
            return path if os.path.isfile(path) else None
        if not os.path.isfile(resume):
            raise ckpt.CheckpointError(f"--resume: checkpoint not found: {resume}")
        return resume

    def _restore(self, path):
        tensors, meta = ckpt.read_checkpoint(path)
        if "global_step" not in meta:
            raise ckpt.CheckpointError(f"--resume: {path} holds weights only, not a training state "
                                       f"(use --init_checkpoint to start from its weights)")
        if meta.get("model") != self.cfg.model:
            raise ckpt.CheckpointError(f"--resume: {path} was trained as model {meta.get('model')!r}, "
                                       f"this run builds {self.cfg.model!r}")
        if meta.get("steps_per_epoch") != self.steps_per_epoch:
            raise ckpt.CheckpointError(
                f"--resume: {path} was saved with {meta.get('steps_per_epoch')} steps per epoch, this run has "
                f"{self.steps_per_epoch} (dataset, batch_size or device count changed); use --init_checkpoint "
                f"to start a new schedule from its weights")
        state = self._state_params()
        missing, unexpected, mismatched = ckpt.match_state(state, tensors)
        if missing or mismatched:
            raise ckpt.CheckpointError(f"--resume: {path} does not match this run's training state: "
                                       + ckpt.key_report(missing, unexpected, mismatched))
        broken = ckpt.non_finite_names({name: tensors[name] for name, _ in state})
        if broken:
            raise ckpt.CheckpointError(f"--resume: {path} holds NaN or inf in {len(broken)} tensor(s) "
                                       f"({', '.join(broken[:5])}): resume from an earlier checkpoint")
        ckpt.assign_tensors(state, tensors)
        self.epochs_done = int(meta["epochs_done"])
        self.step_in_epoch = int(meta["step_in_epoch"])
        self.best_top1, self.best_epoch = meta.get("best_top1"), meta.get("best_epoch")
        self.last_checkpoint, self.last_checkpoint_step = path, int(meta["global_step"])
        self.log.info(f"resumed from {path}: epoch {self.epochs_done + 1}, step {self.step_in_epoch} of the "
                      f"epoch, global step {self.global_step()}")

    # ---- evaluation ---------------------------------------------------------------------------------
    def validate(self):
        """Validation metrics of the current weights (EMA weights when EMA is on and eval_ema): the task's
        ``validate`` result, holding its PRIMARY_METRIC (top1 for classification).

        With data parallel and a task that shards its validation (``SHARDED_VALIDATION``), each rank evaluates
        every ``group_size``-th image and the counts are summed over the ranks: the numbers of one process
        evaluating the whole split.
        """
        if self.val_index is None:
            return None
        use_ema = self.ema is not None and self.cfg.eval_ema
        # the EMA weights are evaluated in the same network, then the trained weights are put back
        with self.ema.swapped_in(self.named_params) if use_ema else contextlib.nullcontext():
            self.network.set_train(False)
            try:
                if getattr(self.task, "SHARDED_VALIDATION", False):
                    return self.task.validate(self.network, self.cfg, self.val_index, self.num_classes,
                                              num_shards=self.group_size, shard_id=self.rank,
                                              sum_counts=self.sync.sum if self.sync is not None else None,
                                              report=self.log.info)
                return self.task.validate(self.network, self.cfg, self.val_index, self.num_classes)
            finally:
                self.network.set_train(True)

    # ---- training -----------------------------------------------------------------------------------
    def _log_setup(self):
        cfg, info = self.cfg, self.optim_info
        self.log.info(f"model {cfg.model}: {self.param_count / 1e6:.3f} M trainable parameters, "
                      f"{self.num_classes} classes; amp {cfg.amp_level}, loss scale {cfg.loss_scale}")
        backends = describe_attention_backends(self.model)
        if backends:  # which implementation computes the sliding-window attention (speed and memory differ a lot)
            self.log.info("sliding-window attention: " + backends)
        self.log.info(f"data {cfg.data_dir}: {len(self.train_index)} train / "
                      f"{len(self.val_index) if self.val_index else 0} val images; {self.group_size} device(s) x "
                      f"batch {cfg.batch_size}; {self.steps_per_epoch} steps/epoch, {self.total_steps} steps")
        self.log.info(f"optimizer {cfg.opt}: peak lr {info['peak_lr']:.4g}, {info['warmup_steps']} warm-up steps, "
                      f"weight decay {cfg.weight_decay} on {info['decayed']} tensors "
                      f"({info['not_decayed']} without)")

    # the host waits for the device only here: log lines, checkpoints, epoch ends
    def _read_window(self, progress=None):
        """Wait for the device and take the statistics of the steps run since the last read: history,
        loss sums, lr, skipped updates; stop (TrainingDiverged) on a non-finite loss, on non-finite gradients
        without dynamic loss scaling, or on too many consecutive overflows with it (the scale cannot recover).
        """
        values = self.monitored.read()
        start, count = self._window_start, values["steps"]
        losses = [(step, float(loss.asnumpy())) for step, loss in self._pending]
        self._pending = []
        self.history.extend(losses)
        self._window_start += count
        self.skipped_steps += values["overflows"]
        self._log_sum, self._log_steps = self._log_sum + values["loss_sum"], self._log_steps + count
        self._epoch_sum, self._epoch_steps = self._epoch_sum + values["loss_sum"], self._epoch_steps + count
        if count:
            self._lr = values["lr"]
        if progress is not None:
            progress.synced(count)
        by_step = dict(losses)
        problems = []
        if values["first_bad_loss"]:
            step = start + values["first_bad_loss"]
            loss = by_step.get(step)
            problems.append((step, f"training loss is {loss if loss is not None else 'NaN or inf'}"))
        if values["first_overflow"] and self.cfg.loss_scale != "dynamic":
            step = start + values["first_overflow"]
            loss = by_step.get(step)
            problems.append((step, "gradients are not finite" + (f" (loss {loss:.4g})" if loss is not None else "")))
        if values["max_consecutive"] > MAX_CONSECUTIVE_OVERFLOWS:
            problems.append((start + count, f"gradients overflowed {values['max_consecutive']} steps in a row"))
        if problems:
            step, what = min(problems, key=lambda problem: problem[0])  # the earliest; a bad loss first
            epoch = (step - 1) // self.steps_per_epoch
            raise TrainingDiverged(what, step, epoch, step - epoch * self.steps_per_epoch,
                                   self._last_good_description())

    def _effective_sink_size(self, start_in_epoch):
        """Steps per call: 1 for the host loop; with data sinking ``sink_size``, lowered to the greatest common
        divisor with every distance at which the host acts (log lines, epoch end, a mid-epoch start,
        save_every_steps, stop_at_step), so that sunk calls end exactly there."""
        cfg = self.cfg
        if not self.sinking:
            return 1
        size = math.gcd(math.gcd(cfg.sink_size, self.steps_per_epoch), cfg.log_interval)
        start_global = self.epochs_done * self.steps_per_epoch + start_in_epoch
        for distance in (start_in_epoch, cfg.save_every_steps,
                         (cfg.stop_at_step or 0) - start_global):
            if distance > 0:
                size = math.gcd(size, distance)
        if size != cfg.sink_size and not self._sink_note_logged:
            self._sink_note_logged = True
            self.log.info(f"data sink: {size} step(s) per call (sink_size {cfg.sink_size} must divide the steps "
                          f"per epoch {self.steps_per_epoch}, log_interval {cfg.log_interval} and the checkpoint "
                          f"and stop steps)")
        return size

    def _steps_runner(self, dataset, size):
        """A callable that runs ``size`` training steps and returns the last step's loss (a device tensor):
        one sunk call through ``ms.data_sink`` on Ascend/GPU, the next batch from the host iterator on CPU."""
        if self.sinking:
            import mindspore as ms
            return ms.data_sink(self.monitored, dataset, sink_size=size, jit_config=ms.JitConfig())
        iterator = dataset.create_tuple_iterator(num_epochs=1, do_copy=False)

        def run():
            batch = next(iterator)  # images, labels (, random-erasing draws)
            if not self._step_compiled:  # compile first, then free the compiler's heap before the step runs
                compile_then_release(self.monitored, *batch)
                self._step_compiled = True
            return self.monitored(*batch)
        return run

    def fit(self) -> dict:
        """Train from the current state to ``cfg.epochs`` (or ``stop_at_step``). Returns a summary dict.

        The host does not wait for the device per step: losses, lr and the non-finite flags stay on the device
        (``MonitoredStep``) and are read at log intervals, before every checkpoint and at epoch ends.
        """
        cfg = self.cfg
        if self.writer:
            os.makedirs(self.output_dir, exist_ok=True)
            with open(os.path.join(self.output_dir, "config.yaml"), "w", encoding="utf-8") as handle:
                handle.write(cfg.to_yaml())
        self._log_setup()
        start = time.time()
        self._window_start = self._host_step = self.global_step()
        self._pending, self._log_sum, self._log_steps, self._lr = [], 0.0, 0, float("nan")
        self.monitored.read()  # a fresh window
        progress = ProgressMeter(self.log, self.total_steps, self.steps_per_epoch, cfg.epochs, self.global_batch,
                                 start_step=self._window_start)
        last_val = None
        stopped_early = False
        self.network.set_train(True)
        while self.epochs_done < cfg.epochs:
            epoch_start = time.time()
            if self._run_epoch(progress):
                stopped_early = True
                self._save_last(f"stop_at_step {cfg.stop_at_step}", progress)
                break
            val, stopped_early = self._end_epoch(epoch_start, progress)
            last_val = val if val is not None else last_val
            if stopped_early:
                break
        elapsed = time.time() - start
        self.log.info(f"finished at step {self.global_step()} in {format_duration(elapsed)}"
                      + (f"; best val {self.task.PRIMARY_METRIC} {self.best_top1:.2f} (epoch {self.best_epoch})"
                         if self.best_top1 is not None else ""))
        return {"global_step": self.global_step(), "epochs_done": self.epochs_done, "best_top1": self.best_top1,
                "best_epoch": self.best_epoch, "last_val": last_val, "time_s": elapsed,
                "last_checkpoint": self.last_checkpoint,
                "best_checkpoint": os.path.join(self.output_dir, BEST) if self.best_top1 is not None else None,
                "images_per_s": progress.images_per_second(), "stopped_early": stopped_early,
                "skipped_steps": self.skipped_steps}

    def _run_epoch(self, progress):
        """The training steps of the current epoch, from ``step_in_epoch`` on: log lines, step checkpoints.
        Returns True when ``stop_at_step`` ended it early (the caller saves), False at the epoch's end."""
        cfg, epoch = self.cfg, self.epochs_done
        self._epoch_sum, self._epoch_steps = 0.0, 0
        dataset = self.task.train_dataset(cfg, self.train_index, self.num_classes, cfg.seed + epoch,
                                          self.group_size, self.rank)
        if self.step_in_epoch:
            dataset = dataset.skip(self.step_in_epoch)
        size = self._effective_sink_size(self.step_in_epoch)
        run = self._steps_runner(dataset, size)
        progress.start_epoch()
        first_call = True
        while self.step_in_epoch < self.steps_per_epoch:
            try:
                loss = run()
            except StopIteration:
                raise DataError(f"epoch {epoch + 1} yielded {self.step_in_epoch} batches, expected "
                                f"{self.steps_per_epoch}") from None
            self.step_in_epoch += size
            self._host_step += size
            step = self._host_step
            self._pending.append((step, loss))
            log_due = self.step_in_epoch % cfg.log_interval == 0 or self.step_in_epoch == self.steps_per_epoch
            if first_call or log_due:  # the first wait of an epoch starts its timing
                self._read_window(progress)
                first_call = False
            if log_due:
                record, text = progress.line(epoch, self.step_in_epoch, self._log_sum / max(self._log_steps, 1),
                                             self._lr)
                self._log_sum, self._log_steps = 0.0, 0
                self.log.info(text)
                self.metrics.write(record)
            if self.step_in_epoch == self.steps_per_epoch:
                break
            if self.save_schedule.stops(step):
                return True
            if self.save_schedule.step_due(step):
                self._save_last(f"every {cfg.save_every_steps} steps", progress)
        return False

    def _end_epoch(self, epoch_start, progress):
        """After an epoch's last step: norm statistics across ranks, the state check, validation, the epoch
        record, checkpoints and the curves. Returns (validation result or None, stopped by stop_at_step)."""
        cfg = self.cfg
        self.epochs_done += 1
        self.step_in_epoch = 0
        if self.sync is not None:  # norm statistics were computed on each rank's own shard
            self.sync.average([param for _, param in self.named_params if not param.requires_grad])
            if self.ema is not None:
                self.sync.average(list(self.ema.params))
        record = {"type": "epoch", "epoch": self.epochs_done, "global_step": self.global_step(),
                  "train_loss": self._epoch_sum / self._epoch_steps if self._epoch_steps else None,
                  "lr": self._lr,
                  "epoch_time_s": time.time() - epoch_start}
        last_epoch = self.epochs_done == cfg.epochs
        self._check_state_finite()
        val = None
        if self.val_index is not None and (self.epochs_done % cfg.val_every_epochs == 0 or last_epoch):
            val = self.validate()
            record.update(self.task.record(val))
            score = val[self.task.PRIMARY_METRIC]  # best_top1 holds the task's primary metric
            improved = self.best_top1 is None or score > self.best_top1
            if improved:
                self.best_top1, self.best_epoch = score, self.epochs_done
            self.log.info(f"epoch {self.epochs_done}/{cfg.epochs} {self.task.describe(val)} (best "
                          f"{self.task.PRIMARY_METRIC} {self.best_top1:.2f} at epoch {self.best_epoch}); "
                          f"epoch time {format_duration(record['epoch_time_s'])}")
            if improved:
                self._save(BEST)
        record["best_top1"] = self.best_top1
        self.metrics.write(record)
        saved = self.save_schedule.epoch_due(self.epochs_done, self.global_step())
        if saved:
            self._save_last(f"epoch {self.epochs_done}", progress)
        if cfg.plot and self.writer:
            plot_curves(os.path.join(self.output_dir, METRICS_FILE), os.path.join(self.output_dir, PLOT_FILE),
                        self.log if self.epochs_done == 1 else None)
        if self.save_schedule.stops(self.global_step()) and not last_epoch:
            if not saved:
                self._save_last(f"stop_at_step {cfg.stop_at_step}", progress)
            return val, True
        return val, False


def train(cfg: Config) -> tuple["Trainer", dict]:
    """Train a config; returns ``(trainer, summary)``."""
    trainer = Trainer(cfg)
    return trainer, trainer.fit()

