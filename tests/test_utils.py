"""utils.py: checkpoints, resuming, logging, run names, seeding and the shared epoch loop."""
import argparse
import csv
import math
import random

import numpy as np
import pytest
import torch

import utils
from model import MAE_Encoder, MAE_ViT, ViT_Classifier
from utils import NonFiniteLoss, UserError

TINY = dict(image_size=16, patch_size=2, emb_dim=32, encoder_layer=1, encoder_head=2, decoder_layer=1,
            decoder_head=2)


def tiny_training(seed=0):
    """A model, optimizer and scheduler that have taken one step, so the optimizer holds state."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, utils.warmup_cosine(2, 10))
    model(torch.randn(4, 3)).pow(2).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


ARGS = argparse.Namespace(seed=1, mask_strategy="block", decoder_emb_dim=None, norm_pix_loss=True, lr=1.5e-4)


def files_in(folder):
    return sorted(p.name for p in folder.iterdir())


# -------------------------------------------------------------------------------------------- save_checkpoint


def test_save_checkpoint_writes_elsewhere_then_renames(tmp_path, monkeypatch):
    path = tmp_path / "run" / "ckpt.pt"
    real_save, targets = torch.save, []

    def watching_save(obj, target):
        targets.append(target)
        assert not path.exists(), "the final name appeared before the file was complete"
        real_save(obj, target)

    monkeypatch.setattr(torch, "save", watching_save)
    utils.save_checkpoint(path, {"model": {"w": torch.ones(2)}, "epoch": 1})
    assert len(targets) == 1 and targets[0] != path and targets[0].parent == path.parent
    assert files_in(path.parent) == ["ckpt.pt"]  # no temporary file left behind
    assert torch.equal(torch.load(path, weights_only=True)["model"]["w"], torch.ones(2))


def test_a_failed_save_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    utils.save_checkpoint(path, {"epoch": 1})

    def failing_save(obj, target):
        with open(target, "wb") as f:
            f.write(b"half a checkp")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(utils.UserError, match="No space left on device.*intact"):  # one line, not a traceback
        utils.save_checkpoint(path, {"epoch": 2})
    assert files_in(tmp_path) == ["ckpt.pt"]
    assert torch.load(path, weights_only=True) == {"epoch": 1}


def test_save_checkpoint_replaces_an_older_one(tmp_path):
    path = tmp_path / "ckpt.pt"
    utils.save_checkpoint(path, {"epoch": 1})
    utils.save_checkpoint(path, {"epoch": 2})
    assert torch.load(path, weights_only=True) == {"epoch": 2}
    assert files_in(tmp_path) == ["ckpt.pt"]


# -------------------------------------------------------------------------------------------- load_checkpoint


def test_training_state_round_trips_with_weights_only(tmp_path):
    model, optimizer, scheduler = tiny_training()
    path = tmp_path / "ckpt.pt"
    utils.save_checkpoint(path, utils.training_state("mae", model, optimizer, scheduler, 5, ARGS, best_acc=0.5))
    expected_draw = torch.rand(3)  # drawn right after the state was captured
    assert torch.load(path, map_location="cpu", weights_only=True)["epoch"] == 5  # no pickled objects inside

    checkpoint = utils.load_checkpoint(path)
    assert checkpoint["kind"] == "mae" and checkpoint["epoch"] == 5 and checkpoint["best_acc"] == 0.5
    assert checkpoint["args"] == vars(ARGS)
    assert torch.equal(checkpoint["model"]["weight"], model.weight)

    fresh_model, fresh_optimizer, fresh_scheduler = tiny_training(seed=1)
    torch.rand(10)  # move the generator on
    epoch = utils.restore_training_state(checkpoint, "mae", fresh_model, fresh_optimizer, fresh_scheduler, path)
    assert epoch == 5
    assert torch.equal(fresh_model.weight, model.weight)
    assert torch.equal(fresh_optimizer.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert fresh_scheduler.last_epoch == scheduler.last_epoch
    assert torch.equal(torch.rand(3), expected_draw)  # the random streams continue where the run stopped


def test_resuming_from_another_kind_of_checkpoint_raises(tmp_path):
    model, optimizer, scheduler = tiny_training()
    checkpoint = {"kind": "classifier", "model": model.state_dict()}
    with pytest.raises(UserError, match="cannot resume"):
        utils.restore_training_state(checkpoint, "mae", model, optimizer, scheduler, "x.pt")


@pytest.mark.parametrize("content", ["truncated", b"this is not a checkpoint at all" * 4,
                                     random.Random(0).randbytes(1000), b""],
                         ids=["truncated", "text", "random_bytes", "empty"])
def test_damaged_files_are_reported_as_truncated_or_corrupt(tmp_path, content):
    path = tmp_path / "ckpt.pt"
    if content == "truncated":
        utils.save_checkpoint(path, {"model": MAE_ViT(**TINY).state_dict(), "epoch": 3})
        whole = path.read_bytes()
        content = whole[:len(whole) // 2]
    path.write_bytes(content)
    for trust in (False, True):
        with pytest.raises(UserError, match="truncated or corrupt"):
            utils.load_checkpoint(path, trust_pickle=trust)


def test_a_missing_checkpoint_raises(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        utils.load_checkpoint(tmp_path / "nope.pt")


def test_a_pickled_module_needs_trust(tmp_path):
    model = MAE_ViT(**TINY)
    path = tmp_path / "vit-t-mae.pt"
    torch.save(model, path)  # how the reference released its weights
    with pytest.raises(UserError, match="--trust_checkpoint"):
        utils.load_checkpoint(path)
    checkpoint = utils.load_checkpoint(path, trust_pickle=True)
    assert checkpoint["kind"] == "mae"
    assert checkpoint["model"].keys() == model.state_dict().keys()
    assert torch.equal(checkpoint["model"]["decoder.head.weight"], model.decoder.head.weight)


def test_bare_state_dicts_are_accepted_and_their_kind_recognised(tmp_path):
    mae = MAE_ViT(**TINY)
    torch.save(mae.state_dict(), tmp_path / "mae.pt")
    checkpoint = utils.load_checkpoint(tmp_path / "mae.pt")
    assert checkpoint["kind"] == "mae"
    assert torch.equal(checkpoint["model"]["encoder.cls_token"], mae.encoder.cls_token)

    classifier = ViT_Classifier(MAE_Encoder(16, 2, 32, 1, 2))
    torch.save(classifier.state_dict(), tmp_path / "cls.pt")
    assert utils.load_checkpoint(tmp_path / "cls.pt")["kind"] == "classifier"


def test_a_checkpoint_without_weights_raises(tmp_path):
    torch.save({"epoch": 3, "args": {}}, tmp_path / "ckpt.pt")
    with pytest.raises(UserError, match="holds no model weights"):
        utils.load_checkpoint(tmp_path / "ckpt.pt")


# ------------------------------------------------------------------------------------------------ load_weights


def test_load_weights_copies_matching_weights():
    source, target = MAE_Encoder(16, 2, 32, 1, 2), MAE_Encoder(16, 2, 32, 1, 2)
    utils.load_weights(target, source.state_dict(), "src.pt")
    assert torch.equal(target.pos_embedding, source.pos_embedding)


def test_load_weights_explains_a_shape_mismatch():
    with pytest.raises(UserError, match=r"does not fit this model: cls_token is \(1, 1, 16\).*--emb_dim"):
        utils.load_weights(MAE_Encoder(16, 2, 32, 1, 2), MAE_Encoder(16, 2, 16, 1, 2).state_dict(), "src.pt")


def test_load_weights_explains_a_depth_mismatch():
    deeper = MAE_Encoder(16, 2, 32, 2, 2).state_dict()
    with pytest.raises(UserError, match="unexpected.*transformer.1"):
        utils.load_weights(MAE_Encoder(16, 2, 32, 1, 2), deeper, "src.pt")
    with pytest.raises(UserError, match="missing.*transformer.1"):
        utils.load_weights(MAE_Encoder(16, 2, 32, 2, 2), MAE_Encoder(16, 2, 32, 1, 2).state_dict(), "src.pt")


# --------------------------------------------------------------------------------------------- small helpers


@pytest.mark.parametrize("batch, max_device, world, expected", [
    (4096, 512, 1, (512, 8)), (128, 256, 1, (128, 1)), (4096, 512, 4, (512, 2)), (256, 512, 2, (128, 1))])
def test_split_batch(batch, max_device, world, expected):
    assert utils.split_batch(batch, max_device, world) == expected


def test_split_batch_rejects_uneven_splits():
    with pytest.raises(UserError, match="not divisible by the 3 processes"):
        utils.split_batch(128, 64, 3)
    with pytest.raises(UserError, match=r"per process \(96\) is not divisible by --max_device_batch_size 64"):
        utils.split_batch(96, 64, 1)


def test_run_name_lists_only_the_settings_that_differ():
    defaults = {"decoder_depth": 4, "mask_strategy": "random", "mask_ratio": 0.75, "norm_pix_loss": False,
                "decoder_emb_dim": None}
    keys = {"decoder_depth": "dd", "mask_strategy": "", "mask_ratio": "mr", "norm_pix_loss": "normpix",
            "decoder_emb_dim": "dw"}
    args = argparse.Namespace(**defaults)
    assert utils.run_name("mae", args, defaults, keys) == "mae"
    args = argparse.Namespace(**{**defaults, "decoder_depth": 8, "mask_strategy": "block"})
    assert utils.run_name("mae", args, defaults, keys) == "mae_dd8_block"
    args = argparse.Namespace(**{**defaults, "mask_ratio": 0.9, "norm_pix_loss": True, "decoder_emb_dim": 96})
    assert utils.run_name("mae", args, defaults, keys) == "mae_mr0.9_normpix_dw96"


def test_parser_defaults():
    parser = argparse.ArgumentParser()
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--flag", action="store_true")
    defaults = utils.parser_defaults(parser)
    assert defaults["depth"] == 4 and defaults["flag"] is False


def test_resolve_resume(tmp_path):
    own = tmp_path / "own.pt"
    assert utils.resolve_resume("auto", own) is None
    own.write_bytes(b"x")
    assert utils.resolve_resume("auto", own) == own
    assert utils.resolve_resume("other.pt", own) == "other.pt"
    assert utils.resolve_resume(None, own) is None


def test_a_new_run_refuses_an_existing_run_folder(tmp_path):
    (tmp_path / "metrics.csv").write_text("epoch\n")
    with pytest.raises(UserError, match="--resume auto"):
        utils.prepare_run_dir(tmp_path, resuming=None, is_main=True)
    assert utils.prepare_run_dir(tmp_path, resuming="ckpt.pt", is_main=True) == tmp_path


def test_run_cli_turns_user_errors_into_one_line_and_exit_code_2(capsys):
    def main(argv):
        raise UserError("mask ratio must lie strictly between 0 and 1")

    with pytest.raises(SystemExit) as exit_info:
        utils.run_cli(main, [])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: mask ratio must lie strictly between 0 and 1\n"


# ------------------------------------------------------------------------------------------------------ logging


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_run_logger_writes_a_header_then_one_row_per_epoch(tmp_path):
    logger = utils.RunLogger(tmp_path / "run", ["train_loss", "lr"], start_epoch=1)
    for epoch in (1, 2, 3):
        logger.log(epoch, train_loss=1.0 / epoch, lr=0.1)
    logger.close()
    rows = read_rows(tmp_path / "run" / "metrics.csv")
    assert rows[0] == ["epoch", "train_loss", "lr"]
    assert [row[0] for row in rows[1:]] == ["1", "2", "3"]
    assert float(rows[2][1]) == pytest.approx(0.5)
    assert list((tmp_path / "run").glob("events.out.tfevents.*"))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]


def test_run_logger_resume_drops_rows_from_the_restart_epoch_on(tmp_path):
    logger = utils.RunLogger(tmp_path, ["loss"], start_epoch=1)
    for epoch in (1, 2, 3, 4):
        logger.log(epoch, loss=float(epoch))
    logger.close()
    logger = utils.RunLogger(tmp_path, ["loss"], start_epoch=3)  # resuming after epoch 2's checkpoint
    logger.log(3, loss=30.0)
    logger.close()
    rows = read_rows(tmp_path / "metrics.csv")
    assert rows == [["epoch", "loss"], ["1", "1.0"], ["2", "2.0"], ["3", "30.0"]]


def test_a_disabled_logger_writes_nothing(tmp_path):
    logger = utils.RunLogger(tmp_path / "run", ["loss"], enabled=False)
    logger.log(1, loss=1.0)
    logger.close()
    assert not (tmp_path / "run").exists()


def test_tensorboard_tags_group_by_prefix():
    assert utils.tensorboard_tag("train_loss") == "train/loss"
    assert utils.tensorboard_tag("knn_acc") == "knn/acc"
    assert utils.tensorboard_tag("lr") == "lr"


# ----------------------------------------------------------------------------------------------------- seeding


def draws():
    return torch.rand(4).tolist(), random.random(), np.random.rand(3).tolist()


def test_rng_state_round_trip(tmp_path):
    state = utils.rng_state()
    first = draws()
    assert draws() != first
    utils.set_rng_state(state)
    assert draws() == first
    # It survives a weights-only checkpoint too.
    utils.save_checkpoint(tmp_path / "rng.pt", {"rng": state})
    utils.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    assert draws() == first


def test_setup_seed_makes_model_init_repeatable():
    def init(seed):
        utils.setup_seed(seed)
        return MAE_ViT(**TINY).state_dict(), draws()

    (first, first_draws), (again, again_draws), (other, _) = init(0), init(0), init(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert first_draws == again_draws
    assert not torch.equal(first["encoder.pos_embedding"], other["encoder.pos_embedding"])


# ------------------------------------------------------------------------------------------- schedule and loop


def test_warmup_cosine():
    schedule = utils.warmup_cosine(5, 100)
    assert schedule(0) == pytest.approx(0.2)  # linear warm-up: (epoch + 1) / warmup
    assert schedule(2) == pytest.approx(0.6)
    assert schedule(4) == pytest.approx(0.5 * (math.cos(4 / 100 * math.pi) + 1))  # the cosine is already lower
    assert schedule(50) == pytest.approx(0.5)
    assert schedule(100) == pytest.approx(0.0, abs=1e-12)


def linear_run(batches, accum_steps):
    """One train_epoch of a fixed linear model with SGD; returns its weights after and train_epoch's result."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(x, y):
        loss = torch.nn.functional.mse_loss(model(x), y)
        return loss, (model(x) - y).abs().sum()

    result = utils.train_epoch(step, batches, optimizer, accum_steps, model)
    return torch.cat([p.detach().flatten() for p in model.parameters()]), result


def test_gradient_accumulation_matches_the_whole_batch():
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 4, generator=generator), torch.randn(8, 1, generator=generator)
    torch.manual_seed(0)
    before = torch.cat([p.detach().flatten() for p in torch.nn.Linear(4, 1).parameters()])  # linear_run's start
    whole, (whole_loss, whole_extra, whole_seen) = linear_run([(x, y)], accum_steps=1)
    split, (split_loss, split_extra, split_seen) = linear_run([(x[:4], y[:4]), (x[4:], y[4:])], accum_steps=2)
    assert not torch.allclose(whole, before)  # the step did move the weights
    assert torch.allclose(whole, split, atol=1e-6)
    assert whole_seen == split_seen == 8
    assert whole_extra[0] == pytest.approx(split_extra[0], rel=1e-5)  # extra sums add up over micro-batches


def test_train_epoch_skips_an_incomplete_optimizer_step_and_averages_the_loss():
    generator = torch.Generator().manual_seed(2)
    batches = [(torch.randn(2, 4, generator=generator), torch.randn(2, 1, generator=generator)) for _ in range(3)]
    _, (loss, _, seen) = linear_run(batches, accum_steps=2)
    assert seen == 4  # the third micro-batch cannot complete a step of two
    with torch.no_grad():
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        losses = [torch.nn.functional.mse_loss(model(x), y).item() for x, y in batches[:2]]
    assert loss == pytest.approx(sum(losses) / 2, rel=1e-5)  # both micro-batches ran before the one step
    with pytest.raises(UserError, match="fewer images than one optimizer step"):
        linear_run(batches[:1], accum_steps=2)


def test_a_nan_loss_raises_non_finite_loss():
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(x, y):
        return (model(x).sum() * float("nan"),)

    batches = [(torch.randn(2, 4), torch.zeros(2))]
    with pytest.raises(NonFiniteLoss, match="became nan"):
        utils.train_epoch(step, batches, optimizer, 1, model)
