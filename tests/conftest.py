"""Shared test setup."""
import sys
from pathlib import Path

# The modules under test live in the repository root; make `import model` work however pytest is started.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


# ------------------------------------------------------------------- fixtures for the three script test files
# test_mae_pretrain.py, test_train_classifier.py and test_visualize_predictions.py call each script's
# ``main(argv)`` in-process (fast) and start a few real processes for exit codes, stderr, signals and torchrun.
import os
import signal
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # as torchrun sets it; tiny models need no more
IMAGE_SIZE, NUM_CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS = 16, 10, 8, 2
TINY_ENCODER = ["--emb_dim", "32", "--encoder_heads", "2", "--encoder_depth", "1"]
TINY_DECODER = ["--decoder_heads", "2", "--decoder_depth", "1"]
# Tests pin fp32 eager: exact comparisons, and no compile time (the defaults pick bf16 / torch.compile where fast).
TINY_SCHEDULE = ["--batch_size", "16", "--max_device_batch_size", "8", "--total_epoch", "2", "--warmup_epoch", "1",
                 "--device", "cpu", "--precision", "fp32", "--no_compile"]


def write_image_folder(root, train_classes, test_classes, train_per_class=TRAIN_PER_CLASS,
                       test_per_class=TEST_PER_CLASS, size=IMAGE_SIZE, seed=0):
    """``root/train/<class>/*.png`` and ``root/test/<class>/*.png`` of random pixels; returns ``root``."""
    rng = np.random.default_rng(seed)
    for split, classes, count in (("train", train_classes, train_per_class), ("test", test_classes, test_per_class)):
        for name in classes:
            folder = Path(root) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return Path(root)


def write_coloured_image_folder(root, size=16, per_class=6, seed=0):
    """train/<class>/*.png and test/<class>/*.png: each class a colour, each image that colour plus noise."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (NUM_CLASSES, 3))
    for split in ("train", "test"):
        for c in range(NUM_CLASSES):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = np.clip(colours[c] + rng.integers(-30, 31, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def tiny_image_folder(tmp_path_factory):
    """10 classes x 8 train and x 2 test PNGs of 16 x 16 random pixels."""
    classes = [f"class{i}" for i in range(NUM_CLASSES)]
    return write_image_folder(tmp_path_factory.mktemp("images"), classes, classes)


@pytest.fixture(autouse=True)
def restore_signal_handlers():
    """``main`` installs SIGINT / SIGTERM handlers (utils.StopFlag); give pytest its own back afterwards."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.fixture(scope="session")
def mae_argv(tiny_image_folder):
    """argv for a tiny 2-epoch pretraining run whose logs and checkpoint go to ``workdir``; extras override."""

    def build(workdir, *extra, model_name="mae.pt"):
        workdir = Path(workdir)
        return ["--data_dir", str(tiny_image_folder), "--log_dir", str(workdir / "logs"),
                "--model_path", str(workdir / model_name), *TINY_ENCODER, *TINY_DECODER, *TINY_SCHEDULE,
                *map(str, extra)]

    return build


@pytest.fixture(scope="session")
def cls_argv(tiny_image_folder):
    """argv for a tiny 2-epoch classifier run whose logs and checkpoints go to ``workdir``; extras override."""

    def build(workdir, *extra, model_name="cls.pt"):
        workdir = Path(workdir)
        return ["--data_dir", str(tiny_image_folder), "--log_dir", str(workdir / "logs"),
                "--output_model_path", str(workdir / model_name), *TINY_ENCODER, *TINY_SCHEDULE,
                *map(str, extra)]

    return build


def _keep_signals(fn):
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is as fast, and far faster on a busy 2-core machine
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)
        for s, handler in saved.items():
            signal.signal(s, handler)


@pytest.fixture
def one_thread():
    """Tiny models run as fast on one CPU thread, without spin-waiting when the machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def short_budgets(monkeypatch):
    """In-process runs may take budgets of a few seconds: nothing imports inside them (a real process's floor stays)."""
    import run_setup

    monkeypatch.setattr(run_setup, "MIN_BUDGET_MINUTES", 0.05)


def run_dirs(log_dir):
    """The run folders under ``log_dir/<dataset>/``."""
    return sorted(p for p in Path(log_dir).glob("*/*") if p.is_dir())


@pytest.fixture(scope="session")
def mae_run(tmp_path_factory, mae_argv):
    """One tiny pretraining run (2 epochs), shared by the tests that only read what it wrote."""
    import mae_pretrain

    workdir = tmp_path_factory.mktemp("mae_run")
    _keep_signals(lambda: mae_pretrain.main(mae_argv(workdir)))
    (run_dir,) = run_dirs(workdir / "logs")
    return SimpleNamespace(workdir=workdir, checkpoint=workdir / "mae.pt", run_dir=run_dir)


@pytest.fixture(scope="session")
def classifier_run(tmp_path_factory, cls_argv, mae_run):
    """Fine-tuning (2 epochs) from ``mae_run``'s checkpoint."""
    import train_classifier

    workdir = tmp_path_factory.mktemp("classifier_run")
    argv = cls_argv(workdir, "--pretrained_model_path", mae_run.checkpoint)
    _keep_signals(lambda: train_classifier.main(argv))
    (run_dir,) = run_dirs(workdir / "logs")
    return SimpleNamespace(workdir=workdir, best=workdir / "cls.pt", last=workdir / "cls_last.pt", run_dir=run_dir)


@pytest.fixture(scope="session")
def run_script():
    """Run ``script`` (a file in the repository) as a real process in ``cwd``; returns the CompletedProcess."""

    def run(script, *args, cwd, timeout=180):
        return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, capture_output=True,
                              text=True, timeout=timeout, env=SUBPROCESS_ENV)

    return run


def assert_one_line_error(stderr):
    """The user-facing contract: one error line on stderr, and no traceback. argparse's usage lines may come
    first; the line returned is ``error: ...`` (ours) or ``<script>: error: ...`` (argparse's)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    if lines and lines[0].startswith("usage:"):
        lines = [line for line in lines[1:] if not line.startswith(" ")]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") or ": error: " in lines[0], stderr
    return lines[0]


@pytest.fixture
def cli_error(capsys):
    """``utils.run_cli(main, argv)`` in-process: asserts exit code 2 and a one-line stderr; returns that line."""
    import utils

    def run(main, argv):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            utils.run_cli(main, [str(a) for a in argv])
        assert exit_info.value.code == 2
        return assert_one_line_error(capsys.readouterr().err)

    return run


def read_metrics(run_dir):
    """(header, rows as dicts) of ``run_dir/metrics.csv``."""
    import csv

    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def load_state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def read_hparams(run_dir):
    """What the run wrote for TensorBoard's HParams view into its own events file: (settings, {metric: last value}),
    checking that the metrics the experiment declares are the ``hparams/`` scalars written."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    (events,) = Path(run_dir).glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    content = {tag: HParamsPluginData.FromString(data) for tag, data in
               accumulator.PluginTagToContent("hparams").items()}
    declared = {info.name.tag for info in content["_hparams_/experiment"].experiment.metric_infos}
    written = {tag for tag in accumulator.Tags()["scalars"] if tag.startswith("hparams/")}
    assert declared == written
    start = content["_hparams_/session_start_info"].session_start_info
    settings = {name: getattr(value, value.WhichOneof("kind")) for name, value in start.hparams.items()}
    return settings, {tag.removeprefix("hparams/"): accumulator.Scalars(tag)[-1].value for tag in written}


@pytest.fixture
def stop_after_epoch(monkeypatch):
    """``with stop_after_epoch(n) as flags: main(argv)`` runs as if SIGTERM arrived during epoch ``n``.

    ``main``'s bookkeeping.StopFlag is recorded, and once epoch ``n`` is logged its ``requested`` is set, which is what
    the signal handler does: the run finishes that epoch, saves and returns. (A real SIGTERM to a real process is
    tested in test_mae_pretrain.py.) ``flags`` lists the StopFlags that were installed.
    """
    from contextlib import contextmanager

    import bookkeeping
    import utils

    @contextmanager
    def stop_after(last_epoch):
        flags = []
        install, log = bookkeeping.StopFlag.install, utils.RunLogger.log

        def recording_install(self):
            flags.append(self)
            return install(self)

        def log_then_stop(self, epoch, **values):
            log(self, epoch, **values)
            if epoch == last_epoch:
                for flag in flags:
                    flag.requested = True

        with monkeypatch.context() as m:
            m.setattr(bookkeeping.StopFlag, "install", recording_install)
            m.setattr(utils.RunLogger, "log", log_then_stop)
            yield flags

    return stop_after
