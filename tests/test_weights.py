"""Released weights (checkpoint.export_weights: bf16, no optimizer state, under a size limit) load in every script
that takes a checkpoint: fine-tuning from the MAE, the figures, the timm export."""
import pytest
import torch

import checkpoint as ckpt
import export_timm
import train_classifier
import visualize_predictions
from conftest import load_state, run_dirs
from utils import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def released(tmp_path_factory, mae_run, classifier_run):
    folder = tmp_path_factory.mktemp("weights")
    for name, source in (("mae.pt", mae_run.checkpoint), ("cls.pt", classifier_run.last)):
        ckpt.export_weights(load_state(source), folder / name, limit=16 * 2 ** 20)
    return folder


def test_released_weights_are_bf16_without_optimizer_state(released, classifier_run):
    for name, kind in (("mae.pt", "mae"), ("cls.pt", "classifier")):
        state = load_state(released / name)
        assert state["kind"] == kind and "optimizer" not in state and "args" not in state and "rng" not in state
        assert all(v.dtype == torch.bfloat16 for v in state["model"].values() if v.is_floating_point())
    full = load_state(classifier_run.last)
    assert load_state(released / "cls.pt")["classes"] == full["classes"]


def test_a_release_over_the_limit_is_refused_and_leaves_nothing(tmp_path, mae_run):
    with pytest.raises(UserError, match="over the 0 MiB limit"):
        ckpt.export_weights(load_state(mae_run.checkpoint), tmp_path / "big.pt", limit=1000)
    assert list(tmp_path.iterdir()) == []


def test_every_script_loads_released_weights(tmp_path, released, cls_argv, tiny_image_folder):
    # Fine-tuning from the released MAE: its encoder, in fp32 again.
    train_classifier.main(cls_argv(tmp_path / "ft", "--pretrained_model_path", released / "mae.pt", "--total_epoch", 1))
    (run_dir,) = run_dirs(tmp_path / "ft" / "logs")
    assert (run_dir / "metrics.csv").is_file()
    mae = load_state(released / "mae.pt")["model"]
    tuned = load_state(tmp_path / "ft" / "cls_last.pt")
    assert tuned["model"]["patchify.weight"].dtype == torch.float32
    assert tuned["model"]["patchify.weight"].shape == mae["encoder.patchify.weight"].shape
    # The figures from the released classifier and MAE.
    figures = ["--output", str(tmp_path / "p.png"), "--reconstruction_output", str(tmp_path / "r.png")]
    visualize_predictions.main(["--model_path", str(released / "cls.pt"), "--mae_model_path", str(released / "mae.pt"),
                                "--data_dir", str(tiny_image_folder), "--num_images", "4", "--device", "cpu", *figures])
    assert (tmp_path / "p.png").stat().st_size > 0 and (tmp_path / "r.png").stat().st_size > 0
    # timm's VisionTransformer from the released classifier.
    export_timm.main([str(released / "cls.pt"), str(tmp_path / "timm.pt")])
    assert (tmp_path / "timm.pt").is_file()
