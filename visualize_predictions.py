"""Figures: test images with true and predicted labels, and MAE reconstructions under each masking strategy.

    python visualize_predictions.py --model_path vit-t-cls_from-vit-t-mae.pt --output predictions.png
    python visualize_predictions.py --model_path ... --mae_model_path vit-t-mae.pt   # + reconstructions.png
"""
import argparse

import torch
from PIL import Image, ImageDraw
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import make_grid

import utils
from data import denormalize, load_dataset, normalize
from model import MAE_Encoder, MAE_ViT, MASK_STRATEGIES, PatchShuffle, ViT_Classifier

SCALE = 4  # CIFAR's 32 px are too small to read: draw each image 4x larger


@torch.no_grad()
def reconstruction_grid(model, images, seed=0):
    """Rows: masked input | reconstruction (visible patches pasted back) | original; one column per image.

    The masks come from a fixed seed so the figure shows the same masks every epoch, and drawing them leaves the
    training run's random streams untouched.
    """
    was_training = model.training
    model.eval()
    devices = [images.device] if images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), utils.autocast(images.device):
        torch.manual_seed(seed)
        predicted, mask = model(images)
    model.train(was_training)
    predicted, mask = predicted.float(), mask.float()
    rows = torch.cat([images * (1 - mask), predicted * mask + images * (1 - mask), images])
    return make_grid(denormalize(rows), nrow=len(images), padding=1)


def load_classifier(path, image_size, trust):
    checkpoint = utils.load_checkpoint(path, trust, "classifier", "--model_path")
    args = checkpoint.get("args", {})
    probe = bool(args.get("linear_probe"))
    num_classes = checkpoint["model"]["head.1.weight" if probe else "head.weight"].shape[0]
    encoder = MAE_Encoder(image_size, args.get("patch_size", 2), args.get("emb_dim", 192),
                          args.get("encoder_depth", 12), args.get("encoder_heads", 3))
    model = ViT_Classifier(encoder, num_classes, probe_head=probe)
    utils.load_weights(model, checkpoint["model"], path)
    return model


def load_mae(path, image_size, trust):
    checkpoint = utils.load_checkpoint(path, trust, "mae", "--mae_model_path")
    args = checkpoint.get("args", {})
    model = MAE_ViT(image_size, args.get("patch_size", 2), args.get("emb_dim", 192), args.get("encoder_depth", 12),
                    args.get("encoder_heads", 3), args.get("decoder_depth", 4), args.get("decoder_heads", 3),
                    decoder_emb_dim=args.get("decoder_emb_dim"))
    utils.load_weights(model, checkpoint["model"], path)
    return model


@torch.no_grad()
def predict(model, images, batch_size=1000):
    model.eval()
    return torch.cat([model(normalize(images[i:i + batch_size])).argmax(-1)
                      for i in range(0, len(images), batch_size)])


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


@torch.no_grad()
def strategies_figure(model, images, strategies=MASK_STRATEGIES, ratios=(0.75,), seed=0):
    """For each (strategy, ratio): a masked row and a reconstruction row, labelled on the left; the originals last."""
    shuffle = model.encoder.shuffle
    rows, labels = [], []
    try:
        for strategy in strategies:
            for ratio in ratios:
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


def per_class_accuracy(labels, predictions, classes):
    lines = []
    for index, name in enumerate(classes):
        chosen = labels == index
        accuracy = (predictions[chosen] == index).float().mean().item() if chosen.any() else float("nan")
        lines.append(f"{name:>12s}  {accuracy * 100:6.2f} %  ({int(chosen.sum())} images)")
    overall = (predictions == labels).float().mean().item() * 100
    return "\n".join(lines + [f"{'all':>12s}  {overall:6.2f} %  ({len(labels)} images)"])


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default=None, help="a classifier checkpoint (from train_classifier.py)")
    p.add_argument("--mae_model_path", default=None, help="an MAE checkpoint: also draw the reconstructions")
    p.add_argument("--dataset", choices=["cifar10", "cifar100"], default="cifar10")
    p.add_argument("--data_dir", default=None, help="image folder with train/<class>/ and test/<class>/")
    p.add_argument("--num_images", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="predictions.png")
    p.add_argument("--reconstruction_output", default="reconstructions.png")
    p.add_argument("--mask_ratios", type=float, nargs="+", default=[0.75])
    p.add_argument("--device", default="auto")
    p.add_argument("--trust_checkpoint", action="store_true", help="allow a pickled whole-module checkpoint")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not args.model_path and not args.mae_model_path:
        raise utils.UserError("nothing to draw: pass --model_path (a classifier) and/or --mae_model_path")
    device = utils.setup_device(args.device).device
    _, test_set = load_dataset(args.dataset, args.data_dir)
    chosen = torch.randperm(len(test_set.labels), generator=torch.Generator().manual_seed(args.seed))
    chosen = chosen[: args.num_images]
    images = test_set.images.to(device)
    if args.model_path:
        model = load_classifier(args.model_path, images.shape[-1], args.trust_checkpoint).to(device)
        predictions = predict(model, images)
        print(per_class_accuracy(test_set.labels, predictions.cpu(), test_set.classes))
        prediction_figure(test_set.images[chosen], test_set.labels[chosen], predictions[chosen].cpu(),
                          test_set.classes).save(args.output)
        print(f"wrote {args.output}")
    if args.mae_model_path:
        mae = load_mae(args.mae_model_path, images.shape[-1], args.trust_checkpoint).to(device)
        strategies_figure(mae, normalize(images[chosen.to(device)][:16]), ratios=args.mask_ratios,
                          seed=args.seed).save(args.reconstruction_output)
        print(f"wrote {args.reconstruction_output}")


if __name__ == "__main__":
    utils.run_cli(main)
