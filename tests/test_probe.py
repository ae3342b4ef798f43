"""k-NN accuracy, the linear probe, feature extraction, and the k-NN / probe monitor of mae_pretrain.py."""
import csv

import pytest
import torch
import torch.nn as nn

import checkpoint as ckpt
import mae_pretrain
from conftest import write_coloured_image_folder
from data import Split
from probe import evaluate_encoder, extract_features, knn_accuracy, linear_probe_accuracy

NUM_CLASSES = 10


def clusters(num_classes, per_class, dim, spread, seed, noise_seed=0):
    """Gaussian clusters around random centres (fixed by ``seed``): features (N, dim), labels (N,)."""
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(seed)) * 3
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    noise = torch.randn(len(labels), dim, generator=torch.Generator().manual_seed(1000 + noise_seed))
    features = centres[labels] + spread * noise
    return features, labels


# ------------------------------------------------------------------------------------------------- k-NN


def test_knn_separates_well_separated_clusters():
    train_x, train_y = clusters(NUM_CLASSES, 50, 16, 0.5, seed=0)
    test_x, test_y = clusters(NUM_CLASSES, 20, 16, 0.5, seed=0, noise_seed=1)  # same centres, fresh samples
    assert knn_accuracy(train_x, train_y, test_x, test_y) > 0.95


def test_knn_on_random_labels_is_near_chance():
    generator = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(2000, 16, generator=generator), torch.randn(2000, 16, generator=generator)
    train_y = torch.randint(0, NUM_CLASSES, (2000,), generator=generator)
    test_y = torch.randint(0, NUM_CLASSES, (2000,), generator=generator)
    accuracy = knn_accuracy(train_x, train_y, test_x, test_y)
    assert abs(accuracy - 1 / NUM_CLASSES) < 0.04


def test_knn_with_k1_finds_each_training_point_itself_and_chunking_does_not_matter():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=generator)
    y = torch.randint(0, NUM_CLASSES, (300,), generator=generator)
    assert knn_accuracy(x, y, x, y, k=1) == 1.0
    test_x, test_y = x + 0.5 * torch.randn(x.shape, generator=generator), y
    assert knn_accuracy(x, y, test_x, test_y, chunk=7) == knn_accuracy(x, y, test_x, test_y, chunk=1000)


def test_knn_votes_of_k_neighbours_weighted_by_temperature():
    """One exact match of class 0 against five slightly less similar points of class 1."""
    query = torch.tensor([[1.0, 0.0]])
    angle = torch.tensor(0.14)  # cosine 0.99
    train = torch.cat([query, torch.stack([angle.cos(), angle.sin()]).expand(5, 2)])
    labels, target = torch.tensor([0, 1, 1, 1, 1, 1]), torch.tensor([0])
    assert knn_accuracy(train, labels, query, target, k=1) == 1.0  # the nearest neighbour alone
    assert knn_accuracy(train, labels, query, target, k=6) == 0.0  # five votes of exp(0.99 / 0.07) outweigh one
    assert knn_accuracy(train, labels, query, target, k=6, temperature=0.001) == 1.0  # sharp: the closest wins


def test_knn_is_invariant_to_feature_scale():
    """Cosine similarity: scaling every feature by its own positive factor changes nothing."""
    train_x, train_y = clusters(NUM_CLASSES, 20, 16, 3.0, seed=3)
    test_x, test_y = clusters(NUM_CLASSES, 10, 16, 3.0, seed=3, noise_seed=1)
    scales = torch.rand(len(train_x), 1) * 10 + 0.1
    assert knn_accuracy(train_x * scales, train_y, test_x, test_y) == knn_accuracy(train_x, train_y, test_x,
                                                                                    test_y)


# -------------------------------------------------------------------------------------------- linear probe


def test_linear_probe_on_linearly_separable_features():
    train_x, train_y = clusters(NUM_CLASSES, 50, 32, 0.5, seed=0)
    test_x, test_y = clusters(NUM_CLASSES, 20, 32, 0.5, seed=0, noise_seed=1)
    assert linear_probe_accuracy(train_x, train_y, test_x, test_y) > 0.9


def test_linear_probe_is_deterministic_and_leaves_the_global_random_stream_alone():
    train_x, train_y = clusters(NUM_CLASSES, 10, 8, 3.0, seed=0)
    test_x, test_y = clusters(NUM_CLASSES, 10, 8, 3.0, seed=0, noise_seed=1)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = linear_probe_accuracy(train_x, train_y, test_x, test_y, epochs=3, batch_size=16)
    assert torch.equal(torch.get_rng_state(), state)  # a monitor must not change the training run's draws
    assert linear_probe_accuracy(train_x, train_y, test_x, test_y, epochs=3, batch_size=16) == first


def test_linear_probe_with_a_last_batch_of_one_sample():
    """BatchNorm cannot train on one sample; such a batch (e.g. 4097 features, batch 4096) must not crash."""
    train_x, train_y = clusters(NUM_CLASSES, 10, 8, 0.5, seed=0)
    train_x, train_y = train_x[:33], train_y[:33]  # batches of 16, 16 and 1
    accuracy = linear_probe_accuracy(train_x, train_y, train_x, train_y, epochs=2, batch_size=16)
    assert 0.0 <= accuracy <= 1.0


def test_linear_probe_on_random_labels_is_near_chance():
    generator = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(1000, 16, generator=generator), torch.randn(2000, 16, generator=generator)
    train_y = torch.randint(0, NUM_CLASSES, (1000,), generator=generator)
    test_y = torch.randint(0, NUM_CLASSES, (2000,), generator=generator)
    assert abs(linear_probe_accuracy(train_x, train_y, test_x, test_y, epochs=20) - 1 / NUM_CLASSES) < 0.05


# ------------------------------------------------------------------------------- features of a backbone


class ClassStub(nn.Module):
    """A backbone whose cls token is a fixed random projection of the image and whose patch tokens are noise.

    Images of one class share a pattern, so the cls feature separates the classes; the mean patch token does not.
    It records the mode and input range it was called with.
    """

    def __init__(self, image_size=8, dim=64, tokens=4):
        super().__init__()
        self.register_buffer("projection", torch.randn(3 * image_size * image_size, dim,
                                                       generator=torch.Generator().manual_seed(0)))
        self.tokens = tokens
        self.calls = []

    def forward_features(self, img):
        self.calls.append((self.training, img.dtype, float(img.min()), float(img.max()), len(img)))
        cls = img.flatten(1) @ self.projection
        noise = torch.randn(len(img), self.tokens, cls.shape[1])
        return torch.cat([cls[:, None], noise], dim=1)


def pattern_split(per_class, seed, image_size=8):
    """uint8 images: one random pattern per class (fixed), plus a little per-image noise."""
    patterns = torch.randint(0, 256, (NUM_CLASSES, 3, image_size, image_size),
                             generator=torch.Generator().manual_seed(123))
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    noise = torch.randint(-20, 21, (len(labels), 3, image_size, image_size),
                          generator=torch.Generator().manual_seed(seed))
    images = (patterns[labels] + noise).clamp(0, 255).to(torch.uint8)
    return Split(images, labels, [str(c) for c in range(NUM_CLASSES)])


def test_extract_features_pools_normalises_and_restores_mode():
    stub = ClassStub()
    stub.train()
    images = pattern_split(3, seed=0).images
    cls = extract_features(stub, images, pool="cls", batch_size=7)
    assert cls.shape == (len(images), 64) and cls.dtype == torch.float32
    assert stub.training  # put back in train mode afterwards
    modes, dtypes, lows, highs, sizes = zip(*stub.calls)
    assert not any(modes)  # ran in eval mode
    assert set(dtypes) == {torch.float32} and min(lows) >= -1.0 and max(highs) <= 1.0  # normalised to [-1, 1]
    assert list(sizes) == [7, 7, 7, 7, 2]  # batches of batch_size
    expected = (images.float() / 127.5 - 1).flatten(1) @ stub.projection
    torch.testing.assert_close(cls, expected, rtol=1e-4, atol=1e-3)
    mean = extract_features(stub, images, pool="mean")
    assert mean.shape == (len(images), 64)
    assert not torch.allclose(mean, cls)


def test_evaluate_encoder_knn_and_probe_on_class_dependent_backbone():
    stub = ClassStub()
    train, test = pattern_split(8, seed=0), pattern_split(4, seed=1)
    results = evaluate_encoder(stub, train, test, torch.device("cpu"), k=5, pool="cls", probe_epochs=50)
    assert set(results) == {"knn_acc", "probe_acc"}
    assert results["knn_acc"] > 0.95
    assert results["probe_acc"] > 0.9
    # The mean of the patch tokens is noise: k-NN on it is no better than guessing.
    noise_results = evaluate_encoder(stub, train, test, torch.device("cpu"), k=5, pool="mean")
    assert set(noise_results) == {"knn_acc"}
    assert noise_results["knn_acc"] < 0.4


# ---------------------------------------------------------------------------- the monitor in mae_pretrain


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return write_coloured_image_folder(tmp_path_factory.mktemp("images"))


def pretrain(image_folder, tmp_path, *extra):
    """A tiny pretraining run; returns its metrics.csv rows and its final weights."""
    argv = ["--data_dir", str(image_folder), "--device", "cpu", "--batch_size", "16", "--max_device_batch_size",
            "16", "--warmup_epoch", "1", "--emb_dim", "32", "--encoder_depth", "1", "--encoder_heads", "2",
            "--decoder_depth", "1", "--decoder_heads", "2", "--log_dir", str(tmp_path / "logs"),
            "--run_name", "run", "--model_path", str(tmp_path / "mae.pt"), "--no_compile", *extra]
    mae_pretrain.main(argv)  # eager: test_engine_compile compiles the same step function (a cold compile costs 15 s)
    with open(tmp_path / "logs" / "cifar10" / "run" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return rows, ckpt.load_checkpoint(tmp_path / "mae.pt")["model"]


@pytest.fixture(scope="module")
def monitored_run(image_folder, tmp_path_factory):
    return pretrain(image_folder, tmp_path_factory.mktemp("monitored"), "--total_epoch", "2", "--knn_every", "1",
                    "--probe_epochs", "5")


@pytest.fixture(scope="module")
def plain_run(image_folder, tmp_path_factory):
    return pretrain(image_folder, tmp_path_factory.mktemp("plain"), "--total_epoch", "2")


def test_mae_pretrain_logs_knn_and_probe_accuracy(monitored_run):
    rows, _ = monitored_run
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row in rows:
        assert 0.0 <= float(row["knn_acc"]) <= 1.0
        assert 0.0 <= float(row["probe_acc"]) <= 1.0
        # 60 test images: every accuracy is a multiple of 1/60
        assert float(row["knn_acc"]) * 60 == pytest.approx(round(float(row["knn_acc"]) * 60), abs=1e-6)


def test_mae_pretrain_without_knn_logs_no_accuracy(plain_run):
    rows, _ = plain_run
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(r["knn_acc"] == "" and r["probe_acc"] == "" for r in rows)
    assert all(float(r["loss"]) > 0 for r in rows)


def test_monitoring_does_not_change_the_pretraining(monitored_run, plain_run):
    """k-NN and the probe only watch: the weights after two epochs are the same with and without them."""
    (_, monitored), (_, plain) = monitored_run, plain_run
    assert set(monitored) == set(plain)
    for key in plain:
        assert torch.equal(monitored[key], plain[key]), key


def test_mae_pretrain_knn_every_k_epochs_and_the_last(image_folder, tmp_path):
    rows, _ = pretrain(image_folder, tmp_path, "--total_epoch", "3", "--knn_every", "2")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert [bool(r["knn_acc"]) for r in rows] == [False, True, True]  # every 2nd epoch, and the final one
    assert not any(r["probe_acc"] for r in rows)  # no --probe_epochs: no probe
