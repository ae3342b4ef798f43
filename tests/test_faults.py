"""Faults: a write that fails (a full disk, here a file-size limit), bad data, absurd values and refusals. Each ends
as one line on stderr naming what is wrong, with no traceback, and leaves every earlier file as it was.

A write past RLIMIT_FSIZE fails with EFBIG ("File too large") as one past a full disk fails with ENOSPC, through
the same code; the limit is set in a process of its own, with SIGXFSZ ignored so that Python sees the error.
"""
import json
import logging
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import data
import devices
import mae_pretrain
import summarize
import sweep
import utils
from conftest import REPO, SUBPROCESS_ENV, TINY_DECODER, TINY_ENCODER, assert_one_line_error, write_image_folder
from model import ModelConfig, build_classifier

LIMITED = """
import resource, signal, sys
sys.path.insert(0, {repo!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us


def limit_file_size(size):
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
"""


def run_limited(body, cwd):
    """``body`` (Python) in a process of its own, where ``limit_file_size(bytes)`` caps every file it writes."""
    code = LIMITED.format(repo=str(REPO)) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env=SUBPROCESS_ENV)


def assert_write_refused(result, path, before):
    """Exit code 2, one line naming ``path`` and the cause; the file as it was, no temporary file beside it."""
    assert result.returncode == 2, result.stderr
    line = assert_one_line_error(without_progress_bars(result.stderr))
    assert "Exception in thread" not in result.stderr
    assert "could not write" in line and str(path) in line and "File too large" in line, line
    assert (Path(path).read_bytes() if Path(path).exists() else None) == before
    assert not [p.name for p in Path(path).parent.iterdir() if ".tmp" in p.name]
    return line


def without_progress_bars(stderr):
    """stderr less the progress bar's states (a training run draws them there, each after a carriage return)."""
    return "\n".join(line for line in re.split(r"[\r\n]", stderr) if not re.match(r"\s*\d+%\|", line))


# ---------------------------------------------------------------------------------------- failed writes


def test_a_failed_checkpoint_write_leaves_the_earlier_one_and_says_what_the_script_can_do(tmp_path):
    """export_timm.py has no --resume: its advice is to run it again; the training scripts' is --resume auto."""
    source, output = tmp_path / "cls.pt", tmp_path / "timm.pt"
    config = ModelConfig(image_size=8, patch_size=4, emb_dim=32, encoder_depth=1, encoder_heads=2, num_classes=3)
    utils.atomic_write(source, lambda tmp: torch.save({"kind": "classifier", "config": config.to_dict(),
                                                        "model": build_classifier(config).state_dict()}, tmp))
    output.write_bytes(b"an earlier export")
    result = run_limited(f"""
        import export_timm, utils
        limit_file_size(1000)
        utils.run_cli(export_timm.main, [{str(source)!r}, {str(output)!r}, "--overwrite"])
    """, tmp_path)
    line = assert_write_refused(result, output, b"an earlier export")
    assert "the file there before is unchanged" in line and line.endswith("run the command again")
    assert "--resume" not in line


def test_a_failed_metrics_csv_write_keeps_every_complete_row(tmp_path):
    run = tmp_path / "run"
    fields = [f"a_long_column_name_{i}" for i in range(40)]  # a header far larger than the event file
    result = run_limited(f"""
        import os, utils
        logger = utils.RunLogger({str(run)!r}, {fields!r})
        for epoch in (1, 2):
            logger.log(epoch, loss=0.5)
        limit_file_size(os.path.getsize({str(run / "metrics.csv")!r}) + 10)
        utils.run_cli(lambda argv: logger.log(3, loss=0.25), resumable=True)
    """, tmp_path)
    lines = (run / "metrics.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[-1].startswith("2,")  # header and two whole rows, nothing after them
    line = assert_write_refused(result, run / "metrics.csv", (run / "metrics.csv").read_bytes())
    assert "--resume auto" in line


def test_a_resume_drops_a_row_that_a_crash_left_unreadable(tmp_path):
    """An older version appended rows in place; a crash could leave a torn tail (here NUL bytes, as a file system
    may after a power cut). Resuming after epoch 2 keeps the whole rows and drops that tail."""
    (tmp_path / "metrics.csv").write_text("epoch,loss\n1,0.5\n2,0.4\n\0\0\0")
    logger = utils.RunLogger(tmp_path, ["loss"], start_epoch=3)
    logger.log(3, loss=0.3)
    logger.close()
    assert (tmp_path / "metrics.csv").read_text().splitlines() == ["epoch,loss", "1,0.5", "2,0.4", "3,0.3"]


def test_a_failed_tensorboard_write_is_one_line_from_the_main_thread(tmp_path):
    run = tmp_path / "run"
    result = run_limited(f"""
        import glob, os, numpy, utils
        logger = utils.RunLogger({str(run)!r}, ["loss"])
        logger.log(1, loss=0.5)
        (events,) = glob.glob({str(run / "events.out.tfevents.*")!r})
        limit_file_size(os.path.getsize(events) + 100)  # room for a scalar, not for an image
        def epoch(argv):
            logger.add_image("noise", numpy.random.default_rng(0).random((3, 64, 64)), 2)
            logger.log(2, loss=0.25)
        utils.run_cli(epoch, resumable=True)
    """, tmp_path)
    assert result.returncode == 2, result.stderr
    line = assert_one_line_error(result.stderr)
    assert "Exception in thread" not in result.stderr
    assert "could not write TensorBoard events" in line and str(run / "events.out.tfevents.") in line
    assert "File too large" in line
    assert len((run / "metrics.csv").read_text().splitlines()) == 2  # epoch 1's row stands


def test_a_failed_figure_write_leaves_the_earlier_figure(tmp_path, tiny_image_folder):
    config = ModelConfig(image_size=16, patch_size=4, emb_dim=32, encoder_depth=1, encoder_heads=2, num_classes=10)
    model = tmp_path / "cls.pt"
    utils.atomic_write(model, lambda tmp: torch.save({"kind": "classifier", "config": config.to_dict(),
                                                       "model": build_classifier(config).state_dict()}, tmp))
    figure = tmp_path / "predictions.png"
    Image.new("RGB", (4, 4), "red").save(figure)
    before = figure.read_bytes()
    result = run_limited(f"""
        import utils, visualize_predictions
        limit_file_size(5000)
        utils.run_cli(visualize_predictions.main, ["--model_path", {str(model)!r}, "--data_dir",
                      {str(tiny_image_folder)!r}, "--device", "cpu", "--output", {str(figure)!r}, "--overwrite"])
    """, tmp_path)
    assert_write_refused(result, figure, before)


def test_failed_report_writes_of_summarize_leave_the_earlier_report(tmp_path):
    """summarize.py writes its figures, then results.md: a limit that lets neither through leaves both as they
    were."""
    run = tmp_path / "sweep_a" / "ft_s0"
    run.mkdir(parents=True)
    (run / "settings.json").write_text(json.dumps({"settings": {"stage": "finetune", "seed": 0}, "total_epochs": 1}))
    (run / "metrics.csv").write_text("epoch,val_acc,seconds\n1,0.5,1\n")
    (tmp_path / "sweep_a" / "results.md").write_text("an earlier report\n")
    (tmp_path / "sweep_a" / "finetune_acc.png").write_bytes(b"an earlier figure")
    result = run_limited(f"""
        import utils, summarize
        limit_file_size(100)
        utils.run_cli(summarize.main, [{str(tmp_path / "sweep_a")!r}])
    """, tmp_path)
    line = assert_write_refused(result, tmp_path / "sweep_a" / "finetune_acc.png", b"an earlier figure")
    assert line.endswith("run the command again")
    assert (tmp_path / "sweep_a" / "results.md").read_text() == "an earlier report\n"


def test_a_failed_settings_json_of_a_sweep_is_one_line(tmp_path, cli_error):
    """Here the run folder cannot be made (a file stands in its place); a full disk takes the same path."""
    (tmp_path / "sweeps").write_text("a file, not a folder")
    run = SimpleNamespace(log_dir=tmp_path / "sweeps" / "run", name="r", settings={"seed": 0}, total_epochs=1,
                          checkpoint=tmp_path / "c.pt")
    line = cli_error(lambda argv: sweep.write_settings(run, ["python", "train.py"]), [])
    assert f"could not write {tmp_path / 'sweeps' / 'run' / 'settings.json'} (" in line
    assert [p.name for p in tmp_path.iterdir()] == ["sweeps"]


def test_a_training_run_whose_checkpoint_cannot_be_written_says_how_to_go_on(tmp_path, mae_argv):
    """A real pretraining process: its first checkpoint fails (the limit is below its size); the line names it
    and says --resume auto; --resume auto then finds no checkpoint and says --overwrite, which runs."""
    argv = mae_argv(tmp_path, "--total_epoch", 1, "--warmup_epoch", 0)
    result = run_limited(f"""
        import mae_pretrain, utils
        limit_file_size(100_000)  # the logs fit, the checkpoint (weights and optimizer state) does not
        utils.run_cli(mae_pretrain.main, {[str(a) for a in argv]!r}, resumable=True)
    """, tmp_path)
    line = assert_write_refused(result, tmp_path / "mae.pt", None)
    assert line.startswith("error: could not write checkpoint") and "--resume auto" in line
    with pytest.raises(utils.UserError, match="no checkpoint at .*mae.pt to continue them from; add --overwrite"):
        mae_pretrain.main([*argv, "--resume", "auto"])


# ---------------------------------------------------------------------------------------------- resume auto


def test_resume_auto_without_a_checkpoint_says_it_starts_a_new_run(tmp_path, mae_argv, capsys, one_thread):
    assert mae_pretrain.main(mae_argv(tmp_path, "--total_epoch", 1, "--warmup_epoch", 0, "--resume", "auto")) == 0
    assert f"--resume auto: no checkpoint at {tmp_path / 'mae.pt'} yet; starting a new run" in capsys.readouterr().out
    assert (tmp_path / "mae.pt").is_file()


# ------------------------------------------------------------------------------------------------ bad data


def png_header(width, height):
    """The first bytes of a PNG that says it is ``width`` x ``height``: what a header read sees."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr
            + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)))


def blank_png(path, side):
    """A black ``side`` x ``side`` RGB PNG, its rows compressed one by one (no image of that size is ever held)."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    compressor, row = zlib.compressobj(9), bytes(1 + 3 * side)  # each row: filter type 0, then its pixels
    pixels = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    Path(path).write_bytes(png_header(side, side) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def huge_jpeg():
    """A small JPEG whose header says 65535 x 65535 pixels (4.3 G): a decompression bomb, as PIL calls it."""
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, "JPEG")
    raw = bytearray(buffer.getvalue())
    at = raw.index(b"\xff\xc0")
    raw[at + 5:at + 9] = b"\xff\xff\xff\xff"
    return bytes(raw)


@pytest.mark.parametrize("name, content, expected", [
    ("7.png", lambda: png_header(4000, 4000), "is 4000x4000 pixels but"),
    ("0.png", lambda: png_header(4000, 4000), "is 4000x4000 pixels but"),  # the first file is the odd one
    ("5.jpg", huge_jpeg, "is too large to be one of the data set's images"),
    ("6.png", lambda: png_header(16, 4000), "is 16x4000 pixels (width x height)"),
], ids=["png", "png-first", "jpeg-bomb", "png-tall"])
def test_a_huge_image_is_refused_from_its_header_before_anything_is_decoded(tmp_path, monkeypatch, name, content,
                                                                             expected):
    write_image_folder(tmp_path, ["a", "b"], ["a", "b"], train_per_class=3, test_per_class=1)
    huge = tmp_path / "train" / "b" / name
    huge.write_bytes(content())
    decoded = []
    monkeypatch.setattr(data, "read_image", lambda path: decoded.append(path))
    with pytest.raises(data.DataError, match=re.escape(expected)) as error:
        data.load_dataset(data_dir=str(tmp_path))
    assert str(error.value).startswith(str(huge)) and decoded == []
    with pytest.raises(data.DataError, match=re.escape(expected)):
        data.peek(data_dir=str(tmp_path))  # what the scripts call before anything else


def test_a_data_set_too_large_for_memory_is_refused_before_decoding(tmp_path, monkeypatch):
    write_image_folder(tmp_path, ["a"], ["a"], train_per_class=2, test_per_class=1)
    monkeypatch.setattr(data, "physical_memory", lambda: 2 * 16 * 16 * 3 * 2 - 1)  # twice that would fit
    with pytest.raises(data.DataError, match=r"2 images of 16x16 pixels need .* GiB to load, more than half"):
        data.load_dataset(data_dir=str(tmp_path))


def test_a_run_with_a_huge_image_is_refused_at_the_memory_of_its_imports(tmp_path):
    """A real 10000 x 10000 PNG (300 MB of pixels in a 300 KB file) in a class folder: refused in one line naming
    the file and its size, at the peak memory the process had with the script's imports alone."""
    write_image_folder(tmp_path / "data", ["a", "b"], ["a", "b"], train_per_class=3, test_per_class=1)
    huge = tmp_path / "data" / "train" / "a" / "1.png"
    blank_png(huge, 10_000)
    argv = ["--data_dir", tmp_path / "data", "--log_dir", tmp_path / "logs", "--model_path", tmp_path / "m.pt",
            "--batch_size", 4, "--device", "cpu", *TINY_ENCODER, *TINY_DECODER]
    result = run_limited(f"""
        import atexit, resource
        import mae_pretrain, utils
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # MiB
        imports = peak()
        atexit.register(lambda: print(imports, peak()))
        utils.run_cli(mae_pretrain.main, {[str(a) for a in argv]!r}, resumable=True)
    """, tmp_path)
    assert result.returncode == 2
    line = assert_one_line_error(result.stderr)
    assert str(huge) in line and "10000x10000 pixels" in line
    imports, peak = map(int, result.stdout.split()[-2:])
    assert peak < imports + 60, f"{peak} MiB at the refusal, {imports} MiB with the imports alone"
    assert not (tmp_path / "logs").exists()


# ----------------------------------------------------------------------------------------- short refusals


# The arguments each script needs before a flag it does not know (its positional ones).
POSITIONAL = {"summarize.py": ["{tmp}"], "export_timm.py": ["{tmp}/a.pt", "{tmp}/b.pt"]}


@pytest.mark.parametrize("script", ["mae_pretrain.py", "train_classifier.py", "visualize_predictions.py", "sweep.py",
                                    "summarize.py", "campaign.py", "benchmark.py", "export_timm.py"])
def test_a_refused_flag_is_one_usage_line_and_the_error(script, tmp_path, capsys):
    module = __import__(script[:-3])
    argv = [word.format(tmp=tmp_path) for word in POSITIONAL.get(script, [])]
    with pytest.raises(SystemExit) as exit_info:
        utils.run_cli(module.main, [*argv, "--no_such_flag"])
    assert exit_info.value.code == 2
    prog = Path(sys.argv[0]).name  # argparse's name for the program: the script's own when it is run
    assert capsys.readouterr().err.splitlines() == [
        f"usage: {prog} [options]; see --help", f"{prog}: error: unrecognized arguments: --no_such_flag"]


def test_help_still_prints_everything(capsys):
    with pytest.raises(SystemExit) as exit_info:
        mae_pretrain.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ") and "--mask_strategy" in out and "python mae_pretrain.py" in out


# ----------------------------------------------------------------------------------------- the compiler


@pytest.mark.skipif(torch.cuda.is_available(), reason="the note is about a machine without a GPU")
def test_a_cpu_compile_drops_the_no_cuda_runtime_note_and_nothing_else(monkeypatch, tmp_path):
    import torch.utils.cpp_extension as cpp_extension

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("torch.utils.cpp_extension")
    logger.addHandler(handler)
    try:
        devices.maybe_compile(lambda x: x, torch.device("cpu"))
        monkeypatch.setenv("CUDA_HOME", str(tmp_path))  # CUDA's files without a GPU: what makes torch say it
        cpp_extension._find_cuda_home()
        logger.warning("another warning")
    finally:
        logger.removeHandler(handler)
    assert [record.getMessage() for record in records] == ["another warning"]


def test_os_file_names_too_long_are_refused_by_every_script(tmp_path, cli_error):
    long = "x" * 300
    assert "argument --name: a folder name longer than 200 bytes" in cli_error(sweep.main, ["--name", long, "--log_dir",
                                                                             str(tmp_path)])
    assert "File name too long" in cli_error(summarize.main, [str(tmp_path), "--output_dir",
                                                                                 str(tmp_path / long)])
    assert not list(tmp_path.iterdir())
