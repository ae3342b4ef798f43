"""Datasets as uint8 tensors, and a loader that keeps the whole dataset on the training device.

CIFAR is 50,000 images of 3 x 32 x 32 bytes (150 MB): it fits on any GPU, so batches are cut from one resident
tensor with ``randperm`` instead of going through DataLoader workers (the cifar10-airbench approach).
"""
import io
import math
import os
import struct
import sys
import warnings
from collections import Counter
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2 import RandAugment

try:  # deprecated since torchvision 0.29 (TorchCodec supersedes it); without it every image goes through PIL
    from torchvision.io import ImageReadMode, decode_image
except ImportError:  # pragma: no cover - a torchvision that no longer has it
    decode_image = None

DATASETS = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}
# torchvision ImageFolder's suffixes, plus GIF: everything else in a class folder is skipped with one warning line.
IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """The dataset could not be found, read or downloaded: the message says what to do."""


@dataclass
class Split:
    images: torch.Tensor  # (N, 3, H, W) uint8
    labels: torch.Tensor  # (N,) int64
    classes: list


@dataclass
class _Listing:
    """What an image folder holds, before any image is decoded (paths as strings: cheaper than 60,000 Paths)."""
    folder: Path
    classes: list
    files: list  # image files, class by class, sorted by name within a class
    labels: list
    skipped: list  # neither hidden nor an image: README.txt, labels.csv, a folder inside a class folder (ends in /)


def load_dataset(name="cifar10", data_dir=None, download_root="data"):
    """The train and test splits: from an image folder (``data_dir/{train,test}/<class>/*``) or torchvision."""
    if data_dir:
        train, test = list_image_folder(Path(data_dir) / "train"), list_image_folder(Path(data_dir) / "test")
        if train.classes != test.classes:  # found before decoding 60,000 images
            only_train = [name for name in train.classes if name not in test.classes]
            only_test = [name for name in test.classes if name not in train.classes]
            missing = [f"{', '.join(names)} missing in {side}/" for names, side in ((only_train, "test"),
                                                                                      (only_test, "train")) if names]
            raise DataError(f"{data_dir}: test classes differ from train classes ({'; '.join(missing)}); "
                            f"train/ and test/ need the same class folders")
        train_split = read_images(train)
        test_split = read_images(test, reference=(train.files[0], train_split.images.shape[-1]))
        warn_skipped(Path(data_dir), train.skipped + test.skipped)  # only once all loaded: an error stays one line
        return train_split, test_split
    return load_torchvision(name, download_root, train=True), load_torchvision(name, download_root, train=False)


def peek(name="cifar10", data_dir=None):
    """(image size, number of classes, number of training images) without loading the data set: an image folder
    is listed and its files' headers read (see ``check_sizes``)."""
    if not data_dir:
        return 32, 100 if name == "cifar100" else 10, 50000
    train = list_image_folder(Path(data_dir) / "train")
    reference = check_sizes(train) or (None, read_image(train.files[0]).shape[-1])  # no header PIL can read
    return reference[1], len(train.classes), len(train.files)


def load_image_folder(folder):
    """``folder/<class>/*`` as a Split: classes sorted by name, files sorted by name within a class."""
    listing = list_image_folder(folder)
    split = read_images(listing)
    warn_skipped(listing.folder, listing.skipped)
    return split


def list_image_folder(folder):
    """The classes and image files of ``folder``; hidden names (.DS_Store, .ipynb_checkpoints) are never seen."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder; --data_dir needs train/<class>/ and test/<class>/ inside")
    classes, skipped = [], []
    for entry in visible_entries(folder):
        (classes if entry.is_dir() else skipped).append(entry.name)
    skipped = [str(folder / name) for name in skipped]  # files outside any class folder
    if not classes:
        loose = sum(is_image(name) for name in skipped)
        hint = f"; its {loose} images must go into one folder per class" if loose else ""
        raise DataError(f"{folder} holds no images: expected {folder}/<class>/*.jpg or *.png{hint}")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = []
        for entry in visible_entries(folder / name):
            if entry.is_dir():
                skipped.append(entry.path + "/")
            else:
                (found if is_image(entry.name) else skipped).append(entry.path)
        if not found:
            raise DataError(f"class folder {folder / name} holds no images (it needs *.jpg or *.png files); "
                            f"add images or remove the folder")
        files += found
        labels += [label] * len(found)
    return _Listing(folder, classes, files, labels, skipped)


def visible_entries(folder):
    """``os.scandir`` (no stat per file, unlike pathlib) without hidden names, sorted by name."""
    with os.scandir(folder) as entries:
        return sorted((entry for entry in entries if not entry.name.startswith(".")), key=lambda entry: entry.name)


def is_image(name):
    return name.lower().endswith(IMAGE_SUFFIXES)


def warn_skipped(root, skipped):
    """One stderr line for everything skipped, however many files that is."""
    if not skipped:
        return
    names = [os.path.relpath(path, root) + ("/" if path.endswith("/") else "") for path in skipped[:3]]
    more = ", ..." if len(skipped) > 3 else ""
    print(f"warning: {root}: skipped {len(skipped)} {'item' if len(skipped) == 1 else 'items'} that are not images "
          f"({', '.join(names)}{more}); an image needs one of the suffixes {' '.join(IMAGE_SUFFIXES)}",
          file=sys.stderr)


def read_images(listing, reference=None):
    """Decode every file of ``listing`` into one (N, 3, S, S) uint8 tensor.

    ``reference`` is (a file, its side) that every image must match: test images must have the train images' size.
    Every size is checked from the files' headers first (see ``check_sizes``), so a huge file costs its header.
    """
    reference = check_sizes(listing, reference)
    images = []
    for path in listing.files:
        image = read_image(path)
        check_size(path, image.shape[2], image.shape[1], reference)  # a file whose header PIL could not read
        images.append(image)
    return Split(torch.stack(images), torch.tensor(listing.labels), listing.classes)


def check_sizes(listing, reference=None):
    """Every image's size read from its file header, before any is decoded: all square and of one size (the
    reference's, else the size most files have, so the odd file is the one named), and the whole split small
    enough to hold in memory as one tensor. Returns the reference, (a file, its side)."""
    sizes = [(path, header_size(path)) for path in listing.files]
    known = [(path, size) for path, size in sizes if size is not None]
    if reference is None and known:
        common = Counter(size for _, size in known).most_common(1)[0][0]
        reference = next((path, size[0]) for path, size in known if size == common)
    for path, (width, height) in known:
        check_size(path, width, height, reference)
    if reference is not None:
        check_fits_in_memory(listing, reference[1])
    return reference


def check_size(path, width, height, reference):
    if height != width:
        raise DataError(f"{path} is {width}x{height} pixels (width x height): the model needs square images; "
                        f"crop or resize it to a square")
    if reference is not None and width != reference[1]:
        raise DataError(f"{path} is {width}x{width} pixels but {reference[0]} is {reference[1]}x{reference[1]}: "
                        f"all images (train and test) must have one size; resize them to one size")


def check_fits_in_memory(listing, side):
    """A split is held as one uint8 tensor (and stacked once: twice that at the peak): refused before decoding when
    that would not fit in half of this machine's memory."""
    needed, memory = 2 * len(listing.files) * 3 * side * side, physical_memory()
    if memory and needed > memory // 2:
        raise DataError(f"{listing.folder}: {len(listing.files)} images of {side}x{side} pixels need "
                        f"{needed / 2 ** 30:.1f} GiB to load, more than half of this machine's "
                        f"{memory / 2 ** 30:.1f} GiB; resize them (this code trains on small images, like CIFAR's "
                        f"32x32)")


def physical_memory():
    """Bytes of memory on this machine (0 where the system does not say)."""
    with suppress(ValueError, OSError, AttributeError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return 0


def header_size(path):
    """(width, height) from the file's header, without decoding a pixel (PIL's open is lazy); None when PIL cannot
    tell, and ``read_image`` then says what is wrong with the file. PIL's guard against decompression bombs
    (more than 2 x 89 M pixels) is an error naming the file."""
    with suppress(OSError):  # a PNG (all of CIFAR) says it in its first 24 bytes: faster than PIL's open
        with open(path, "rb") as file:
            head = file.read(24)
        if head.startswith(PNG) and head[12:16] == b"IHDR":
            return struct.unpack(">II", head[16:24])
    try:
        with warnings.catch_warnings():  # a DecompressionBombWarning: the size is checked by the caller
            warnings.simplefilter("ignore")
            with Image.open(path) as image:
                return image.size
    except Image.DecompressionBombError as error:
        raise DataError(f"{path} is too large to be one of the data set's images ({error}); replace or delete "
                        f"the file") from None
    except Exception:  # not an image, damaged, unreadable: read_image gives the reason
        return None


PNG, JPEG = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"


def read_image(path):
    """A (3, H, W) uint8 RGB tensor, whatever the file's mode: what ``Image.open(path).convert("RGB")`` gives,
    except that 16-bit images are scaled to 8 bits (value / 257, rounded) rather than clipped at 255.

    8-bit and 16-bit JPEG, PNG and WebP files (all of CIFAR) take torchvision's decoders, which are about twice as fast
    as PIL on small images and give the same pixels as ``convert("RGB")``: grey replicated to three channels,
    palettes expanded, alpha dropped. Everything else (TIFF, BMP, GIF, CMYK, ...) goes through PIL.
    """
    try:
        with open(path, "rb") as file:
            raw = file.read()
    except OSError as error:
        raise DataError(f"{path} could not be read ({error.strerror or error})") from None
    if decode_image is not None and (raw.startswith((PNG, JPEG)) or (raw[:4] == b"RIFF" and raw[8:12] == b"WEBP")):
        try:
            image = decode_image(torch.frombuffer(bytearray(raw), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:  # damaged, or a variant this libpng/libjpeg cannot read: PIL has the last word
            pass
        else:
            if image.dtype == torch.uint16:  # a 16-bit PNG: 65535 -> 255, as for PIL's 16-bit modes below
                image = torch.div(image.to(torch.int32) + 128, 257, rounding_mode="floor").to(torch.uint8)
            return image
    try:
        with warnings.catch_warnings():  # PIL's notes on palettes with transparency: not the user's concern here
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(raw)) as image:
                pixels = pil_to_rgb(image)
    except Exception as error:  # PIL raises OSError, ValueError, SyntaxError, ... for what it cannot read
        reason = ("it is empty" if not raw else "not in an image format that PIL or torchvision can read"
                  if isinstance(error, UnidentifiedImageError) else str(error) or type(error).__name__)
        raise DataError(f"{path} could not be decoded as an image ({reason}); replace or delete the file") from None
    return torch.from_numpy(pixels).permute(2, 0, 1)


def pil_to_rgb(image):
    """An (H, W, 3) uint8 array from a PIL image of any mode (the first frame of a GIF or a multi-page TIFF)."""
    if image.mode.startswith("I"):  # I;16* (16-bit PNG or TIFF) and I (32-bit: older Pillow reads 16-bit PNGs so)
        grey = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        return np.repeat(((grey + 128) // 257).astype(np.uint8)[..., None], 3, axis=2)
    # Everything else as convert("RGB") gives it, which is what torchvision's ImageFolder hands its users:
    # alpha (LA, PA, RGBA, a palette's transparency) is dropped, not composited onto a background; 1, L and F
    # (float, read as 0..255 and clipped) are replicated to three channels; P and PA look up their palette;
    # CMYK uses PIL's own conversion.
    return np.array(image.convert("RGB"))


def load_torchvision(name, root, train):
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)} or pass --data_dir")
    created = not Path(root).exists()
    try:
        dataset = DATASETS[name](root, train=train, download=True)
    except Exception as error:  # no network, a proxy, a half-downloaded archive: all need the same advice
        if created:
            with suppress(OSError):
                Path(root).rmdir()  # the empty folder a failed first download made; never anything inside
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


def random_flip(images):
    """Per-sample horizontal flip with probability 1/2, on the device: the mildest augmentation, for short runs
    that underfit (where a random crop costs more accuracy than it brings)."""
    flip = torch.rand(images.shape[0], 1, 1, 1, device=images.device) < 0.5
    return torch.where(flip, images.flip(-1), images)


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


AUGMENTATIONS = {"none": None, "flip": random_flip, "crop_flip": random_crop_flip, "randaug": rand_augment}


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
        self.epoch, self.repeats = 0, 1  # repeats: passes over the data in one epoch

    def set_epoch(self, epoch):
        self.epoch = epoch

    def indices(self):
        n = len(self.labels)
        if not self.train:
            return torch.arange(n, device=self.images.device)[self.rank::self.world_size]
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.cat([torch.randperm(n, generator=generator) for _ in range(self.repeats)])
        n *= self.repeats
        # Interleaved slices with the same count per rank (so the collectives line up): at every step the ranks
        # together see the same images as one process with the whole batch, as a single-GPU run would.
        per_rank = n // self.world_size
        return order[self.rank:per_rank * self.world_size:self.world_size].to(self.images.device)

    def __len__(self):
        n = len(self.labels) * self.repeats // self.world_size if self.train else len(range(self.rank, len(self.labels),
                                                                               self.world_size))
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        return self.starting_at(0)

    def starting_at(self, first_batch):
        """The epoch's batches from ``first_batch`` on: a run resumed mid-epoch continues the same order."""
        order = self.indices()
        for start in range(first_batch * self.batch_size, len(self) * self.batch_size, self.batch_size):
            index = order[start:start + self.batch_size]
            images = self.images[index]
            if self.augment is not None:
                images = self.augment(images)  # on uint8, as torchvision's policies expect
            yield normalize(images), self.labels[index]
