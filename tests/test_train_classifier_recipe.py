"""The fine-tuning recipe: augmentations, mixup / cutmix / label smoothing / erasing, --recipe presets, layer decay,
drop path and the linear probe of train_classifier.py."""
import argparse
import copy

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay

import checkpoint as ckpt
import run_setup
import train_classifier
import utils
from conftest import write_coloured_image_folder
from data import normalize, rand_augment, random_crop_flip, random_erasing
from model import MAE_ViT, encoder_state_dict

NUM_CLASSES = 10
IMAGE_SIZE = 16
DEPTH = 3
TINY = dict(patch_size=2, emb_dim=32, encoder_depth=DEPTH, encoder_heads=2, image_size=IMAGE_SIZE)


@pytest.fixture(autouse=True)
def seeded():
    """timm's Mixup draws from numpy, the augmentations from torch: fix both for every test."""
    np.random.seed(0)
    torch.manual_seed(0)


def uint8_batch(batch=16, size=IMAGE_SIZE, seed=0):
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def float_batch(batch=16, size=IMAGE_SIZE, seed=0):
    return normalize(uint8_batch(batch, size, seed))


def changed_samples(before, after):
    return (before != after).flatten(1).any(dim=1)


# -------------------------------------------------------------------------------------------- augmentation


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_random_crop_flip_is_a_shift_and_flip_of_each_image(dtype):
    torch.manual_seed(0)
    x = uint8_batch(32) if dtype == torch.uint8 else float_batch(32)
    y = random_crop_flip(x, pad=4)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.min() >= min(x.min(), 0) and y.max() <= max(x.max(), 0)  # input values, plus the zero padding
    assert changed_samples(x, y).float().mean() >= 0.75
    # Each output is the padded input, maybe flipped, cropped at some offset within the padding.
    padded = F.pad(x, (4, 4, 4, 4))
    for image, out in zip(padded, y):
        candidates = [src[:, dy:dy + IMAGE_SIZE, dx:dx + IMAGE_SIZE] for src in (image, image.flip(-1))
                      for dy in range(9) for dx in range(9)]
        assert any(torch.equal(out, c) for c in candidates)


def test_rand_augment_keeps_uint8_images_and_changes_them():
    torch.manual_seed(0)
    x = uint8_batch(32)
    y = rand_augment(x)
    assert y.shape == x.shape and y.dtype == torch.uint8
    assert changed_samples(x, y).float().mean() >= 0.75


def test_random_erasing_probability_0_is_the_identity():
    x = float_batch()
    y = random_erasing(x, probability=0.0)
    assert y.dtype == x.dtype and torch.equal(y, x)


def test_random_erasing_probability_1_erases_one_rectangle_in_every_image():
    torch.manual_seed(0)
    x = float_batch(64)
    y = random_erasing(x, probability=1.0)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all()
    assert changed_samples(x, y).all()
    erased = x != y  # (B, C, H, W); noise equal to a pixel has probability zero
    assert (erased == erased[:, :1]).all()  # the same pixels in every channel
    for mask in erased[:, 0]:
        rows, cols = mask.any(dim=1).nonzero()[:, 0], mask.any(dim=0).nonzero()[:, 0]
        assert (rows.diff() == 1).all() and (cols.diff() == 1).all()  # contiguous
        rectangle = torch.zeros_like(mask)
        rectangle[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
        assert torch.equal(mask, rectangle)
        assert len(rows) * len(cols) <= IMAGE_SIZE * IMAGE_SIZE * 0.5  # at most ~1/3 of the area (plus rounding)
    # Erased pixels are standard normal noise, as in timm's RandomErasing(mode="pixel"); the rest is untouched.
    noise = y[erased]
    assert abs(noise.mean()) < 0.1 and 0.85 < noise.std() < 1.15
    assert torch.equal(y[~erased], x[~erased])


def test_random_erasing_probability_is_per_image():
    torch.manual_seed(0)
    x = float_batch(400, size=8)
    fraction = changed_samples(x, random_erasing(x, probability=0.25)).float().mean()
    assert 0.17 < fraction < 0.33


# ---------------------------------------------------------------------------- mixup, cutmix, smoothing


def regularizer_args(**overrides):
    values = dict(mixup=0.0, cutmix=0.0, label_smoothing=0.0, reprob=0.0)
    values.update(overrides)
    return argparse.Namespace(**values)


def labels_for(batch, seed=0):
    return torch.randint(0, NUM_CLASSES, (batch,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mixup, cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_mixing_gives_soft_targets(mixup, cutmix, smoothing):
    torch.manual_seed(0)
    prepare, criterion = train_classifier.batch_regularizers(
        regularizer_args(mixup=mixup, cutmix=cutmix, label_smoothing=smoothing), NUM_CLASSES)
    assert isinstance(criterion, SoftTargetCrossEntropy)
    x, labels = float_batch(16), labels_for(16)
    for _ in range(4):
        images, targets = prepare(x.clone(), labels)
        assert images.shape == x.shape
        assert targets.shape == (16, NUM_CLASSES)
        assert (targets >= 0).all()
        torch.testing.assert_close(targets.sum(dim=1), torch.ones(16))
        if smoothing:
            assert (targets >= smoothing / NUM_CLASSES - 1e-6).all()  # the smoothing reaches every class
        # Each row's weight lies on the sample's own label and its partner's (the batch is mixed with its flip).
        own, partner = F.one_hot(labels, NUM_CLASSES).bool(), F.one_hot(labels.flip(0), NUM_CLASSES).bool()
        assert torch.allclose(targets[~(own | partner)], torch.full_like(targets[~(own | partner)],
                                                                         smoothing / NUM_CLASSES))
        assert torch.isfinite(criterion(torch.randn(16, NUM_CLASSES), targets))


def test_mixup_blends_each_image_with_its_partner_by_the_target_weight():
    torch.manual_seed(1)
    prepare, _ = train_classifier.batch_regularizers(regularizer_args(mixup=0.8), NUM_CLASSES)
    x = float_batch(16)
    labels = torch.arange(16) % NUM_CLASSES  # sample i and its partner 15 - i have different labels
    images, targets = prepare(x.clone(), labels)
    lam = targets[0, labels[0]].item()
    assert 0.0 <= lam <= 1.0
    torch.testing.assert_close(images, lam * x + (1 - lam) * x.flip(0))


def test_cutmix_pastes_a_box_whose_area_matches_the_target_weight():
    torch.manual_seed(2)
    prepare, _ = train_classifier.batch_regularizers(regularizer_args(cutmix=1.0), NUM_CLASSES)
    x = torch.randn(16, 3, IMAGE_SIZE, IMAGE_SIZE)  # continuous values: no pixel equals its partner's by chance
    labels = torch.arange(16) % NUM_CLASSES
    images, targets = prepare(x.clone(), labels)
    pasted = (images != x).any(dim=1)  # (B, H, W)
    assert (pasted == pasted[:1]).all()  # one box for the whole batch
    assert torch.equal(images[:, :, pasted[0]], x.flip(0)[:, :, pasted[0]])
    lam = targets[0, labels[0]].item()
    assert pasted[0].float().mean().item() == pytest.approx(1 - lam, abs=1e-6)


def test_label_smoothing_alone_uses_cross_entropy_with_that_smoothing():
    prepare, criterion = train_classifier.batch_regularizers(regularizer_args(label_smoothing=0.1), NUM_CLASSES)
    assert isinstance(criterion, torch.nn.CrossEntropyLoss)
    assert criterion.label_smoothing == 0.1
    x, labels = float_batch(8), labels_for(8)
    images, targets = prepare(x.clone(), labels)
    assert torch.equal(images, x) and torch.equal(targets, labels)  # no mixing, no erasing: hard labels
    logits = torch.randn(8, NUM_CLASSES)
    smoothed = 0.9 * F.one_hot(labels, NUM_CLASSES) + 0.1 / NUM_CLASSES
    torch.testing.assert_close(criterion(logits, targets), SoftTargetCrossEntropy()(logits, smoothed))


def test_no_regularizers_is_plain_cross_entropy():
    prepare, criterion = train_classifier.batch_regularizers(regularizer_args(), NUM_CLASSES)
    assert isinstance(criterion, torch.nn.CrossEntropyLoss) and criterion.label_smoothing == 0.0
    x, labels = float_batch(8), labels_for(8)
    images, targets = prepare(x.clone(), labels)
    assert torch.equal(images, x) and torch.equal(targets, labels)


def test_reprob_erases_images():
    torch.manual_seed(0)
    prepare, _ = train_classifier.batch_regularizers(regularizer_args(reprob=1.0), NUM_CLASSES)
    x, labels = float_batch(8), labels_for(8)
    images, targets = prepare(x.clone(), labels)
    assert changed_samples(x, images).all()
    assert torch.equal(targets, labels)


def test_strong_recipe_regularizers_from_parsed_args():
    torch.manual_seed(0)
    args, _, _ = train_classifier.parse_args(["--recipe", "strong"])
    prepare, criterion = train_classifier.batch_regularizers(args, NUM_CLASSES)
    assert isinstance(criterion, SoftTargetCrossEntropy)
    x, labels = float_batch(16), labels_for(16)
    images, targets = prepare(x.clone(), labels)
    assert changed_samples(x, images).any()
    assert targets.shape == (16, NUM_CLASSES) and (targets >= 0).all()
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(16))


# ------------------------------------------------------------------------------------------------ --recipe


def test_no_recipe_leaves_everything_off():
    args, _, _ = train_classifier.parse_args([])
    assert (args.recipe, args.augment, args.mixup, args.cutmix, args.label_smoothing, args.layer_decay,
            args.drop_path, args.reprob, args.batch_size) == (None, "none", 0.0, 0.0, 0.0, None, 0.0, 0.0, 128)


def test_strong_recipe_sets_its_presets():
    args, _, _ = train_classifier.parse_args(["--recipe", "strong"])
    assert args.recipe == "strong"
    for name, value in train_classifier.RECIPES["strong"].items():
        assert getattr(args, name) == value, name
    assert (args.augment, args.mixup, args.cutmix, args.label_smoothing, args.layer_decay, args.drop_path,
            args.reprob) == ("randaug", 0.8, 1.0, 0.1, 0.65, 0.1, 0.25)


@pytest.mark.parametrize("argv", [["--recipe", "strong", "--mixup", "0.2"], ["--mixup", "0.2", "--recipe", "strong"],
                                  ["--recipe=strong", "--mixup=0.2"]])
def test_explicit_options_override_the_recipe(argv):
    args, _, _ = train_classifier.parse_args(argv)
    assert args.mixup == 0.2
    assert args.cutmix == 1.0 and args.augment == "randaug"  # the rest of the preset stays


def test_an_explicit_default_value_still_overrides_the_recipe():
    args, _, _ = train_classifier.parse_args(["--recipe", "strong", "--augment", "none"])
    assert args.augment == "none"
    assert args.reprob == 0.25 and args.drop_path == 0.1  # no flags of their own: the recipe's


def test_recipe_run_name_lists_only_deviations_from_the_recipe(tmp_path):
    args, _, _ = train_classifier.parse_args(["--recipe", "strong", "--mixup", "0.2",
                                              "--output_model_path", str(tmp_path / "m.pt")])
    parts = args.run_name.split("_")
    assert "strong" in parts and "mix0.2" in parts
    assert not any(p.startswith(("aug", "cut", "ls", "ld", "dp", "re", "bs")) for p in parts)


def test_unknown_recipe_is_refused():
    with pytest.raises(SystemExit) as error:
        train_classifier.parse_args(["--recipe", "nonsense"])
    assert error.value.code == 2


# -------------------------------------------------------------------------------- pretrained checkpoints


@pytest.fixture(scope="module")
def mae_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    mae = MAE_ViT(IMAGE_SIZE, TINY["patch_size"], TINY["emb_dim"], DEPTH, TINY["encoder_heads"], decoder_layer=1,
                  decoder_head=2)
    path = tmp_path_factory.mktemp("mae") / "mae.pt"
    ckpt.save_checkpoint(path, {"kind": "mae", "model": mae.state_dict(), "args": dict(TINY)})
    return path


def classifier_args(*argv):
    args, _, _ = train_classifier.parse_args(list(argv))
    return args


def group_of(optimizer):
    """Parameter id -> its param group."""
    return {id(p): group for group in optimizer.param_groups for p in group["params"]}


def test_layer_decay_follows_timms_scheme(mae_checkpoint):
    args = classifier_args("--pretrained_model_path", str(mae_checkpoint), "--layer_decay", "0.65")
    model, config = train_classifier.build_model(args, {}, IMAGE_SIZE, NUM_CLASSES)
    assert config.encoder_depth == DEPTH and config.emb_dim == 32  # the encoder's size came from the checkpoint
    optimizer = train_classifier.build_optimizer(model, args, fused=False)
    base = args.base_learning_rate * args.batch_size / 256
    groups = group_of(optimizer)
    params = dict(model.named_parameters())
    assert set(groups) == {id(p) for p in params.values()}  # every parameter optimised, once
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(params)
    lr = {name: groups[id(p)]["lr"] for name, p in params.items()}

    # timm / BEiT: layer_id 0 = embeddings, i + 1 = block i, depth + 1 = head; lr = base * 0.65 ** (depth + 1 - id)
    def expected(layer_id):
        return base * 0.65 ** (DEPTH + 1 - layer_id)

    for name, value in lr.items():
        if name.startswith("head."):
            layer_id = DEPTH + 1
        elif name.startswith("transformer."):
            layer_id = int(name.split(".")[1]) + 1
        elif name.startswith("layer_norm."):
            layer_id = DEPTH  # the final norm goes with the last block
        else:
            assert name in ("cls_token", "pos_embedding") or name.startswith("patchify."), name
            layer_id = 0
        assert value == pytest.approx(expected(layer_id), rel=1e-9), name
    assert lr["head.weight"] == pytest.approx(base)
    assert lr[f"transformer.{DEPTH - 1}.mlp.fc1.weight"] == pytest.approx(0.65 * base)
    assert lr["transformer.0.attn.qkv.weight"] == pytest.approx(0.65 ** DEPTH * base)
    ladder = [lr["patchify.weight"]] + [lr[f"transformer.{i}.attn.qkv.weight"] for i in range(DEPTH)] + \
             [lr["head.weight"]]
    for lower, higher in zip(ladder, ladder[1:]):
        assert lower < higher and lower / higher == pytest.approx(0.65)

    wd = {name: groups[id(p)]["weight_decay"] for name, p in params.items()}
    assert wd["cls_token"] == 0.0 and wd["pos_embedding"] == 0.0
    for name, p in params.items():
        if p.ndim <= 1:
            assert wd[name] == 0.0, name  # biases and norms
    assert wd["patchify.weight"] == wd["transformer.0.attn.qkv.weight"] == wd["head.weight"] == run_setup.WEIGHT_DECAY


def test_layer_decay_scales_match_timms_own_vit(mae_checkpoint):
    """The same depth in timm's VisionTransformer gets the same scale for every parameter (under timm names)."""
    args = classifier_args("--pretrained_model_path", str(mae_checkpoint), "--layer_decay", "0.65")
    ours = train_classifier.build_model(args, {}, IMAGE_SIZE, NUM_CLASSES)[0]
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMAGE_SIZE, patch_size=2,
                                  embed_dim=32, depth=DEPTH, num_heads=2, no_embed_class=True, qkv_bias=False,
                                  num_classes=NUM_CLASSES)

    def scales(model, no_decay):
        groups = param_groups_layer_decay(model, 0.05, no_decay, layer_decay=0.65)
        by_id = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
        return {name: by_id[id(p)] for name, p in model.named_parameters()}

    renames = {"patchify.": "patch_embed.proj.", "transformer.": "blocks.", "layer_norm.": "norm.",
               "pos_embedding": "pos_embed"}

    def timm_name(name):
        for a, b in renames.items():
            if name.startswith(a):
                return b + name[len(a):]
        return name

    ours_scales = {timm_name(k): v for k, v in scales(ours, ours.no_weight_decay()).items()}
    assert ours_scales == pytest.approx(scales(reference, reference.no_weight_decay()))


def test_layer_decay_needs_a_pretrained_encoder(mae_checkpoint):
    scratch = classifier_args("--layer_decay", "0.65", "--emb_dim", "32", "--encoder_depth", "2",
                              "--encoder_heads", "2")
    model = train_classifier.build_model(scratch, {}, IMAGE_SIZE, NUM_CLASSES)[0]
    optimizer = train_classifier.build_optimizer(model, scratch, fused=False)
    assert len(optimizer.param_groups) == 1
    assert optimizer.param_groups[0]["lr"] == pytest.approx(scratch.base_learning_rate * scratch.batch_size / 256)


# --------------------------------------------------------------------------------------------- drop path


def drop_path_rates(model):
    return [[m.drop_prob if isinstance(m, DropPath) else 0.0 for m in (block.drop_path1, block.drop_path2)]
            for block in model.transformer]


@pytest.mark.parametrize("pretrained", [False, True])
def test_drop_path_grows_linearly_over_the_blocks(mae_checkpoint, pretrained):
    argv = ["--recipe", "strong", "--emb_dim", "32", "--encoder_depth", str(DEPTH), "--encoder_heads", "2"]
    if pretrained:
        argv += ["--pretrained_model_path", str(mae_checkpoint)]
    model = train_classifier.build_model(classifier_args(*argv), {}, IMAGE_SIZE, NUM_CLASSES)[0]
    rates = drop_path_rates(model)
    expected = [0.1 * i / (DEPTH - 1) for i in range(DEPTH)]  # 0 ... 0.1, as timm's linspace(0, rate, depth)
    assert [r[0] for r in rates] == pytest.approx(expected) and [r[1] for r in rates] == pytest.approx(expected)
    assert rates[-1][0] == pytest.approx(0.1)

    torch.manual_seed(0)
    x = float_batch(32)
    model.train()
    with torch.no_grad():
        assert not torch.allclose(model(x), model(x))  # residual branches dropped at random
        model.eval()
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


def test_linear_probe_has_no_drop_path(mae_checkpoint):
    args = classifier_args("--pretrained_model_path", str(mae_checkpoint), "--linear_probe", "--recipe", "strong")
    model = train_classifier.build_model(args, {}, IMAGE_SIZE, NUM_CLASSES)[0]
    assert all(rate == 0.0 for block in drop_path_rates(model) for rate in block)


# ------------------------------------------------------------------------------------------ linear probe


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return write_coloured_image_folder(tmp_path_factory.mktemp("images"), size=IMAGE_SIZE)


def classifier_argv(image_folder, tmp_path, *extra):
    return ["--data_dir", str(image_folder), "--device", "cpu", "--total_epoch", "1", "--warmup_epoch", "1",
            "--batch_size", "16", "--max_device_batch_size", "16",
            "--log_dir", str(tmp_path / "logs"), "--output_model_path", str(tmp_path / "cls.pt"), *extra]


def test_linear_probe_trains_the_head_only(image_folder, mae_checkpoint, tmp_path, monkeypatch):
    built = {}
    build_model = train_classifier.build_model

    def recording_build_model(*args, **kwargs):
        model, config = build_model(*args, **kwargs)
        built["initial"] = copy.deepcopy(model.state_dict())
        return model, config

    monkeypatch.setattr(train_classifier, "build_model", recording_build_model)
    # Eager: the strong recipe's test below runs the compiled default path; a second cold compile adds only time.
    train_classifier.main(classifier_argv(image_folder, tmp_path, "--pretrained_model_path", str(mae_checkpoint),
                                          "--linear_probe", "--base_learning_rate", "0.01", "--no_compile"))
    initial = built["initial"]
    final = ckpt.load_checkpoint(tmp_path / "cls_last.pt")
    assert final["kind"] == "classifier" and final["epoch"] == 1
    state = final["model"]
    assert set(state) == set(initial)
    pretrained = encoder_state_dict(ckpt.load_checkpoint(mae_checkpoint)["model"])
    encoder_keys = [k for k in state if not k.startswith("head.")]
    assert len(encoder_keys) == len(pretrained) > 0
    for key in encoder_keys:
        assert torch.equal(state[key], initial[key]), key
        assert torch.equal(state[key], pretrained[key]), key
    assert state["head.1.weight"].shape == (NUM_CLASSES, TINY["emb_dim"])  # BatchNorm + linear probe head
    assert not torch.equal(state["head.1.weight"], initial["head.1.weight"])
    assert not torch.equal(state["head.1.bias"], initial["head.1.bias"])
    assert not torch.equal(state["head.0.running_mean"], initial["head.0.running_mean"])
    best = ckpt.load_checkpoint(tmp_path / "cls.pt")
    assert 0.0 <= best["val_acc"] <= 1.0


def test_linear_probe_without_a_pretrained_encoder_is_refused(image_folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        utils.run_cli(train_classifier.main, classifier_argv(image_folder, tmp_path, "--linear_probe"))
    assert error.value.code == 2
    assert "--linear_probe needs --pretrained_model_path" in capsys.readouterr().err
    assert not (tmp_path / "cls.pt").exists()


def test_strong_recipe_fine_tunes_a_pretrained_encoder(image_folder, mae_checkpoint, tmp_path):
    """One epoch of the whole recipe runs end to end and moves every layer, with smaller steps deeper down."""
    train_classifier.main(classifier_argv(image_folder, tmp_path, "--recipe", "strong", "--batch_size", "16",
                                          "--max_device_batch_size", "16", "--pretrained_model_path",
                                          str(mae_checkpoint)))
    state = ckpt.load_checkpoint(tmp_path / "cls_last.pt")["model"]
    pretrained = encoder_state_dict(ckpt.load_checkpoint(mae_checkpoint)["model"])
    for key, value in pretrained.items():
        assert not torch.equal(state[key], value), key
    assert torch.isfinite(torch.cat([v.float().flatten() for v in state.values()])).all()
