"""data.py: image folders, the torchvision fallback, the device-resident loader and its augmentation."""
import io
import os
import struct
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
from data import DataError, GpuLoader, Split, load_dataset, normalize, random_crop_flip


def load_image_folder(folder):  # one split, folder/<class>/*, read as load_dataset reads each of its two
    split = data.read_images(listing := data.list_image_folder(folder))
    data.warn_skipped(listing.folder, listing.skipped)
    return split


# Written in an unsorted order on purpose: classes must come back sorted.
TRAIN_COUNTS = {"dog": 1, "airplane": 3, "cat": 2}


def write_pngs(folder, counts, size=8, seed=0):
    """folder/<class>/<i>.png with random RGB pixels; returns {class: [HWC uint8 arrays in file order]}."""
    rng = np.random.default_rng(seed)
    written = {}
    for name, count in counts.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        written[name] = []
        for i in range(count):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{i}.png")
            written[name].append(pixels)
    return written


@pytest.fixture
def image_folder(tmp_path):
    """tmp_path/{train,test}/<class>/*.png; returns the root and what was written to train/."""
    written = write_pngs(tmp_path / "train", TRAIN_COUNTS)
    write_pngs(tmp_path / "test", {name: 1 for name in TRAIN_COUNTS}, seed=1)
    return tmp_path, written


def tiny_split(n=10, size=4):
    """Random uint8 images whose labels are their own indices, so batches say which samples they hold."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)
    return Split(images, torch.arange(n), [str(i) for i in range(n)])


def loader_labels(loader):
    return [labels.tolist() for _, labels in loader]


# ------------------------------------------------------------------------------------------------ image folders


def test_load_image_folder_reads_uint8_images_labels_and_sorted_classes(image_folder):
    root, written = image_folder
    split = load_image_folder(root / "train")
    assert split.classes == ["airplane", "cat", "dog"]
    assert split.images.dtype == torch.uint8 and split.images.shape == (6, 3, 8, 8)
    assert split.labels.tolist() == [0, 0, 0, 1, 1, 2]
    expected = [pixels for name in split.classes for pixels in written[name]]  # files sorted within a class
    assert torch.equal(split.images, torch.from_numpy(np.stack(expected)).permute(0, 3, 1, 2))


def test_load_dataset_from_a_data_dir(image_folder):
    root, _ = image_folder
    train, test = load_dataset("cifar10", data_dir=str(root))
    assert len(train.labels) == 6 and len(test.labels) == 3
    assert train.classes == test.classes == ["airplane", "cat", "dog"]
    assert test.labels.tolist() == [0, 1, 2]


def test_grey_and_rgba_images_become_three_channels(tmp_path):
    (tmp_path / "a").mkdir()
    Image.fromarray(np.full((8, 8), 200, np.uint8), mode="L").save(tmp_path / "a" / "grey.png")
    Image.fromarray(np.full((8, 8, 4), 100, np.uint8), mode="RGBA").save(tmp_path / "a" / "rgba.png")
    split = load_image_folder(tmp_path)
    assert split.images.shape == (2, 3, 8, 8)
    assert set(split.images[0].unique().tolist()) == {200}


def test_a_folder_without_images_raises(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="holds no images"):
        load_image_folder(tmp_path / "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        load_image_folder(tmp_path / "empty")


def test_missing_folder_raises(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        load_image_folder(tmp_path / "nowhere")
    with pytest.raises(DataError, match="--data_dir"):
        load_dataset("cifar10", data_dir=str(tmp_path / "nowhere"))


def test_train_and_test_with_different_classes_name_what_each_side_lacks(tmp_path):
    write_pngs(tmp_path / "train", {"cat": 1, "dog": 1, "emu": 1})
    write_pngs(tmp_path / "test", {"cat": 1, "frog": 1})
    (tmp_path / "train" / "cat" / "1.png").write_bytes(b"not a png")  # never decoded: the classes fail first
    with pytest.raises(DataError, match="differ from train classes") as error:
        load_dataset(data_dir=str(tmp_path))
    assert "dog, emu missing in test/" in str(error.value) and "frog missing in train/" in str(error.value)


def test_images_of_different_sizes_raise_naming_the_file_and_both_sizes(tmp_path):
    write_pngs(tmp_path, {"cat": 1}, size=8)
    write_pngs(tmp_path, {"dog": 1}, size=6)
    with pytest.raises(DataError, match="one size") as error:
        load_image_folder(tmp_path)
    message = str(error.value)
    assert str(tmp_path / "dog" / "0.png") in message and "6x6" in message and "8x8" in message


def test_test_images_must_have_the_train_images_size(tmp_path):
    write_pngs(tmp_path / "train", {"cat": 2, "dog": 1}, size=8)
    write_pngs(tmp_path / "test", {"cat": 1, "dog": 1}, size=16)
    with pytest.raises(DataError, match="one size") as error:
        load_dataset(data_dir=str(tmp_path))
    assert str(tmp_path / "test" / "cat" / "0.png") in str(error.value) and "16x16" in str(error.value)


def test_a_non_square_image_names_the_file(tmp_path):
    write_pngs(tmp_path, {"cat": 2})
    Image.fromarray(np.zeros((8, 6, 3), np.uint8)).save(tmp_path / "cat" / "wide.png")  # 6 wide, 8 high
    with pytest.raises(DataError, match="square") as error:
        load_image_folder(tmp_path)
    assert str(tmp_path / "cat" / "wide.png") in str(error.value) and "6x8" in str(error.value)


def test_a_damaged_image_names_the_file(tmp_path):
    write_pngs(tmp_path, {"cat": 1})
    (tmp_path / "cat" / "broken.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(DataError, match="broken.png could not be decoded"):
        load_image_folder(tmp_path)


def jpeg_bytes(pixels, **options):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", **options)
    return buffer.getvalue()


@pytest.mark.parametrize("path", ["torchvision", "pil"])
@pytest.mark.parametrize("case", ["truncated jpeg", "truncated png", "text", "empty"])
def test_an_undecodable_image_file_names_the_file(tmp_path, monkeypatch, capsys, case, path):
    if path == "pil":
        monkeypatch.setattr(data, "decode_image", None)
    write_pngs(tmp_path, {"cat": 1})
    (tmp_path / "cat" / "notes.txt").write_text("skipped, but no warning when the load fails")
    png = (tmp_path / "cat" / "0.png").read_bytes()
    raw, name = {"truncated jpeg": (jpeg_bytes(np.zeros((16, 16, 3), np.uint8))[:200], "bad.jpg"),
                 "truncated png": (png[:len(png) // 2], "bad.png"), "text": (b"hello", "bad.jpeg"),
                 "empty": (b"", "bad.png")}[case]
    (tmp_path / "cat" / name).write_bytes(raw)
    with pytest.raises(DataError, match="could not be decoded") as error:
        load_image_folder(tmp_path)
    assert str(tmp_path / "cat" / name) in str(error.value) and "replace or delete" in str(error.value)
    assert capsys.readouterr().err == ""  # the error is the only line the user sees


# ------------------------------------------------------------------------------------------------ pixel modes
# Each case: a file in one PIL mode and the 8-bit RGB pixels a user means by it (built without PIL's conversions).
GREY = np.random.default_rng(2).integers(0, 256, (8, 8), dtype=np.uint8)
GREY[0, :2] = 0, 255  # the ends of the range: 16-bit 65535 must become 255
RGB = np.random.default_rng(3).integers(0, 256, (8, 8, 3), dtype=np.uint8)
ALPHA = np.random.default_rng(4).integers(0, 256, (8, 8), dtype=np.uint8)
PALETTE = np.random.default_rng(5).integers(0, 256, (16, 3), dtype=np.uint8)
INDICES = np.random.default_rng(6).integers(0, 16, (8, 8), dtype=np.uint8)
GREY_RGB = np.repeat(GREY[..., None], 3, axis=2)


def palette_image():
    image = Image.fromarray(INDICES, mode="P")
    image.putpalette(PALETTE.flatten().tolist())
    return image


def png16(pixels):
    """A 16-bit RGB PNG, which PIL cannot write: (H, W, 3) uint16 big-endian samples, no filtering."""
    height, width, _ = pixels.shape
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


MODES = {  # name: (the image or its bytes, file suffix, save options, expected HWC uint8)
    "1": (Image.fromarray(GREY > 127), ".png", {}, np.where(GREY_RGB > 127, 255, 0).astype(np.uint8)),
    "L": (Image.fromarray(GREY, mode="L"), ".png", {}, GREY_RGB),
    "LA": (Image.fromarray(np.dstack([GREY, ALPHA]), mode="LA"), ".png", {}, GREY_RGB),
    "P": (palette_image(), ".png", {}, PALETTE[INDICES]),
    "PA": (palette_image(), ".png", {"transparency": bytes(range(0, 256, 16))}, PALETTE[INDICES]),  # tRNS alpha
    "P gif": (palette_image(), ".gif", {}, PALETTE[INDICES]),
    "RGBA": (Image.fromarray(np.dstack([RGB, ALPHA]), mode="RGBA"), ".png", {}, RGB),  # alpha dropped
    "I;16": (Image.fromarray(GREY.astype(np.uint16) * 257), ".png", {}, GREY_RGB),  # 65535 -> 255, not 257x
    "I;16 tiff": (Image.fromarray(GREY.astype(np.uint16) * 257), ".tif", {}, GREY_RGB),
    "RGB 16-bit": (png16(RGB.astype(np.uint16) * 257), ".png", {}, RGB),
    "I": (Image.fromarray(GREY.astype(np.int32) * 257, mode="I"), ".tif", {}, GREY_RGB),
    "F": (Image.fromarray(GREY.astype(np.float32), mode="F"), ".tif", {}, GREY_RGB),  # PIL's 0..255 float scale
    "CMYK": (Image.fromarray(RGB).convert("CMYK"), ".tif", {}, RGB),
    "RGB": (Image.fromarray(RGB), ".png", {}, RGB),
    "RGB bmp": (Image.fromarray(RGB), ".bmp", {}, RGB),
}


def test_the_mode_cases_are_what_they_say():
    for name, (image, _, _, _) in MODES.items():
        if isinstance(image, Image.Image):
            assert image.mode == name.split()[0] or name in ("PA", "P gif", "RGB 16-bit"), name


@pytest.mark.parametrize("path", ["torchvision", "pil"])
@pytest.mark.parametrize("mode", list(MODES))
def test_every_common_mode_loads_as_its_8_bit_rgb_pixels(tmp_path, monkeypatch, mode, path):
    if path == "pil":  # the fallback for what torchvision cannot read, and for a torchvision without decoders
        monkeypatch.setattr(data, "decode_image", None)
    image, suffix, options, expected = MODES[mode]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    if isinstance(image, bytes):
        (tmp_path / "a" / f"image{suffix}").write_bytes(image)
    else:
        image.save(tmp_path / "a" / f"image{suffix}", **options)
    Image.fromarray(expected).save(tmp_path / "b" / "rgb.png")  # its 8-bit RGB equivalent, loaded beside it
    split = load_image_folder(tmp_path)
    assert split.images.dtype == torch.uint8 and split.images.shape == (2, 3, 8, 8)
    assert torch.equal(split.images[1], torch.from_numpy(expected).permute(2, 0, 1))
    difference = (split.images[0].int() - split.images[1].int()).abs().max().item()
    assert difference == 0, f"{mode} differs from its RGB pixels by up to {difference}"


def test_16_bit_values_are_rounded_to_the_nearest_8_bit_value(tmp_path):
    values = np.array([[0, 128, 129, 257 * 100 + 128, 257 * 100 + 129, 65535, 65407, 65406]], np.uint16)
    Image.fromarray(np.repeat(values, 8, axis=0)).save(tmp_path / "grey16.png")
    Image.fromarray(np.repeat(values, 8, axis=0)).save(tmp_path / "grey16.tif")
    expected = [0, 0, 1, 100, 101, 255, 255, 254]  # value / 257, rounded half up
    assert data.read_image(tmp_path / "grey16.png")[:, 0].T.tolist() == [[v] * 3 for v in expected]
    assert data.read_image(tmp_path / "grey16.tif")[:, 0].T.tolist() == [[v] * 3 for v in expected]


def test_a_pa_image_and_a_cmyk_jpeg_are_read_as_pil_converts_them(tmp_path):
    # No file format Pillow writes holds PA: the conversion itself, on the image in memory.
    assert np.array_equal(data.pil_to_rgb(palette_image().convert("PA")), PALETTE[INDICES])
    # A CMYK JPEG (lossy, so compared with PIL's own reading): torchvision and PIL agree.
    Image.fromarray(RGB).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    with Image.open(tmp_path / "cmyk.jpg") as image:
        assert image.mode == "CMYK"
        expected = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(data.read_image(tmp_path / "cmyk.jpg"), expected)


def test_ordinary_jpegs_read_the_same_through_torchvision_and_pil(tmp_path, monkeypatch):
    (tmp_path / "rgb.jpg").write_bytes(jpeg_bytes(RGB, quality=90))
    (tmp_path / "grey.jpg").write_bytes(jpeg_bytes(GREY))
    fast = [data.read_image(tmp_path / name) for name in ("rgb.jpg", "grey.jpg")]
    monkeypatch.setattr(data, "decode_image", None)
    assert all(torch.equal(a, data.read_image(tmp_path / name)) for a, name in zip(fast, ("rgb.jpg", "grey.jpg")))
    assert fast[1].shape == (3, 8, 8) and torch.equal(fast[1][0], fast[1][2])  # grey replicated


# --------------------------------------------------------------------------------- hidden and non-image files


def test_hidden_files_and_folders_are_never_classes_or_images(tmp_path, capsys):
    write_pngs(tmp_path / "train", {"cat": 2, "dog": 1})
    write_pngs(tmp_path / "train" / ".ipynb_checkpoints", {"cat": 1})  # a hidden class with images inside
    write_pngs(tmp_path / "train" / "cat", {".cache": 1})  # a hidden folder inside a class
    (tmp_path / "train" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "train" / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "train" / "cat" / "._0.png").write_bytes(b"\0\5\26\7 AppleDouble, not a PNG")
    split = load_image_folder(tmp_path / "train")
    assert split.classes == ["cat", "dog"] and split.labels.tolist() == [0, 0, 1]
    assert capsys.readouterr().err == ""  # hidden names are not even counted as skipped


def test_non_image_files_are_skipped_with_one_warning_line(tmp_path, capsys):
    write_pngs(tmp_path / "train", {"cat": 2, "dog": 1})
    write_pngs(tmp_path / "test", {"cat": 1, "dog": 1}, seed=1)
    (tmp_path / "train" / "README.txt").write_text("about this data")
    (tmp_path / "train" / "labels.csv").write_text("file,label\n")
    (tmp_path / "train" / "cat" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (tmp_path / "train" / "cat" / "notes").write_text("no suffix at all")
    (tmp_path / "train" / "dog" / "extra").mkdir()  # a folder inside a class folder: not a class of its own
    (tmp_path / "test" / "cat" / "scores.json").write_text("{}")
    train, test = load_dataset(data_dir=str(tmp_path))
    assert train.classes == test.classes == ["cat", "dog"]
    assert train.labels.tolist() == [0, 0, 1] and test.labels.tolist() == [0, 1]
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: ")
    assert "skipped 6 items that are not images" in lines[0]
    assert "train/README.txt" in lines[0] and ", ..." in lines[0]  # a few examples, not all six
    load_image_folder(tmp_path / "test")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "skipped 1 item that are not images (cat/scores.json)" in lines[0]


def test_an_empty_class_folder_names_the_folder(tmp_path):
    write_pngs(tmp_path, {"cat": 2, "dog": 1})
    (tmp_path / "emu").mkdir()
    (tmp_path / "emu" / ".DS_Store").write_bytes(b"")  # hidden and non-image files do not count as images
    (tmp_path / "emu" / "README.txt").write_text("to do")
    with pytest.raises(DataError, match="holds no images") as error:
        load_image_folder(tmp_path)
    assert f"class folder {tmp_path / 'emu'} holds no images" in str(error.value)
    assert "add images or remove the folder" in str(error.value)


def test_images_outside_class_folders_say_to_make_class_folders(tmp_path):
    for i in range(2):
        Image.fromarray(RGB).save(tmp_path / f"{i}.png")
    with pytest.raises(DataError, match="its 2 images must go into one folder per class"):
        load_image_folder(tmp_path)


# ----------------------------------------------------------------------------------------- torchvision datasets


def test_a_failed_download_says_to_pass_data_dir(monkeypatch, tmp_path):
    class NoNetwork:
        def __init__(self, *args, **kwargs):
            raise OSError("Name or service not known")

    monkeypatch.setitem(data.DATASETS, "cifar10", NoNetwork)
    with pytest.raises(DataError, match="--data_dir") as error:
        load_dataset("cifar10", download_root=str(tmp_path))
    assert "could not download cifar10" in str(error.value) and "Name or service not known" in str(error.value)
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        load_dataset("mnist", download_root=str(tmp_path))


def test_a_failed_first_download_leaves_no_folder_and_an_old_folder_stays(monkeypatch, tmp_path):
    class NoNetwork:
        def __init__(self, root, train, download):
            os.makedirs(root, exist_ok=True)  # as torchvision does before it connects
            raise OSError("Name or service not known")

    monkeypatch.setitem(data.DATASETS, "cifar10", NoNetwork)
    with pytest.raises(DataError, match="could not download"):
        load_dataset("cifar10", download_root=str(tmp_path / "data"))
    assert not (tmp_path / "data").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(DataError, match="could not download"):
        load_dataset("cifar10", download_root=str(tmp_path / "kept"))
    assert (tmp_path / "kept").is_dir()


def test_a_torchvision_dataset_becomes_nchw_uint8(monkeypatch, tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)

    class FakeCifar:  # the attributes torchvision's CIFAR datasets have: NHWC uint8 data, a list of targets
        def __init__(self, root, train, download):
            self.data = pixels if train else pixels[:2]
            self.targets = [0, 1, 0, 1, 1] if train else [1, 0]
            self.classes = ["a", "b"]

    monkeypatch.setitem(data.DATASETS, "cifar10", FakeCifar)
    train, test = load_dataset("cifar10", download_root=str(tmp_path))
    assert train.images.shape == (5, 3, 4, 4) and train.images.dtype == torch.uint8
    assert train.images[2, 1, 3, 0] == pixels[2, 3, 0, 1]
    assert train.labels.tolist() == [0, 1, 0, 1, 1] and test.labels.tolist() == [1, 0]
    assert train.classes == ["a", "b"]


# ------------------------------------------------------------------------------------------------- GpuLoader


def test_training_drops_the_last_partial_batch():
    split = tiny_split(10)
    loader = GpuLoader(split, 3, "cpu", train=True)
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    assert [len(labels) for _, labels in batches] == [3, 3, 3]
    seen = torch.cat([labels for _, labels in batches])
    assert len(set(seen.tolist())) == 9
    for images, labels in batches:  # the images are the labelled samples, scaled to [-1, 1]
        assert images.dtype == torch.float32
        assert torch.equal(images, normalize(split.images[labels]))


def test_evaluation_covers_every_sample_once_in_order():
    loader = GpuLoader(tiny_split(10), 3, "cpu", train=False)
    batches = loader_labels(loader)
    assert len(loader) == len(batches) == 4
    assert [len(b) for b in batches] == [3, 3, 3, 1]
    assert sum(batches, []) == list(range(10))


def test_the_order_depends_on_seed_and_epoch_only():
    split = tiny_split(32)

    def order(seed, epoch):
        loader = GpuLoader(split, 4, "cpu", seed=seed)
        loader.set_epoch(epoch)
        return sum(loader_labels(loader), [])

    assert order(1, 2) == order(1, 2)
    assert order(1, 2) != order(1, 3)
    assert order(1, 2) != order(2, 2)
    assert order(1, 2) != list(range(32))


def test_two_ranks_train_on_disjoint_equal_shares():
    split = tiny_split(11)
    ranks = [GpuLoader(split, 2, "cpu", seed=3, rank=r, world_size=2) for r in (0, 1)]
    for loader in ranks:
        loader.set_epoch(5)
    indices = [set(loader.indices().tolist()) for loader in ranks]
    assert len(indices[0]) == len(indices[1]) == 5
    assert not indices[0] & indices[1]
    assert len(ranks[0]) == len(ranks[1]) == 2  # the same number of steps, so collectives line up
    seen = [set(sum(loader_labels(loader), [])) for loader in ranks]
    assert not seen[0] & seen[1] and len(seen[0]) == len(seen[1]) == 4


def test_two_ranks_evaluate_every_sample_once_between_them():
    split = tiny_split(11)
    seen = [sum(loader_labels(GpuLoader(split, 2, "cpu", train=False, rank=r, world_size=2)), []) for r in (0, 1)]
    assert sorted(seen[0] + seen[1]) == list(range(11))


def test_the_loader_applies_the_augmentation():
    split = tiny_split(8)
    loader = GpuLoader(split, 4, "cpu", augment=lambda images: images.flip(-1))
    for images, labels in loader:
        assert torch.equal(images, normalize(split.images[labels]).flip(-1))


# ------------------------------------------------------------------------------------ normalisation, augmentation


def test_normalize_maps_the_byte_range_to_minus_one_one():
    pixels = torch.tensor([0, 255, 51], dtype=torch.uint8)
    out = normalize(pixels)
    assert out.dtype == torch.float32
    assert out.tolist() == pytest.approx([-1.0, 1.0, 51 / 127.5 - 1])
    assert pixels.tolist() == [0, 255, 51]  # the input is left alone
    assert torch.allclose(data.denormalize(out) * 255, pixels.float())


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_random_crop_flip_keeps_shape_and_dtype_and_changes_the_batch(dtype):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 8, 8)).to(dtype)
    out = random_crop_flip(images)
    assert out.shape == images.shape and out.dtype == dtype
    assert not torch.equal(out, images)


def test_random_crop_flip_without_padding_only_flips():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (32, 3, 6, 6), dtype=torch.uint8)
    out = random_crop_flip(images, pad=0)
    same = (out == images).flatten(1).all(1)
    flipped = (out == images.flip(-1)).flatten(1).all(1)
    assert bool((same | flipped).all())
    assert same.any() and flipped.any()


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_random_flip_mirrors_about_half_the_images_and_leaves_the_rest(dtype):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 5, 5)).to(dtype)  # odd width: no image equals its mirror by chance
    out = data.random_flip(images)
    assert out.shape == images.shape and out.dtype == dtype
    same = (out == images).flatten(1).all(1)
    flipped = (out == images.flip(-1)).flatten(1).all(1)
    assert bool((same ^ flipped).all())  # each image either kept or mirrored, never both, never anything else
    assert 16 < int(flipped.sum()) < 48
    assert data.AUGMENTATIONS["flip"] is data.random_flip


def test_random_crop_flip_output_is_a_shifted_possibly_flipped_copy():
    torch.manual_seed(1)
    pad, size = 2, 6
    images = torch.randint(1, 256, (24, 3, size, size), dtype=torch.uint8)  # no zeros: padding stands out
    out = random_crop_flip(images, pad=pad)
    shifted = 0
    for image, result in zip(images, out):
        candidates = [(dy, dx, flip) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1) for flip in (0, 1)
                      if torch.equal(result, F.pad(image.flip(-1) if flip else image, [pad] * 4)
                                     [:, dy:dy + size, dx:dx + size])]
        assert candidates, "the output is no translation or flip of its input"
        shifted += (candidates[0][0], candidates[0][1]) != (pad, pad)
    assert shifted > 0


def test_two_ranks_together_see_the_batches_of_one_process():
    split = tiny_split(12)
    whole = GpuLoader(split, 4, "cpu", seed=5)
    ranks = [GpuLoader(split, 2, "cpu", seed=5, rank=r, world_size=2) for r in (0, 1)]
    for loader in (whole, *ranks):
        loader.set_epoch(1)
    per_rank = [loader_labels(loader) for loader in ranks]
    for step, batch in enumerate(loader_labels(whole)):
        assert sorted(batch) == sorted(per_rank[0][step] + per_rank[1][step])
