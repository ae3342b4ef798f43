"""checkpoint.py: atomic saves, safe loading, the model a checkpoint holds, resume state and its utils."""
import argparse
import random

import numpy as np
import pytest
import torch
from timm.utils import random_seed

import checkpoint as ckpt
import engine
import train_classifier
import utils
from model import MAE_Encoder, MAE_ViT, ModelConfig, ViT_Classifier
from utils import UserError

TINY = dict(image_size=16, patch_size=2, emb_dim=32, encoder_layer=1, encoder_head=2, decoder_layer=1,
            decoder_head=2)


def tiny_training(seed=0, lr=0.1, weight_decay=0.01):
    """A model and optimizer that have taken one step, so the optimizer holds state."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model(torch.randn(4, 3)).pow(2).sum().backward()
    optimizer.step()
    return model, optimizer


ARGS = argparse.Namespace(seed=1, mask_strategy="block", decoder_emb_dim=None, norm_pix_loss=True, lr=1.5e-4)


def files_in(folder):
    return sorted(p.name for p in folder.iterdir())

# -------------------------------------------------------------------------------------------- save_checkpoint


def test_save_checkpoint_writes_elsewhere_then_renames(tmp_path, monkeypatch):
    path = tmp_path / "run" / "ckpt.pt"
    real_save, targets = ckpt.torch_save, []

    def watching_save(obj, target):
        targets.append(target)
        assert not path.exists(), "the final name appeared before the file was complete"
        real_save(obj, target)

    monkeypatch.setattr(ckpt, "torch_save", watching_save)
    ckpt.save_checkpoint(path, {"model": {"w": torch.ones(2)}, "epoch": 1})
    assert len(targets) == 1 and targets[0] != path and targets[0].parent == path.parent
    assert files_in(path.parent) == ["ckpt.pt"]  # no temporary file left behind
    assert torch.equal(torch.load(path, weights_only=True)["model"]["w"], torch.ones(2))


def test_a_failed_save_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    ckpt.save_checkpoint(path, {"epoch": 1})

    def failing_save(obj, target):
        with open(target, "wb") as f:
            f.write(b"half a checkp")
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt, "torch_save", failing_save)
    with pytest.raises(ckpt.UserError, match="No space left on device.*before is unchanged"):  # one line
        ckpt.save_checkpoint(path, {"epoch": 2})
    assert files_in(tmp_path) == ["ckpt.pt"]
    assert torch.load(path, weights_only=True) == {"epoch": 1}


def test_save_checkpoint_replaces_an_older_one(tmp_path):
    path = tmp_path / "ckpt.pt"
    ckpt.save_checkpoint(path, {"epoch": 1})
    ckpt.save_checkpoint(path, {"epoch": 2})
    assert torch.load(path, weights_only=True) == {"epoch": 2}
    assert files_in(tmp_path) == ["ckpt.pt"]


# -------------------------------------------------------------------------------------------- load_checkpoint


def test_training_state_round_trips_with_weights_only(tmp_path):
    model, optimizer = tiny_training()
    path = tmp_path / "ckpt.pt"
    position = engine.EpochPosition(optimizer_steps=3, micro_batches=6, images_seen=48, sums=[1.5, 7.0])
    ckpt.save_checkpoint(path, ckpt.training_state("mae", model, ModelConfig(), optimizer, 5, ARGS,
                                                   position=position, best_acc=0.5))
    expected_draw = torch.rand(3)  # drawn right after the state was captured
    assert torch.load(path, map_location="cpu", weights_only=True)["epoch"] == 5  # no pickled objects inside

    checkpoint = ckpt.load_checkpoint(path)
    assert checkpoint["kind"] == "mae" and checkpoint["epoch"] == 5 and checkpoint["best_acc"] == 0.5
    assert checkpoint["args"] == vars(ARGS)
    assert torch.equal(checkpoint["model"]["weight"], model.weight)

    fresh_model, fresh_optimizer = tiny_training(seed=1, lr=0.5, weight_decay=0.2)  # a resume with new flags
    torch.rand(10)  # move the generator on
    epoch, resumed_position = ckpt.restore_training_state(checkpoint, "mae", fresh_model, fresh_optimizer, path)
    assert epoch == 5 and resumed_position == position
    assert torch.equal(fresh_model.weight, model.weight)
    assert torch.equal(fresh_optimizer.state_dict()["state"][0]["exp_avg"],
                       optimizer.state_dict()["state"][0]["exp_avg"])
    # The moments are the run's; the hyperparameters are the resuming command's, not the saved ones.
    assert fresh_optimizer.param_groups[0]["lr"] == 0.5 and fresh_optimizer.param_groups[0]["weight_decay"] == 0.2
    assert torch.equal(torch.rand(3), expected_draw)  # the random streams continue where the run stopped


def test_resuming_from_another_kind_of_checkpoint_raises(tmp_path):
    model, optimizer = tiny_training()
    checkpoint = {"kind": "classifier", "model": model.state_dict()}
    with pytest.raises(UserError, match="cannot resume"):
        ckpt.restore_training_state(checkpoint, "mae", model, optimizer, "x.pt")


@pytest.mark.parametrize("content", ["truncated", b"this is not a checkpoint at all" * 4,
                                     random.Random(0).randbytes(1000), b""],
                         ids=["truncated", "text", "random_bytes", "empty"])
def test_damaged_files_are_reported_as_truncated_or_corrupt(tmp_path, content):
    path = tmp_path / "ckpt.pt"
    if content == "truncated":
        ckpt.save_checkpoint(path, {"model": MAE_ViT(**TINY).state_dict(), "epoch": 3})
        whole = path.read_bytes()
        content = whole[:len(whole) // 2]
    path.write_bytes(content)
    for trust in (False, True):
        with pytest.raises(UserError, match="truncated or corrupt"):
            ckpt.load_checkpoint(path, trust_pickle=trust)


@pytest.mark.parametrize("name", ["nope.pt", "."], ids=["missing", "folder"])
def test_a_missing_checkpoint_or_a_folder_is_one_line_naming_it(tmp_path, capsys, name):
    with pytest.raises(SystemExit, match="2"):
        utils.run_cli(lambda argv: ckpt.load_checkpoint(tmp_path / name))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path) in err and "Traceback" not in err, err


def test_a_pickled_module_needs_trust(tmp_path):
    model = MAE_ViT(**TINY)
    path = tmp_path / "vit-t-mae.pt"
    torch.save(model, path)  # how the reference released its weights
    with pytest.raises(UserError, match="--trust_checkpoint"):
        ckpt.load_checkpoint(path)
    checkpoint = ckpt.load_checkpoint(path, trust_pickle=True)
    assert checkpoint["kind"] == "mae"
    assert checkpoint["model"].keys() == model.state_dict().keys()
    assert torch.equal(checkpoint["model"]["decoder.head.weight"], model.decoder.head.weight)


def test_bare_state_dicts_are_accepted_and_their_kind_recognised(tmp_path):
    mae = MAE_ViT(**TINY)
    torch.save(mae.state_dict(), tmp_path / "mae.pt")
    checkpoint = ckpt.load_checkpoint(tmp_path / "mae.pt")
    assert checkpoint["kind"] == "mae"
    assert torch.equal(checkpoint["model"]["encoder.cls_token"], mae.encoder.cls_token)

    classifier = ViT_Classifier(MAE_Encoder(16, 2, 32, 1, 2))
    torch.save(classifier.state_dict(), tmp_path / "cls.pt")
    assert ckpt.load_checkpoint(tmp_path / "cls.pt")["kind"] == "classifier"


def test_a_checkpoint_without_weights_raises(tmp_path):
    torch.save({"epoch": 3, "args": {}}, tmp_path / "ckpt.pt")
    with pytest.raises(UserError, match="holds no model weights"):
        ckpt.load_checkpoint(tmp_path / "ckpt.pt")


# ------------------------------------------------------------------------------------------------ load_weights


def test_load_weights_copies_matching_weights():
    source, target = MAE_Encoder(16, 2, 32, 1, 2), MAE_Encoder(16, 2, 32, 1, 2)
    ckpt.load_weights(target, source.state_dict(), "src.pt")
    assert torch.equal(target.pos_embedding, source.pos_embedding)


def test_load_weights_explains_a_shape_mismatch():
    with pytest.raises(UserError, match=r"does not fit this model: cls_token is \(1, 1, 16\).*--emb_dim"):
        ckpt.load_weights(MAE_Encoder(16, 2, 32, 1, 2), MAE_Encoder(16, 2, 16, 1, 2).state_dict(), "src.pt")


def test_load_weights_explains_a_depth_mismatch():
    deeper = MAE_Encoder(16, 2, 32, 2, 2).state_dict()
    with pytest.raises(UserError, match="unexpected.*transformer.1"):
        ckpt.load_weights(MAE_Encoder(16, 2, 32, 1, 2), deeper, "src.pt")
    with pytest.raises(UserError, match="missing.*transformer.1"):
        ckpt.load_weights(MAE_Encoder(16, 2, 32, 2, 2), MAE_Encoder(16, 2, 32, 1, 2).state_dict(), "src.pt")


# ----------------------------------------------------------------------------------------------------- seeding


def draws():
    return torch.rand(4).tolist(), random.random(), np.random.rand(3).tolist()


def test_rng_state_round_trip(tmp_path):
    state = ckpt.rng_state()
    first = draws()
    assert draws() != first
    ckpt.set_rng_state(state)
    assert draws() == first
    # It survives a weights-only checkpoint too.
    ckpt.save_checkpoint(tmp_path / "rng.pt", {"rng": state})
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    assert draws() == first


def test_the_runs_seeding_makes_model_init_repeatable():
    def init(seed):
        random_seed(seed)  # as run_setup.start_run seeds a run (timm's: torch, numpy, random)
        return MAE_ViT(**TINY).state_dict(), draws()

    (first, first_draws), (again, again_draws), (other, _) = init(0), init(0), init(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert first_draws == again_draws
    assert not torch.equal(first["encoder.pos_embedding"], other["encoder.pos_embedding"])




def test_background_writer_saves_a_copy_taken_at_save_time(tmp_path):
    weights = {"w": torch.zeros(3)}
    writer = ckpt.CheckpointWriter()
    writer.save(tmp_path / "a.pt", {"model": weights})
    weights["w"] += 1  # training goes on while the file is written
    writer.wait()
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["model"]["w"], torch.zeros(3))


def test_background_writer_reports_a_failed_write_in_the_training_thread(tmp_path):
    (tmp_path / "file").write_text("x")
    writer = ckpt.CheckpointWriter()
    writer.save(tmp_path / "file" / "below.pt", {"model": {"w": torch.zeros(1)}})  # its folder is a file
    with pytest.raises(UserError, match="could not write checkpoint"):
        writer.wait()
    writer.wait()  # reported once


def test_config_is_inferred_from_an_older_checkpoints_weights():
    state = MAE_ViT(16, 4, 32, 3, 2, 2, 2, decoder_emb_dim=16).state_dict()
    config = ckpt.infer_config(state, {"encoder_heads": 2, "decoder_heads": 2})
    assert (config.image_size, config.patch_size, config.emb_dim, config.encoder_depth) == (16, 4, 32, 3)
    assert (config.decoder_depth, config.decoder_emb_dim, config.encoder_heads) == (2, 16, 2)
    model = ckpt.build_model({"kind": "mae", "config": config, "model": state}, "old.pt")
    assert model.encoder.pos_embedding.shape == (16, 1, 32)


def test_resume_refuses_another_model(tmp_path):
    saved = {"config": ModelConfig(emb_dim=32), "args": {}}
    ckpt.check_resume_model(saved, ModelConfig(emb_dim=32), "run.pt")
    with pytest.raises(UserError, match=r"mask_strategy: 'random' -> 'block'"):
        ckpt.check_resume_model(saved, ModelConfig(emb_dim=32, mask_strategy="block"), "run.pt")


def resume_args(typed=(), **values):
    return argparse.Namespace(**{"dataset": "cifar10", "total_epoch": 10, "base_learning_rate": 1e-3, "seed": 0,
                                 "time_budget": None, "device": "cpu", **values}, typed=list(typed))


SAVED = {"epoch": 4, "args": {"dataset": "cifar10", "total_epoch": 10, "base_learning_rate": 1e-3, "seed": 0,
                              "time_budget": None, "device": "cpu"}}


def settle(saved, args, fixed=("dataset", "seed")):
    """resume_settings, checking that the arguments as typed are left as they were."""
    before = dict(vars(args))
    settings = ckpt.resume_settings(saved, args, fixed, "run.pt", "logs/run")
    assert vars(args) == before
    return settings


def test_resume_applies_typed_changes_and_says_so(capsys):
    args = resume_args(["total_epoch", "base_learning_rate"], total_epoch=20, base_learning_rate=2e-3)
    settings = settle(SAVED, args)
    assert settings.total_epoch == 20 and settings.base_learning_rate == 2e-3
    out = capsys.readouterr().out
    assert "from epoch 5 with changed settings, applied from there" in out and "--total_epoch 10 -> 20" in out


def test_resume_continues_left_out_flags_with_the_runs_own_values(capsys):
    args = resume_args(total_epoch=2000, base_learning_rate=1.5e-4, device="cuda")  # defaults, nothing typed
    settings = settle(SAVED, args)
    assert settings.total_epoch == 10 and settings.base_learning_rate == 1e-3  # the run's own
    assert settings.device == "cuda"  # where it runs is this command's
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("typed, values, message", [
    (["dataset"], dict(dataset="cifar100"), r"--dataset: 'cifar10' -> 'cifar100'"),
    ([], dict(dataset="cifar100"), r"--dataset: 'cifar10' -> 'cifar100'"),  # the data is loaded first: typed or not
    (["seed"], dict(seed=3), r"--seed: 0 -> 3"),  # the checkpoint restores the run's random streams
    (["time_budget"], dict(time_budget=5.0), r"keeps its budget; give --total_epoch"),
])
def test_resume_refuses_what_it_cannot_apply(typed, values, message):
    with pytest.raises(UserError, match=message):
        settle(SAVED, resume_args(typed, **values))


def test_a_checkpoint_resumes_only_into_its_own_run_folder():
    with pytest.raises(UserError, match="belongs to the run in"):
        settle({**SAVED, "run_dir": "logs/other"}, resume_args())


def test_a_batch_size_change_is_refused_only_in_the_middle_of_an_epoch():
    saved = {**SAVED, "args": {**SAVED["args"], "batch_size": 64}}
    assert settle(saved, resume_args(["batch_size"], batch_size=128), ()).batch_size == 128
    with pytest.raises(UserError, match="middle of an epoch"):
        settle({**saved, "position": {"optimizer_steps": 1}}, resume_args(["batch_size"], batch_size=128), ())


def test_typing_a_new_length_ends_a_budgeted_run():
    saved = {**SAVED, "args": {**SAVED["args"], "time_budget": 5.0}}
    settings = settle(saved, resume_args(["total_epoch"], total_epoch=30), ())
    assert settings.total_epoch == 30 and settings.time_budget is None
    assert settle(saved, resume_args(["time_budget"], time_budget=5.0), ()).time_budget == 5.0




def test_a_budgeted_run_resumed_with_its_preset_keeps_its_budget():
    """The sweep resumes with the run's own command: the preset's length must not turn the budget off (it did, and
    a fine-tuning stopped at epoch 8 of its budget was then 'finished' at the preset's 2 epochs)."""
    args, _, _ = train_classifier.parse_args(["--preset", "small", "--time_budget", "15", "--resume", "auto"])
    saved = {**SAVED, "args": {**vars(args), "typed": None}}
    settings = ckpt.resume_settings(saved, args, ("dataset", "seed"), "run.pt", "logs/run")
    assert settings.time_budget == 15.0
    args, _, _ = train_classifier.parse_args(["--preset", "small", "--total_epoch", "9", "--resume", "auto"])
    assert ckpt.resume_settings(saved, args, ("dataset", "seed"), "run.pt", "logs/run").time_budget is None
