"""Figures: MAE reconstruction grids (for TensorBoard and the strategies figure) and captioned predictions."""
from contextlib import suppress
from itertools import accumulate, product

import torch
from PIL import Image, ImageDraw, ImageOps
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import make_grid

from data import denormalize
from devices import kept_random_state
from model import MASK_STRATEGIES, PatchShuffle

SCALE = 4  # CIFAR's 32 px are too small to read: draw each image 4x larger


@torch.no_grad()
def reconstruction_grid(model, images, seed=0):
    """Rows: masked | reconstruction (visible patches pasted back) | original, masks drawn aside from ``seed``."""
    was_training = model.training
    model.eval()
    with kept_random_state(images.device):  # fp32: a figure is cheap, and exact
        torch.manual_seed(seed)
        predicted, mask = (x.float() for x in model(images))
    model.train(was_training)
    rows = torch.cat([images * (1 - mask), predicted * mask + images * (1 - mask), images])
    return make_grid(denormalize(rows), nrow=len(images), padding=1)


def prediction_figure(images, labels, predictions, classes, columns=8):
    """Images captioned with their true and predicted labels; wrong ones in red with a red frame."""
    size, caption = images.shape[-1] * SCALE, 28
    figure = Image.new("RGB", (columns * (size + 8), -(-len(images) // columns) * (size + caption + 8)), "white")
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
    """The (strategy, ratio) pairs this MAE can mask; a ValueError if there is none."""
    pairs = []
    for strategy, ratio in product(strategies, ratios):
        with suppress(ValueError):
            PatchShuffle(ratio, strategy).check(model.encoder.pos_embedding.shape[0])
            pairs.append((strategy, ratio))
    if not pairs:
        raise ValueError(f"no masking strategy leaves a visible patch at mask ratios {list(ratios)}")
    return pairs


@torch.no_grad()
def strategies_figure(model, images, strategies=MASK_STRATEGIES, ratios=(0.75,), seed=0):
    """A masked and a reconstructed row per drawable (strategy, ratio), labelled on the left; the originals last."""
    shuffle, rows, pairs = model.encoder.shuffle, [], drawable_maskings(model, strategies, ratios)
    try:
        for strategy, ratio in pairs:
            model.encoder.shuffle = PatchShuffle(ratio, strategy)
            grid = reconstruction_grid(model, images, seed)
            rows.append(grid[:, : grid.shape[1] * 2 // 3])  # masked and reconstructed rows
        rows.append(grid[:, grid.shape[1] * 2 // 3:])
    finally:
        model.encoder.shuffle = shuffle
    labels = [f"{strategy}\nratio {ratio:g}\n(masked,\nrecon.)" for strategy, ratio in pairs] + ["original"]
    heights = [r.shape[1] * SCALE // 2 for r in rows]
    image = to_pil_image(torch.cat(rows, dim=1)).resize((rows[0].shape[2] * SCALE // 2, sum(heights)), Image.NEAREST)
    figure = ImageOps.expand(image, (72, 0, 0, 0), "white")  # a white column on the left for the row labels
    draw = ImageDraw.Draw(figure)
    for label, top, height in zip(labels, accumulate(heights, initial=0), heights):  # about 12 px a line of text
        draw.multiline_text((4, top + max(height - 12 * (label.count("\n") + 1), 0) // 2), label, fill="black")
    return figure
