"""Bad input to every script: refused with one error line naming the flag, exit code 2, and no file written.

A catalogue of the mistakes people make (ranges, impossible combinations, paths that are files or folders,
devices that are not there). Each case runs the script's ``main`` in-process through ``utils.run_cli``.
"""
import pytest

import benchmark
import export_timm
import mae_pretrain
import train_classifier
import visualize_predictions
from conftest import TINY_DECODER, TINY_ENCODER

SCRIPTS = {"mae": mae_pretrain.main, "cls": train_classifier.main, "vis": visualize_predictions.main,
           "export": export_timm.main, "bench": benchmark.main}
RUN = ["--device", "cpu", "--precision", "fp32", "--no_compile", "--batch_size", "16", "--max_device_batch_size",
       "8", "--total_epoch", "1", "--warmup_epoch", "0"]

CASES = [  # (script, argv after the common ones, what the error line must contain)
    ("mae", ["--total_epoch", "0"], "argument --total_epoch: 0 is not allowed"),
    ("mae", ["--warmup_epoch", "-1"], "argument --warmup_epoch: -1"),
    ("mae", ["--decoder_depth", "0"], "argument --decoder_depth: 0"),
    ("mae", ["--encoder_depth", "-3"], "argument --encoder_depth: -3"),
    ("mae", ["--batch_size", "0"], "argument --batch_size: 0"),
    ("mae", ["--max_device_batch_size", "lots"], "argument --max_device_batch_size: 'lots' is not an integer"),
    ("mae", ["--mask_ratio", "nan"], "argument --mask_ratio: nan is not a finite number"),
    ("mae", ["--mask_ratio", "1"], "argument --mask_ratio: 1 is not allowed"),
    ("mae", ["--base_learning_rate", "-1e-3"], "argument --base_learning_rate"),
    ("mae", ["--knn_every", "-1"], "argument --knn_every"),
    ("mae", ["--probe_epochs", "-2"], "argument --probe_epochs"),
    ("mae", ["--device", "gpu"], "argument --device: 'gpu' is not a device"),
    ("mae", ["--device", "cuda:3"], "argument --device: cuda:3"),
    ("mae", ["--log_dir", "{file}"], "Not a directory"),  # the OS says it
    ("mae", ["--log_dir", "{file}/below"], "Not a directory"),
    ("mae", ["--model_path", "{tmp}"], "argument --model_path: {tmp} is a folder"),
    ("mae", ["--resume", "{tmp}/none.pt"], "argument --resume"),
    ("mae", ["--run_name", "../escape"], "argument --run_name"),
    ("mae", ["--data_dir", "{file}"], "--data_dir needs train/<class>/ and test/<class>/ inside"),
    ("mae", ["--batch_size", "1024", "--max_device_batch_size", "1024"], "larger than the 80 training images"),
    ("cls", ["--label_smoothing", "1"], "argument --label_smoothing: 1"),
    ("cls", ["--model_ema", "1"], "argument --model_ema: 1 is not allowed: it must be in [0, 1)"),
    ("cls", ["--mixup", "-0.2"], "argument --mixup"),
    ("cls", ["--layer_decay", "0"], "argument --layer_decay"),
    ("cls", ["--linear_probe"], "--linear_probe needs --pretrained_model_path"),
    ("cls", ["--pretrained_model_path", "{tmp}"], "argument --pretrained_model_path"),
    ("cls", ["--output_model_path", "{tmp}"], "argument --output_model_path"),
    ("cls", ["--emb_dim", "30", "--encoder_heads", "4"], "--emb_dim 30 is not divisible by --encoder_heads 4"),
    ("vis", ["--num_images", "0"], "argument --num_images"),
    ("vis", ["--mask_ratios", "0.5", "1.0"], "argument --mask_ratios"),
    ("vis", [], "nothing to draw"),
    ("vis", ["--model_path", "{tmp}/none.pt"], "argument --model_path"),
    ("vis", ["--mae_model_path", "{file}", "--reconstruction_output", "{tmp}"], "argument --reconstruction_output"),
    ("export", ["{tmp}/none.pt", "{tmp}/out.pt"], "argument checkpoint"),
    ("export", ["{file}", "{file}"], "is the input checkpoint"),
    ("export", ["{file}", "{tmp}"], "argument output"),
    ("mae", ["--model_path", ""], "argument --model_path: an empty path"),
    ("mae", ["--log_dir", " "], "argument --log_dir: an empty path"),
    ("mae", ["--data_dir", ""], "argument --data_dir: an empty path"),
    ("mae", ["--run_name", "."], "argument --run_name: '.' is not a folder name below --log_dir"),
    ("mae", ["--run_name", "{tmp}/elsewhere"], "is not a folder name below --log_dir"),
    ("mae", ["--run_name", "r", "--model_path", "{tmp}/logs/cifar10/r/metrics.csv"], "a run folder's log file"),
    ("mae", ["--model_path", "{data}/train/m.pt"], "is inside the data folder"),
    ("mae", ["--warmup_epoch", "5", "--total_epoch", "2"], "argument --warmup_epoch: 5 is longer than --total_epoch 2"),
    ("mae", ["--seed", "-1"], "argument --seed: -1 is not allowed"),
    ("mae", ["--total_epoch", "99999999999999999999"], "argument --total_epoch"),
    ("cls", ["--pretrained_model_path", "{file}", "--output_model_path", "{file}"],
     "is the --pretrained_model_path input"),
    ("cls", ["--output_model_path", ""], "argument --output_model_path: an empty path"),
    ("vis", ["--model_path", "{file}", "--output", "{tmp}/p.pt"], "does not end in an image format"),
    ("vis", ["--model_path", "{file}", "--output", "{tmp}/no_suffix"], "does not end in an image format"),
    ("vis", ["--model_path", "{file}", "--output", "{file}"], "is the --model_path input"),
    ("vis", ["--model_path", "{file}", "--output", "{data}/train/a.png"], "is inside the data folder"),
    ("vis", ["--model_path", "{file}", "--mae_model_path", "{file}", "--reconstruction_output", "{tmp}/p.png"],
     "is also where --output goes"),
    ("vis", ["--model_path", "{file}", "--seed", "-1"], "argument --seed"),
    ("vis", ["--model_path", "{file}", "--output", ""], "argument --output: an empty path"),
    ("export", ["{file}", ""], "argument output: an empty path"),
    ("bench", ["--steps", "0"], "argument --steps"),
    ("bench", ["--batch_sizes", "8", "-8"], "argument --batch_sizes"),
    ("bench", ["--emb_dim", "32"], "divisible"),
    ("bench", ["--output", "{tmp}"], "could not write {tmp} (Is a directory"),
    # Names the file system cannot hold: the OS's own error, one line, before the run writes anything.
    ("mae", ["--run_name", "{long}"], "argument --run_name: a folder name longer than 200 bytes"),
    ("mae", ["--model_path", "{tmp}/{long}.pt"], "File name too long"),
    ("mae", ["--log_dir", "{tmp}/{long}/logs"], "File name too long"),
    ("cls", ["--output_model_path", "{tmp}/{long}/c.pt"], "File name too long"),
    ("vis", ["--model_path", "{file}", "--output", "{tmp}/{long}.png"], "File name too long"),
    ("export", ["{file}", "{tmp}/{long}.pt"], "File name too long"),
    ("bench", ["--output", "{tmp}/{long}.csv"], "(File name too long"),  # at the write, after the table
    ("mae", ["--log_dir", "/proc/logs"], "/proc/logs"),
    # Finite but absurd: the learning rate (base * batch / 256) overflows, or AdamW's decay factor turns negative.
    ("mae", ["--base_learning_rate", "1e300"], "argument --base_learning_rate"),
    ("cls", ["--base_learning_rate", "10000"], "the learning rate (base * --batch_size / 256) must stay below 20"),
    ("mae", ["--time_budget", "missing/budget.json"], "--time_budget: missing/budget.json is not a budget.json"),
    # A model or batch far beyond any machine's memory: counted before anything is allocated.
    ("mae", ["--emb_dim", "1000000", "--encoder_heads", "1", "--decoder_heads", "1"], "needs more memory than"),
    ("cls", ["--emb_dim", "4096", "--encoder_depth", "100000"], "needs more memory than a machine has"),
]


def argv_for(script, extra, folder, data):
    if script == "mae":
        return ["--data_dir", str(data), "--log_dir", str(folder / "logs"), "--model_path", str(folder / "m.pt"),
                *TINY_ENCODER, *TINY_DECODER, *RUN, *extra]
    if script == "cls":
        return ["--data_dir", str(data), "--log_dir", str(folder / "logs"),
                "--output_model_path", str(folder / "c.pt"), *TINY_ENCODER, *RUN, *extra]
    if script == "vis":
        return ["--data_dir", str(data), "--device", "cpu", "--output", str(folder / "p.png"), *extra]
    if script == "bench":
        return ["--device", "cpu", "--steps", "1", "--warmup", "0", "--batch_sizes", "2", "--compile_modes", "none",
                "--workloads", "pretrain", "--precisions", "fp32", *extra]
    return extra


@pytest.mark.parametrize("script, extra, expected", CASES,
                         ids=[f"{s}{'_'.join(e)[:40]}".replace("{", "").replace("}", "") for s, e, _ in CASES])
def test_bad_input_is_one_error_line_and_exit_2_before_any_file(tmp_path, cli_error, tiny_image_folder, script,
                                                                extra, expected):
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "a_file").write_text("not a folder, not a checkpoint")
    fill = lambda text: text.format(tmp=folder, file=folder / "a_file", data=tiny_image_folder, long="x" * 300)
    before = sorted(p.name for p in folder.rglob("*"))
    line = cli_error(SCRIPTS[script], argv_for(script, [fill(e) for e in extra], folder, tiny_image_folder))
    assert fill(expected) in line
    assert sorted(p.name for p in folder.rglob("*")) == before  # nothing written, nothing replaced
