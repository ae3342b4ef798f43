"""Datasets as uint8 tensors, and a loader that keeps the whole dataset on the training device.

CIFAR is 50,000 images of 3 x 32 x 32 bytes (150 MB): it fits on any GPU, so batches are cut from one resident
tensor with ``randperm`` instead of going through DataLoader workers (the cifar10-airbench approach).
"""
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms.v2 import RandAugment

DATASETS = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}  # what torchvision.io.decode_image reads


class DataError(ValueError):
    """The dataset could not be found, read or downloaded: the message says what to do."""


@dataclass
class Split:
    images: torch.Tensor  # (N, 3, H, W) uint8
    labels: torch.Tensor  # (N,) int64
    classes: list


def load_dataset(name="cifar10", data_dir=None, download_root="data"):
    """The train and test splits: from an image folder (``data_dir/{train,test}/<class>/*``) or torchvision."""
    if data_dir:
        train, test = load_image_folder(Path(data_dir) / "train"), load_image_folder(Path(data_dir) / "test")
        if train.classes != test.classes:
            raise DataError(f"{data_dir}: test classes {test.classes} differ from train classes {train.classes}")
        return train, test
    return load_torchvision(name, download_root, train=True), load_torchvision(name, download_root, train=False)


def load_image_folder(folder):
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder; --data_dir needs train/<class>/ and test/<class>/ inside")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(f for f in (folder / name).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        files += found
        labels += [label] * len(found)
    if not files:
        raise DataError(f"{folder} holds no images (expected {folder}/<class>/*.jpg or *.png)")
    images = [read_image(f) for f in files]
    sizes = {tuple(img.shape) for img in images}
    if len(sizes) != 1:
        raise DataError(f"{folder}: images must all have one size, found {sorted(sizes)[:3]}")
    return Split(torch.stack(images), torch.tensor(labels), classes)


def read_image(path):
    try:
        return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    except RuntimeError:  # damaged or not really an image: name the file rather than a line of C++
        raise DataError(f"{path} could not be decoded as a JPEG, PNG or WebP image") from None


def load_torchvision(name, root, train):
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)} or pass --data_dir")
    try:
        dataset = DATASETS[name](root, train=train, download=True)
    except Exception as error:  # no network, a proxy, a half-downloaded archive: all need the same advice
        raise DataError(f"could not download {name} into {root}/ ({type(error).__name__}: {error}); "
                        f"pass --data_dir with an image folder holding train/<class>/ and test/<class>/") from None
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
    return Split(images, torch.tensor(dataset.targets), list(dataset.classes))


def normalize(images):
    """uint8 [0, 255] -> float [-1, 1], the reference's Normalize(0.5, 0.5)."""
    return images.float().div_(127.5).sub_(1.0)


def denormalize(images):
    return ((images.float() + 1) / 2).clamp(0, 1)


def random_crop_flip(images, pad=4):
    """Per-sample random translation by up to ``pad`` pixels (zero padding) and horizontal flip, on the device.

    Works on uint8 or float images of shape (B, C, H, W).
    """
    B, C, H, W = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (B, 1, 1), device=images.device)
    dx = torch.randint(0, 2 * pad + 1, (B, 1, 1), device=images.device)
    rows = (dy + torch.arange(H, device=images.device).view(1, H, 1)).expand(B, H, W)
    cols = (dx + torch.arange(W, device=images.device).view(1, 1, W)).expand(B, H, W)
    flip = torch.rand(B, 1, 1, device=images.device) < 0.5
    cols = torch.where(flip, dx + (W - 1) - torch.arange(W, device=images.device).view(1, 1, W), cols)
    batch = torch.arange(B, device=images.device).view(B, 1, 1).expand(B, H, W)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def rand_augment(images, groups=16, num_ops=2, magnitude=9):
    """Crop and flip, then torchvision's RandAugment on uint8 images, on the device.

    torchvision draws one set of operations per call, so the batch is cut into ``groups`` chunks, each with its
    own draw: per-chunk diversity at the cost of ``groups`` small calls instead of one per image.
    """
    policy = RandAugment(num_ops=num_ops, magnitude=magnitude)
    images = random_crop_flip(images)
    return torch.cat([policy(chunk) for chunk in images.chunk(groups)])


def random_erasing(images, probability=0.25, area=(0.02, 1 / 3), aspect=(0.3, 3.3)):
    """Erase one random rectangle per image with probability ``probability``, filled with noise (vectorised).

    timm's RandomErasing loops over the batch in Python; this draws every rectangle at once.
    """
    B, C, H, W = images.shape
    device = images.device
    target_area = torch.empty(B, device=device).uniform_(*area) * H * W
    log_ratio = torch.empty(B, device=device).uniform_(math.log(aspect[0]), math.log(aspect[1]))
    h = (target_area * log_ratio.exp()).sqrt().round().clamp(1, H).long()
    w = (target_area / log_ratio.exp()).sqrt().round().clamp(1, W).long()
    top = (torch.rand(B, device=device) * (H - h + 1)).long()
    left = (torch.rand(B, device=device) * (W - w + 1)).long()
    rows, cols = torch.arange(H, device=device), torch.arange(W, device=device)
    inside = (((rows[None] >= top[:, None]) & (rows[None] < (top + h)[:, None]))[:, :, None]
              & ((cols[None] >= left[:, None]) & (cols[None] < (left + w)[:, None]))[:, None, :])
    inside &= (torch.rand(B, 1, 1, device=device) < probability)
    return torch.where(inside[:, None], torch.randn_like(images), images)


AUGMENTATIONS = {"none": None, "crop_flip": random_crop_flip, "randaug": rand_augment}


class GpuLoader:
    """Batches cut from a dataset that lives on ``device``.

    Each epoch's order is ``randperm`` seeded by (seed, epoch), so every process of a distributed run draws the
    same permutation and takes its own slice, and a resumed run sees the same batches as an uninterrupted one.
    Training drops the last partial batch so that every step has the same shape (no recompiles).
    """

    def __init__(self, split, batch_size, device, train=True, augment=None, seed=0, rank=0, world_size=1,
                 drop_last=None):
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.batch_size = batch_size
        self.train = train
        self.augment = augment
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.drop_last = train if drop_last is None else drop_last
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def indices(self):
        n = len(self.labels)
        if not self.train:
            return torch.arange(n, device=self.images.device)[self.rank::self.world_size]
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(n, generator=generator)
        # Interleaved slices with the same count per rank (so the collectives line up): at every step the ranks
        # together see the same images as one process with the whole batch, as a single-GPU run would.
        per_rank = n // self.world_size
        return order[self.rank:per_rank * self.world_size:self.world_size].to(self.images.device)

    def __len__(self):
        n = len(self.labels) // self.world_size if self.train else len(range(self.rank, len(self.labels),
                                                                               self.world_size))
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        order = self.indices()
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start:start + self.batch_size]
            images = self.images[index]
            if self.augment is not None:
                images = self.augment(images)  # on uint8, as torchvision's policies expect
            yield normalize(images), self.labels[index]
