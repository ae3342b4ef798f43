"""visualize_predictions.py: the prediction and reconstruction figures, per-class accuracy, and bad checkpoints."""
import re

import pytest
import torch
from PIL import Image

import figures
import visualize_predictions
from conftest import assert_one_line_error, load_state

pytestmark = pytest.mark.usefixtures("one_thread")


def test_figures_and_per_class_accuracy(tmp_path, tiny_image_folder, classifier_run, mae_run, capsys):
    predictions, reconstructions = tmp_path / "predictions.png", tmp_path / "reconstructions.png"
    visualize_predictions.main(["--model_path", str(classifier_run.best), "--mae_model_path", str(mae_run.checkpoint),
                                "--data_dir", str(tiny_image_folder), "--device", "cpu", "--output", str(predictions),
                                "--reconstruction_output", str(reconstructions)])
    for path in (predictions, reconstructions):
        with Image.open(path) as image:
            image.load()
            assert image.format == "PNG" and image.width > 0 and image.height > 0
    with Image.open(predictions) as image:  # 20 test images, 8 per row, each drawn 4x larger (64 px)
        assert image.width >= 8 * 64 and image.height >= 3 * 64

    out = capsys.readouterr().out
    lines = re.findall(r"^\s*(\S+)\s+([\d.]+) %\s+\((\d+) images\)$", out, flags=re.MULTILINE)
    assert [name for name, _, _ in lines] == [f"class{i}" for i in range(10)] + ["all"]
    assert [int(count) for _, _, count in lines] == [2] * 10 + [20]
    per_class = [float(acc) for _, acc, _ in lines[:-1]]
    assert all(0 <= acc <= 100 for acc in per_class)
    # The overall line agrees with the per-class ones (equal class sizes) and with the accuracy that
    # train_classifier measured for this very checkpoint.
    overall = float(lines[-1][1])
    assert overall == pytest.approx(sum(per_class) / 10, abs=0.01)
    assert overall == pytest.approx(load_state(classifier_run.best)["val_acc"] * 100, abs=0.01)
    assert f"wrote {predictions}" in out and f"wrote {reconstructions}" in out


def test_reconstruction_figure_alone(tmp_path, tiny_image_folder, mae_run, capsys):
    """Without a classifier only the reconstructions are drawn; each extra mask ratio adds rows."""
    heights = []
    for ratios in (["0.75"], ["0.5", "0.75"]):
        output = tmp_path / f"reconstructions_{len(ratios)}.png"
        visualize_predictions.main(["--mae_model_path", str(mae_run.checkpoint), "--data_dir", str(tiny_image_folder),
                                    "--device", "cpu", "--reconstruction_output", str(output),
                                    "--output", str(tmp_path / "unused.png"), "--mask_ratios", *ratios])
        with Image.open(output) as image:
            assert image.width > 0 and image.height > 0
            heights.append(image.height)
    assert heights[1] > heights[0]
    assert not (tmp_path / "unused.png").exists()  # no classifier, no prediction figure
    assert "%" not in capsys.readouterr().out


def test_reconstruction_grid_leaves_the_training_random_stream_alone(mae_run):
    """Pretraining draws this figure every epoch: it must not shift the masks of the next epoch (resume relies
    on that), and it shows the same masks every time."""
    model = visualize_predictions.load_model(mae_run.checkpoint, "mae", "--mae_model_path", 16, None, False)
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = figures.reconstruction_grid(model, images)
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(figures.reconstruction_grid(model, images), first)
    assert first.shape == (3, 3 * 17 + 1, 4 * 17 + 1)  # 3 rows x 4 images of 16 px, 1 px padding


@pytest.mark.parametrize("flag, checkpoint, expected", [
    ("--model_path", "mae", "is an MAE checkpoint; --model_path needs a classifier"),
    ("--mae_model_path", "classifier", "is a classifier checkpoint; --mae_model_path needs an MAE"),
    ("--model_path", "missing", "is not a checkpoint file"),
], ids=["mae-as-classifier", "classifier-as-mae", "missing"])
def test_wrong_checkpoints_fail_with_one_line(tmp_path, tiny_image_folder, mae_run, classifier_run, cli_error, flag,
                                              checkpoint, expected):
    path = {"mae": mae_run.checkpoint, "classifier": classifier_run.best, "missing": tmp_path / "nope.pt"}[checkpoint]
    line = cli_error(visualize_predictions.main, [flag, path, "--data_dir", tiny_image_folder, "--device", "cpu",
                                                  "--output", tmp_path / "p.png",
                                                  "--reconstruction_output", tmp_path / "r.png"])
    assert expected in line
    assert not list(tmp_path.glob("*.png"))


def test_nothing_to_draw(cli_error, tiny_image_folder):
    assert "nothing to draw" in cli_error(visualize_predictions.main, ["--data_dir", tiny_image_folder])


def test_wrong_kind_from_the_command_line(tmp_path, tiny_image_folder, mae_run, run_script):
    result = run_script("visualize_predictions.py", "--model_path", mae_run.checkpoint, "--data_dir",
                        tiny_image_folder, "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 2
    assert "needs a classifier" in assert_one_line_error(result.stderr)
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("extra, expected", [
    (["--mae_model_path", "{classifier}"], "is a classifier checkpoint; --mae_model_path needs an MAE"),
    (["--mae_model_path", "{mae}", "--mask_ratios", "0.999"], "no masking strategy leaves a visible patch"),
], ids=["classifier-as-mae", "ratio-too-high"])
def test_a_bad_second_checkpoint_stops_before_the_first_figure(tmp_path, tiny_image_folder, mae_run, classifier_run,
                                                               cli_error, extra, expected):
    fill = {"{classifier}": str(classifier_run.best), "{mae}": str(mae_run.checkpoint)}
    line = cli_error(visualize_predictions.main, ["--model_path", classifier_run.best, *[fill.get(e, e) for e in extra],
                                                  "--data_dir", tiny_image_folder, "--device", "cpu",
                                                  "--output", tmp_path / "p.png",
                                                  "--reconstruction_output", tmp_path / "r.png"])
    assert expected in line
    assert not list(tmp_path.glob("*.png"))


def test_an_existing_figure_is_replaced_only_with_overwrite(tmp_path, tiny_image_folder, classifier_run, cli_error):
    output = tmp_path / "p.png"
    output.write_bytes(b"someone else's figure")
    argv = ["--model_path", classifier_run.best, "--data_dir", tiny_image_folder, "--device", "cpu",
            "--output", output]
    assert "already exists; pass --overwrite" in cli_error(visualize_predictions.main, argv)
    assert output.read_bytes() == b"someone else's figure"
    visualize_predictions.main([str(a) for a in argv] + ["--overwrite"])
    with Image.open(output) as image:
        assert image.format == "PNG"


def test_a_missing_output_folder_is_made(tmp_path, tiny_image_folder, mae_run):
    output = tmp_path / "figures" / "new" / "r.png"
    visualize_predictions.main(["--mae_model_path", str(mae_run.checkpoint), "--data_dir", str(tiny_image_folder),
                                "--device", "cpu", "--reconstruction_output", str(output)])
    assert output.is_file()


def test_data_whose_classes_differ_from_the_checkpoints_is_refused(tmp_path, tiny_image_folder, classifier_run,
                                                                    cli_error):
    """A renamed class folder would shift every label by one, silently: refused, naming both lists."""
    import shutil

    data = shutil.copytree(tiny_image_folder, tmp_path / "data")
    for split in ("train", "test"):
        (data / split / "class0").rename(data / split / "class99")  # sorted last now: every label moves
    line = cli_error(visualize_predictions.main, ["--model_path", classifier_run.best, "--data_dir", data,
                                                  "--device", "cpu", "--output", tmp_path / "p.png"])
    assert "was trained on the classes ['class0', 'class1'" in line and "the data has ['class1', 'class2'" in line
    assert not (tmp_path / "p.png").exists()
