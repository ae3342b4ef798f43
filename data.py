"""Datasets as uint8 tensors, and a loader that cuts batches from them on the training device (as airbench does)."""
import io
import math
import os
import struct
import sys
import warnings
from collections import Counter, namedtuple
from contextlib import suppress
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2 import RandAugment

decode_image = getattr(torchvision.io, "decode_image", None)  # deprecated in 0.29: without it, PIL decodes everything
DATASETS = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}
# torchvision ImageFolder's suffixes, plus GIF: everything else in a class folder is skipped with one warning line.
IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
is_image = lambda name: name.lower().endswith(IMAGE_SUFFIXES)
# Not hidden, sorted by name; os.scandir: no stat per file, unlike pathlib (the iterator closes once exhausted).
visible_entries = lambda folder: sorted((e for e in os.scandir(folder) if e.name[0] != "."), key=lambda e: e.name)
PNG, JPEG = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"
warnings.filterwarnings("ignore", module="PIL")  # its DecompressionBombWarning (sizes are checked here), palette notes


class DataError(ValueError):
    """The dataset could not be found, read or downloaded: the message says what to do."""


Split = namedtuple("Split", "images labels classes")  # (N, 3, H, W) uint8, (N,) int64, class names
# An image folder, undecoded: files class by class; skipped: neither hidden nor an image (a folder there ends in /).
Listing = namedtuple("Listing", "folder classes files labels skipped")


def load_dataset(name="cifar10", data_dir=None, download_root="data"):
    """The train and test splits: from an image folder (``data_dir/{train,test}/<class>/*``) or torchvision."""
    if not data_dir:
        return load_torchvision(name, download_root, train=True), load_torchvision(name, download_root, train=False)
    train, test = list_image_folder(Path(data_dir) / "train"), list_image_folder(Path(data_dir) / "test")
    if train.classes != test.classes:
        missing = [f"{', '.join(n for n in a.classes if n not in b.classes)} missing in {side}/"
                   for a, b, side in ((train, test, "test"), (test, train, "train")) if set(a.classes) - set(b.classes)]
        raise DataError(f"{data_dir}: test classes differ from train classes ({'; '.join(missing)}); "
                        f"train/ and test/ need the same class folders")
    train_split = read_images(train)
    test_split = read_images(test, reference=(train.files[0], train_split.images.shape[-1]))
    warn_skipped(Path(data_dir), train.skipped + test.skipped)  # only once all loaded: an error stays one line
    return train_split, test_split


def peek(name="cifar10", data_dir=None):  # (image size, classes, training images), from an image folder's headers only
    if not data_dir:
        return 32, 100 if name == "cifar100" else 10, 50000
    train = list_image_folder(Path(data_dir) / "train")
    reference = check_sizes(train) or (None, read_image(train.files[0]).shape[-1])  # no header PIL can read
    return reference[1], len(train.classes), len(train.files)


def list_image_folder(folder):  # classes and their image files, sorted by name; hidden names (.DS_Store) are never seen
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder; --data_dir needs train/<class>/ and test/<class>/ inside")
    entries = visible_entries(folder)
    classes = [e.name for e in entries if e.is_dir()]
    skipped = [e.path for e in entries if not e.is_dir()]  # files outside any class folder
    if not classes:
        loose = sum(map(is_image, skipped))
        hint = f"; its {loose} images must go into one folder per class" if loose else ""
        raise DataError(f"{folder} holds no images: expected {folder}/<class>/*.jpg or *.png{hint}")
    files, labels = [], []
    for label, name in enumerate(classes):
        entries = visible_entries(folder / name)
        found = [e.path for e in entries if not e.is_dir() and is_image(e.name)]
        skipped += [e.path + "/" * e.is_dir() for e in entries if e.is_dir() or not is_image(e.name)]
        if not found:
            raise DataError(f"class folder {folder / name} holds no images (it needs *.jpg or *.png files); "
                            f"add images or remove the folder")
        files += found
        labels += [label] * len(found)
    return Listing(folder, classes, files, labels, skipped)


def warn_skipped(root, skipped):  # one stderr line for everything skipped, however many files that is
    if skipped:
        names = ", ".join(os.path.relpath(path, root) + "/" * path.endswith("/") for path in skipped[:3])
        print(f"warning: {root}: skipped {len(skipped)} {'item' if len(skipped) == 1 else 'items'} that are not "
              f"images ({names}{', ...' if len(skipped) > 3 else ''}); an image needs one of the suffixes "
              f"{' '.join(IMAGE_SUFFIXES)}", file=sys.stderr)


def read_images(listing, reference=None):  # one uint8 Split; ``reference``: (a file, its side), every image's
    check_sizes(listing, reference)
    return Split(torch.stack([read_image(path) for path in listing.files]), torch.tensor(listing.labels),
                 listing.classes)


def check_sizes(listing, reference=None):
    """From the headers: square images of one size (the reference's, else the commonest: the odd file is named)."""
    known = [(path, size) for path in listing.files if (size := header_size(path)) is not None]
    if reference is None and known:
        common = Counter(size for _, size in known).most_common(1)[0][0]
        reference = next((path, size[0]) for path, size in known if size == common)
    for path, (width, height) in known:
        if height != width:
            raise DataError(f"{path} is {width}x{height} pixels (width x height): the model needs square images; "
                            f"crop or resize it to a square")
        if width != reference[1]:
            raise DataError(f"{path} is {width}x{width} pixels but {reference[0]} is {reference[1]}x{reference[1]}: "
                            f"all images (train and test) must have one size; resize them to one size")
    if reference is not None:  # held as one uint8 tensor, stacked once: twice that at the peak
        n, side, memory = len(listing.files), reference[1], physical_memory()
        needed = 2 * n * 3 * side * side
        if memory and needed > memory // 2:
            raise DataError(f"{listing.folder}: {n} images of {side}x{side} pixels need {needed / 2 ** 30:.1f} GiB to "
                            f"load, more than half of this machine's {memory / 2 ** 30:.1f} GiB; resize them (this "
                            f"code trains on small images, like CIFAR's 32x32)")
    return reference


def physical_memory():  # bytes of memory on this machine; 0 where the system does not say
    with suppress(ValueError, OSError, AttributeError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return 0


def header_size(path):  # (width, height) from a PNG's first 24 bytes, else PIL's lazy open; None when PIL cannot tell
    with suppress(OSError), open(path, "rb") as file:
        head = file.read(24)
        if head.startswith(PNG) and head[12:16] == b"IHDR":
            return struct.unpack(">II", head[16:24])
    try:
        with Image.open(path) as image:
            return image.size
    except Exception as error:  # not an image, damaged, unreadable: read_image gives the reason
        if isinstance(error, Image.DecompressionBombError):
            raise DataError(f"{path} is too large to be one of the data set's images ({error}); replace or delete "
                            f"the file") from None


def read_image(path):
    """(3, H, W) uint8 as PIL's ``convert("RGB")``, but 16-bit scaled by 1/257, not clipped. JPEG, PNG and WebP
    take torchvision's faster decoders (the same pixels), the rest PIL."""
    raw = Path(path).read_bytes()  # an OSError names the file: run_cli makes it one line
    if decode_image is not None and (raw.startswith((PNG, JPEG)) or (raw[:4] == b"RIFF" and raw[8:12] == b"WEBP")):
        with suppress(RuntimeError):  # damaged, or a variant this libpng/libjpeg cannot read: PIL has the last word
            image = decode_image(torch.frombuffer(bytearray(raw), dtype=torch.uint8), torchvision.io.ImageReadMode.RGB)
            if image.dtype == torch.uint16:  # a 16-bit PNG: 65535 -> 255, as for PIL's 16-bit modes below
                image = torch.div(image.to(torch.int32) + 128, 257, rounding_mode="floor").to(torch.uint8)
            return image
    try:
        with Image.open(io.BytesIO(raw)) as image:
            pixels = pil_to_rgb(image)
    except Exception as error:  # PIL raises OSError, ValueError, SyntaxError, ... for what it cannot read
        reason = ("it is empty" if not raw else "not in an image format that PIL or torchvision can read"
                  if isinstance(error, UnidentifiedImageError) else str(error) or type(error).__name__)
        raise DataError(f"{path} could not be decoded as an image ({reason}); replace or delete the file") from None
    return torch.from_numpy(pixels).permute(2, 0, 1)


def pil_to_rgb(image):  # (H, W, 3) uint8 from any PIL mode: integer modes scaled by 1/257, else ``convert("RGB")``
    if image.mode.startswith("I"):  # I;16* (16-bit PNG or TIFF) and I (32-bit: older Pillow reads 16-bit PNGs so)
        grey = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        return np.repeat(((grey + 128) // 257).astype(np.uint8)[..., None], 3, axis=2)
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


normalize = lambda images: images.float().div_(127.5).sub_(1.0)  # uint8 -> [-1, 1]: the reference's Normalize(0.5, 0.5)
denormalize = lambda images: ((images.float() + 1) / 2).clamp(0, 1)


def random_crop_flip(images, pad=4):  # per-sample shift by up to ``pad`` pixels (zero padding) and horizontal flip
    (B, _, H, W), device = images.shape, images.device
    dy, dx = (torch.randint(0, 2 * pad + 1, (B, 1, 1), device=device) for _ in "yx")
    flip = torch.rand(B, 1, 1, device=device) < 0.5
    y, x = torch.arange(H, device=device).view(1, H, 1), torch.arange(W, device=device).view(1, 1, W)
    rows, cols = (dy + y).expand(B, H, W), (dx + torch.where(flip, W - 1 - x, x)).expand(B, H, W)
    batch = torch.arange(B, device=device).view(B, 1, 1)
    return F.pad(images, (pad, pad, pad, pad)).permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def random_flip(images):  # per-sample flip with probability 1/2 (short runs: a crop costs more than it brings)
    flip = torch.rand(images.shape[0], 1, 1, 1, device=images.device) < 0.5
    return torch.where(flip, images.flip(-1), images)


def rand_augment(images, groups=16):  # crop, flip, then RandAugment (2 ops, magnitude 9): one draw of ops per chunk
    return torch.cat([RandAugment()(chunk) for chunk in random_crop_flip(images).chunk(groups)])


def random_erasing(images, probability=0.25, area=(0.02, 1 / 3), aspect=(0.3, 3.3)):
    """timm's RandomErasing (one noise-filled rectangle per image with ``probability``), drawn for all at once."""
    B, C, H, W = images.shape
    target_area = torch.empty(B, device=images.device).uniform_(*area) * H * W
    log_ratio = torch.empty(B, device=images.device).uniform_(math.log(aspect[0]), math.log(aspect[1]))
    inside = random_rectangles(target_area, log_ratio, H, W) & (torch.rand(B, 1, 1, device=images.device) < probability)
    return torch.where(inside[:, None], torch.randn_like(images), images)


def random_rectangles(area, log_aspect, height, width):
    """(..., H, W) bool: rectangles of ~``area`` pixels, aspect exp(``log_aspect``), clipped, at random places."""
    h = (area * log_aspect.exp()).sqrt().round().clamp(1, height).long()
    w = (area / log_aspect.exp()).sqrt().round().clamp(1, width).long()
    top, left = ((torch.rand(area.shape, device=area.device) * (side - size + 1)).long() for side, size in
                 ((height, h), (width, w)))
    top, left, h, w = (x[..., None, None] for x in (top, left, h, w))
    rows, cols = torch.arange(height, device=area.device)[:, None], torch.arange(width, device=area.device)
    return (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)


AUGMENTATIONS = {"none": None, "flip": random_flip, "crop_flip": random_crop_flip, "randaug": rand_augment}


class GpuLoader:
    """Batches of a dataset on ``device`` in a ``randperm`` seeded by (seed, epoch), one slice per rank; training
    drops the last partial batch (one shape: no recompiles). A resumed run sees the same batches."""

    def __init__(self, split, batch_size, device, train=True, augment=None, seed=0, rank=0, world_size=1):
        self.images, self.labels = split.images.to(device), split.labels.to(device)
        self.batch_size, self.train, self.augment, self.seed = batch_size, train, augment, seed
        self.rank, self.world_size, self.epoch, self.repeats = rank, world_size, 0, 1  # repeats: passes per epoch

    def set_epoch(self, epoch):
        self.epoch = epoch

    def indices(self):
        if not self.train:
            return torch.arange(len(self.labels), device=self.images.device)[self.rank::self.world_size]
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.cat([torch.randperm(len(self.labels), generator=generator) for _ in range(self.repeats)])
        # Interleaved slices, the same count per rank: together the ranks see one process's batch at every step.
        return order[self.rank:len(order) // self.world_size * self.world_size:self.world_size].to(self.images.device)

    def __len__(self):
        n = len(self.labels) * self.repeats // self.world_size if self.train else len(self.indices())
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def starting_at(self, first_batch=0):  # from ``first_batch`` on: a run resumed mid-epoch keeps the order
        order = self.indices()
        for start in range(first_batch * self.batch_size, len(self) * self.batch_size, self.batch_size):
            index = order[start:start + self.batch_size]
            images = self.images[index] if self.augment is None else self.augment(self.images[index])  # uint8
            yield normalize(images), self.labels[index]

    __iter__ = starting_at
