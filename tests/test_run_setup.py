"""run_setup.py: presets, shared flags, the rules that keep other runs' files safe, and the save schedule."""

import pytest

import mae_pretrain
import run_setup
import train_classifier
from conftest import read_metrics, run_dirs
from model import ModelConfig, build_mae
from utils import UserError


def test_presets_set_defaults_and_typed_flags_win():
    args = mae_pretrain.parse_args(["--preset", "small", "--total_epoch", "7"])
    assert (args.patch_size, args.emb_dim, args.decoder_depth, args.total_epoch) == (4, 64, 2, 7)
    assert args.run_name == "mae_small_ep7" and args.model_path == "vit-t-mae_small_ep7.pt"
    args, typed_sizes, _ = train_classifier.parse_args(["--preset", "small", "--emb_dim", "48"])
    assert (args.patch_size, args.emb_dim, args.total_epoch) == (4, 48, 2)
    assert (args.batch_size, args.base_learning_rate, args.augment) == (64, 2e-3, "flip")  # the tuned fine-tuning
    assert typed_sizes == {"emb_dim": 48}  # the preset's sizes are not "typed"


@pytest.mark.parametrize("argv, warmup", [
    (["--total_epoch", "100"], 10),  # the reference's 200 of 2000 epochs, cut to the same 10 %
    (["--total_epoch", "2000"], 200),
    (["--preset", "small", "--total_epoch", "1"], 0),  # the preset's 2 of 4
    (["--total_epoch", "100", "--warmup_epoch", "30"], 30),
])
def test_a_default_warmup_longer_than_the_run_is_cut_to_its_share(argv, warmup, capsys):
    args = mae_pretrain.parse_args(argv)
    assert args.warmup_epoch == warmup
    assert ("is cut to" in capsys.readouterr().out) == (argv[-1] in ("100", "1"))


def test_a_typed_warmup_longer_than_the_run_is_refused(capsys):
    with pytest.raises(SystemExit) as stop:
        train_classifier.parse_args(["--total_epoch", "3", "--warmup=4"])
    assert stop.value.code == 2
    assert "argument --warmup_epoch: 4 is longer than --total_epoch 3" in capsys.readouterr().err


def test_preset_small_runs_one_tiny_epoch_of_both_scripts(tmp_path, tiny_image_folder, one_thread):
    common = ["--preset", "small", "--data_dir", str(tiny_image_folder), "--device", "cpu", "--precision", "fp32",
              "--no_compile", "--total_epoch", "1", "--batch_size", "16", "--log_dir", str(tmp_path / "logs")]
    assert mae_pretrain.main([*common, "--model_path", str(tmp_path / "mae.pt"), "--knn_every", "0"]) == 0
    assert train_classifier.main([*common, "--pretrained_model_path", str(tmp_path / "mae.pt"),
                                  "--output_model_path", str(tmp_path / "cls.pt")]) == 0
    assert [len(read_metrics(d)[1]) for d in run_dirs(tmp_path / "logs")] == [1, 1]


def test_refuse_to_replace_a_finished_run(tmp_path):
    (tmp_path / "run").mkdir()
    run_setup.refuse_to_replace(tmp_path / "run", [tmp_path / "m.pt"], overwrite=False)  # nothing there yet
    (tmp_path / "run" / "metrics.csv").write_text("epoch,loss\n")  # a header alone: a failed first epoch
    run_setup.refuse_to_replace(tmp_path / "run", [tmp_path / "m.pt"], overwrite=False)
    (tmp_path / "run" / "metrics.csv").write_text("epoch,loss\n1,0.5\n")
    with pytest.raises(UserError, match="already holds a run"):
        run_setup.refuse_to_replace(tmp_path / "run", [tmp_path / "m.pt"], overwrite=False)
    (tmp_path / "m.pt").write_bytes(b"x")
    with pytest.raises(UserError, match="already exists"):
        run_setup.refuse_to_replace(tmp_path / "other", [tmp_path / "m.pt"], overwrite=False)
    run_setup.refuse_to_replace(tmp_path / "run", [tmp_path / "m.pt"], overwrite=True)


@pytest.mark.parametrize("sizes, message", [
    (dict(patch_size=3), "--patch_size 3 does not divide the 32 px images"),
    (dict(emb_dim=100), "--emb_dim 100 is not divisible by --encoder_heads 3"),
    (dict(decoder_emb_dim=10), "the decoder width 10 is not divisible by --decoder_heads 3")])
def test_shapes_that_cannot_make_a_model_name_their_flags(sizes, message):
    with pytest.raises(UserError, match=message):
        run_setup.check_model(build_mae, ModelConfig(**sizes), decoder=True)


