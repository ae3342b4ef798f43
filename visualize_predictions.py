"""Figures: test images with true and predicted labels, and MAE reconstructions under each masking strategy.

    python visualize_predictions.py --model_path vit-t-cls_from-vit-t-mae.pt --output predictions.png
    python visualize_predictions.py --model_path ... --mae_model_path vit-t-mae.pt   # + reconstructions.png

Each checkpoint brings its own architecture: no size flags are needed.
"""
from pathlib import Path

import torch

import checkpoint as ckpt
import utils
from data import load_dataset, normalize
from figures import drawable_maskings, prediction_figure, strategies_figure


def load_model(path, kind, option, image_size, classes, trust):
    """The model a checkpoint holds, checked against the data it is about to be shown."""
    checkpoint = ckpt.load_checkpoint(path, trust, kind, option)
    if kind == "classifier":
        ckpt.check_classes(checkpoint, classes, path)
    config = checkpoint["config"]
    if config.image_size != image_size:
        raise utils.UserError(f"{path} was trained on {config.image_size} x {config.image_size} images; this data "
                              f"set's are {image_size} x {image_size}")
    if kind == "classifier" and config.num_classes != len(classes):
        raise utils.UserError(f"{path} predicts {config.num_classes} classes; this data set has {len(classes)}")
    return ckpt.build_model(checkpoint, path)


@torch.no_grad()
def predict(model, images, batch_size=1000):
    model.eval()
    return torch.cat([model(normalize(images[i:i + batch_size])).argmax(-1)
                      for i in range(0, len(images), batch_size)])


def per_class_accuracy(labels, predictions, classes):
    lines = []
    for index, name in enumerate(classes):
        chosen = labels == index
        accuracy = (predictions[chosen] == index).float().mean().item() if chosen.any() else float("nan")
        lines.append(f"{name:>12s}  {accuracy * 100:6.2f} %  ({int(chosen.sum())} images)")
    overall = (predictions == labels).float().mean().item() * 100
    return "\n".join(lines + [f"{'all':>12s}  {overall:6.2f} %  ({len(labels)} images)"])


def build_parser():
    p = utils.ArgumentParser(description=__doc__)
    p.add_argument("--model_path", type=utils.path_text, default=None,
                   help="a classifier checkpoint (from train_classifier.py)")
    p.add_argument("--mae_model_path", type=utils.path_text, default=None,
                   help="an MAE checkpoint: also draw the reconstructions")
    p.add_argument("--dataset", choices=["cifar10", "cifar100"], default="cifar10")
    p.add_argument("--data_dir", type=utils.path_text, default=None,
                   help="image folder with train/<class>/ and test/<class>/")
    p.add_argument("--num_images", type=utils.POSITIVE_INT, default=32)
    p.add_argument("--seed", type=utils.NONNEGATIVE_INT, default=0)
    p.add_argument("--output", type=utils.path_text, default="predictions.png")
    p.add_argument("--reconstruction_output", type=utils.path_text, default="reconstructions.png")
    p.add_argument("--overwrite", action="store_true", help="replace existing figure files")
    p.add_argument("--mask_ratios", type=utils.OPEN_UNIT, nargs="+", default=[0.75])
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, mps, cuda or cuda:N")
    p.add_argument("--trust_checkpoint", action="store_true", help="allow a pickled whole-module checkpoint")
    return p


def parse_args(argv=None):
    """Parse and check every path before anything is loaded: inputs exist, figures go to new image files."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.model_path and not args.mae_model_path:
        parser.error("nothing to draw: pass --model_path (a classifier) and/or --mae_model_path")
    utils.check_device(parser, args.device)
    inputs = {"--model_path": args.model_path, "--mae_model_path": args.mae_model_path}
    for flag, path in inputs.items():
        if path and not Path(path).is_file():
            parser.error(f"argument {flag}: {path} is not a checkpoint file")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        parser.error(f"argument --data_dir: {args.data_dir} is not a folder")
    outputs = {"--output": args.output} if args.model_path else {}
    outputs.update({"--reconstruction_output": args.reconstruction_output} if args.mae_model_path else {})
    utils.check_outputs(parser, outputs, inputs, args.data_dir)
    for flag, path in outputs.items():
        utils.check_figure_file(parser, flag, path, args.overwrite)
    return args


def save(figure, path):
    utils.atomic_write(path, figure.save, "figure")
    print(f"wrote {path}")


def main(argv=None):
    args = parse_args(argv)
    device = utils.setup_device(args.device).device
    _, test_set = load_dataset(args.dataset, args.data_dir)
    size, classes = test_set.images.shape[-1], test_set.classes
    # Both checkpoints are loaded and checked against the data before anything is computed or written.
    model = mae = None
    if args.model_path:
        model = load_model(args.model_path, "classifier", "--model_path", size, classes,
                           args.trust_checkpoint).to(device)
    if args.mae_model_path:
        mae = load_model(args.mae_model_path, "mae", "--mae_model_path", size, None, args.trust_checkpoint).to(device)
        drawable_maskings(mae, ratios=args.mask_ratios)
    chosen = torch.randperm(len(test_set.labels), generator=torch.Generator().manual_seed(args.seed))
    chosen = chosen[: args.num_images]
    images = test_set.images.to(device)
    if model is not None:
        predictions = predict(model, images)
        print(per_class_accuracy(test_set.labels, predictions.cpu(), classes))
        save(prediction_figure(test_set.images[chosen], test_set.labels[chosen], predictions[chosen].cpu(), classes),
             args.output)
    if mae is not None:
        save(strategies_figure(mae, normalize(images[chosen.to(device)][:16]), ratios=args.mask_ratios,
                               seed=args.seed), args.reconstruction_output)


if __name__ == "__main__":
    utils.run_cli(main)
