"""Figures: MAE reconstruction grids (for TensorBoard and the strategies figure) and captioned predictions."""
import torch
from PIL import Image, ImageDraw
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import make_grid

from data import denormalize
from model import MASK_STRATEGIES, PatchShuffle
from utils import kept_random_state

SCALE = 4  # CIFAR's 32 px are too small to read: draw each image 4x larger


@torch.no_grad()
def reconstruction_grid(model, images, seed=0):
    """Rows: masked input | reconstruction (visible patches pasted back) | original; one column per image.

    The masks come from a fixed seed so the figure shows the same masks every epoch, and drawing them leaves the
    training run's random streams untouched.
    """
    was_training = model.training
    model.eval()
    with kept_random_state(images.device):  # fp32: a figure is cheap, and exact
        torch.manual_seed(seed)
        predicted, mask = model(images)
    model.train(was_training)
    predicted, mask = predicted.float(), mask.float()
    rows = torch.cat([images * (1 - mask), predicted * mask + images * (1 - mask), images])
    return make_grid(denormalize(rows), nrow=len(images), padding=1)


def prediction_figure(images, labels, predictions, classes, columns=8):
    """A grid of images, each captioned with its true and predicted label; wrong ones in red with a red frame."""
    size, caption = images.shape[-1] * SCALE, 28
    rows = -(-len(images) // columns)
    figure = Image.new("RGB", (columns * (size + 8), rows * (size + caption + 8)), "white")
    draw = ImageDraw.Draw(figure)
    for i, (image, label, prediction) in enumerate(zip(images, labels.tolist(), predictions.tolist())):
        x, y = (i % columns) * (size + 8) + 4, (i // columns) * (size + caption + 8) + 4
        figure.paste(to_pil_image(image).resize((size, size), Image.NEAREST), (x, y))
        color = (0, 120, 0) if label == prediction else (200, 0, 0)
        if label != prediction:
            draw.rectangle([x - 3, y - 3, x + size + 2, y + size + 2], outline=color, width=3)
        draw.text((x, y + size + 2), f"true: {classes[label]}", fill="black")
        draw.text((x, y + size + 14), f"pred: {classes[prediction]}", fill=color)
    return figure


def drawable_maskings(model, strategies=MASK_STRATEGIES, ratios=(0.75,)):
    """The (strategy, ratio) pairs this MAE can mask; a ValueError if there is none (check before drawing)."""
    num_patches = model.encoder.pos_embedding.shape[0]
    pairs = []
    for strategy in strategies:
        for ratio in ratios:
            try:
                PatchShuffle(ratio, strategy).check(num_patches)
            except ValueError:
                continue
            pairs.append((strategy, ratio))
    if not pairs:
        raise ValueError(f"no masking strategy leaves a visible patch at mask ratios {list(ratios)}")
    return pairs


@torch.no_grad()
def strategies_figure(model, images, strategies=MASK_STRATEGIES, ratios=(0.75,), seed=0):
    """For each (strategy, ratio): a masked row and a reconstruction row, labelled on the left; the originals last.

    A strategy that cannot mask at a ratio (block and grid need a rectangle of the kept count) is left out.
    """
    shuffle = model.encoder.shuffle
    rows, labels = [], []
    try:
        for strategy, ratio in drawable_maskings(model, strategies, ratios):
            model.encoder.shuffle = PatchShuffle(ratio, strategy)
            grid = reconstruction_grid(model, images, seed)
            rows.append(grid[:, : grid.shape[1] * 2 // 3])  # masked and reconstructed rows
            labels.append(f"{strategy}\nratio {ratio:g}\n(masked,\nrecon.)")
        rows.append(grid[:, grid.shape[1] * 2 // 3:])
        labels.append("original")
    finally:
        model.encoder.shuffle = shuffle
    heights = [r.shape[1] * SCALE // 2 for r in rows]
    grid_image = to_pil_image(torch.cat(rows, dim=1)).resize((rows[0].shape[2] * SCALE // 2, sum(heights)),
                                                             Image.NEAREST)
    margin = 72  # a white column on the left for the row labels
    figure = Image.new("RGB", (grid_image.width + margin, grid_image.height), "white")
    figure.paste(grid_image, (margin, 0))
    draw = ImageDraw.Draw(figure)
    for label, top, height in zip(labels, [sum(heights[:i]) for i in range(len(heights))], heights):
        text_height = 12 * (label.count("\n") + 1)  # about 12 px a line in PIL's default font, old or new
        draw.multiline_text((4, top + max(height - text_height, 0) // 2), label, fill="black")
    return figure
