"""Run output: progress lines, a log file, the metrics JSON-lines file and the curves plot.

Only the writer rank (rank 0) creates files; other ranks log warnings and errors to their stderr only.
"""
import datetime
import json
import logging
import os
import sys
import time

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"
LOG_FILE = "train.log"


def format_duration(seconds):
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def setup_logging(output_dir=None, writer=True, name="engine"):
    """Log INFO to stdout (and ``output_dir/train.log`` on the writer rank); other ranks log WARNING+."""
    log = logging.getLogger(name)
    log.setLevel(logging.INFO if writer else logging.WARNING)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(console)
    if writer and output_dir:
        os.makedirs(output_dir, exist_ok=True)
        file_handler = logging.FileHandler(os.path.join(output_dir, LOG_FILE))
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(file_handler)
    return log


class ProgressMeter:
    """Training progress lines: epoch, step, loss, lr, images/s and ETA.

    The host learns about finished steps only when it waits for the device (``synced``): the speed is
    measured over the steps between such waits, leaving out the first wait of each epoch (graph
    compilation, pipeline start).
    """

    def __init__(self, log, total_steps, steps_per_epoch, epochs, images_per_step, start_step=0):
        self.log = log
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.epochs = epochs
        self.images_per_step = images_per_step
        self.timed_steps = 0
        self.timed_seconds = 0.0
        self.last_time = None
        self.global_step = start_step

    def start_epoch(self):
        self.last_time = None

    def synced(self, steps):
        """``steps`` more steps are finished (the host has just waited for them)."""
        now = time.time()
        if self.last_time is not None:
            self.timed_seconds += now - self.last_time
            self.timed_steps += steps
        self.last_time = now
        self.global_step += steps

    def images_per_second(self):
        if self.timed_steps == 0:
            return 0.0
        return self.images_per_step * self.timed_steps / self.timed_seconds

    def eta_seconds(self):
        if self.timed_steps == 0:
            return None
        return (self.total_steps - self.global_step) * self.timed_seconds / self.timed_steps

    def line(self, epoch, step_in_epoch, loss, lr):
        """The progress record (``loss``: mean training loss since the last line): dict and formatted text."""
        eta = self.eta_seconds()
        record = {"type": "train", "epoch": epoch + 1, "step": step_in_epoch, "global_step": self.global_step,
                  "loss": loss, "lr": lr, "images_per_s": self.images_per_second(), "eta_s": eta}
        text = (f"epoch {epoch + 1}/{self.epochs} step {step_in_epoch}/{self.steps_per_epoch} "
                f"loss {loss:.4f} lr {lr:.3e} {record['images_per_s']:.1f} img/s "
                f"eta {format_duration(eta) if eta is not None else '?'}")
        return record, text


class RateProgress:
    """Progress of a job over a known number of items (validation, evaluation, the image check, export):
    a line every ``interval_s`` seconds with done/total, items/s and ETA, and a final line.

    Args:
        report: callable taking one line of text (e.g. ``log.info`` or ``print``); None: silent.
        what: what is being done, e.g. 'validation'; unit: item name for the rate, e.g. 'img'.
    """

    def __init__(self, report, total, what, unit="img", interval_s=10.0):
        self.report = report
        self.total = int(total)
        self.what = what
        self.unit = unit
        self.interval_s = interval_s
        self.done = 0
        self.start = time.time()
        self.last_report = self.start

    def rate(self, now=None):
        elapsed = (time.time() if now is None else now) - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def text(self, now=None):
        rate = self.rate(now)
        eta = (self.total - self.done) / rate if rate > 0 else None
        return (f"{self.what}: {self.done}/{self.total} {self.unit} {rate:.1f} {self.unit}/s "
                f"eta {format_duration(eta) if eta is not None else '?'}")

    def update(self, count):
        """``count`` more items done; reports when ``interval_s`` has passed since the last line."""
        self.done += count
        now = time.time()
        if self.report is not None and now - self.last_report >= self.interval_s and self.done < self.total:
            self.last_report = now
            self.report(self.text(now))

    def finish(self):
        """Reports the final line: items, time and rate. Returns it."""
        now = time.time()
        line = (f"{self.what}: {self.done} {self.unit} in {now - self.start:.1f} s "
                f"({self.rate(now):.1f} {self.unit}/s)")
        if self.report is not None:
            self.report(line)
        return line


class StageProgress:
    """Progress of a job made of a few long stages (export: build, compile and run, write, reload and check):
    ``next(text)`` reports 'what [k/n] text (t s so far)'; ``finish()`` the total time."""

    def __init__(self, report, stages, what):
        self.report = report
        self.stages = stages
        self.what = what
        self.index = 0
        self.start = time.time()

    def next(self, text):
        self.index += 1
        if self.report is not None:
            self.report(f"{self.what} [{self.index}/{self.stages}] {text} ({time.time() - self.start:.1f} s so far)")

    def finish(self, text="done"):
        if self.report is not None:
            self.report(f"{self.what}: {text} in {time.time() - self.start:.1f} s")


class MetricsWriter:
    """Appends JSON records to ``metrics.jsonl`` (one object per line)."""

    def __init__(self, output_dir, enabled=True):
        self.path = os.path.join(output_dir, METRICS_FILE) if output_dir else None
        self.enabled = enabled and self.path is not None

    def write(self, record):
        if not self.enabled:
            return
        record = dict(record, time=time.time())
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def read_metrics(path):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def load_pyplot():
    """matplotlib.pyplot with the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(figure, path, dpi):
    """Write ``figure`` to the PNG ``path`` (through a temporary file, so a reader never sees half a PNG)
    and close it. Returns ``path``."""
    import matplotlib.pyplot as plt
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temp_path = str(path) + ".tmp.png"
    figure.savefig(temp_path, dpi=dpi)
    plt.close(figure)
    os.replace(temp_path, path)
    return path


def plot_curves(metrics_path, png_path, log=None):
    """Loss and validation accuracy curves from a metrics file; returns the PNG path or None.

    Needs matplotlib (``pip install -e .[plot]``); without it, logs once and returns None.
    """
    plt = load_pyplot()
    if plt is None:
        if log:
            log.info("matplotlib is not installed: no curves plot (pip install -e .[plot])")
        return None
    records = read_metrics(metrics_path)
    steps = {}
    for record in records:  # a resumed run repeats steps: keep the latest record of each
        if record.get("type") == "train":
            steps[record["global_step"]] = record["loss"]
    epochs = {}
    for record in records:
        if record.get("type") == "epoch" and record.get("val_top1") is not None:
            epochs[record["epoch"]] = record
    figure, (loss_axis, acc_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(sorted(steps), [steps[s] for s in sorted(steps)])
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("training loss")
    if epochs:
        order = sorted(epochs)
        acc_axis.plot(order, [epochs[e]["val_top1"] for e in order], marker="o", label="top-1")
        acc_axis.plot(order, [epochs[e]["val_top5"] for e in order], marker="o", label="top-5")
        acc_axis.legend()
    acc_axis.set_xlabel("epoch")
    acc_axis.set_ylabel("validation accuracy (%)")
    figure.tight_layout()
    return save_figure(figure, png_path, dpi=80)
