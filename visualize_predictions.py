"""Figures: test images with true and predicted labels, and MAE reconstructions under each masking strategy. Each
checkpoint brings its own architecture: no size flags are needed.

    python visualize_predictions.py --model_path vit-t-cls_from-vit-t-mae.pt --mae_model_path vit-t-mae.pt"""
import torch

import checkpoint as ckpt
import devices
import utils
from data import load_dataset, normalize
from figures import drawable_maskings, prediction_figure, strategies_figure


def load_model(path, kind, option, image_size, classes, trust):  # its model, checked against the data it will see
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


def parse_args(argv=None):  # every path checked before anything is loaded: inputs exist, figures go to new image files
    p = utils.ArgumentParser(description=__doc__)
    p.add_argument("--model_path", type=utils.path_text, help="a classifier checkpoint (from train_classifier.py)")
    p.add_argument("--mae_model_path", type=utils.path_text, help="an MAE checkpoint: also draw the reconstructions")
    p.add_argument("--dataset", choices=["cifar10", "cifar100"], default="cifar10")
    p.add_argument("--data_dir", type=utils.path_text, help="image folder with train/<class>/ and test/<class>/")
    p.add_argument("--num_images", type=utils.POSITIVE_INT, default=32)
    p.add_argument("--seed", type=utils.NONNEGATIVE_INT, default=0)
    p.add_argument("--output", type=utils.path_text, default="predictions.png")
    p.add_argument("--reconstruction_output", type=utils.path_text, default="reconstructions.png")
    p.add_argument("--overwrite", action="store_true", help="replace existing figure files")
    p.add_argument("--mask_ratios", type=utils.OPEN_UNIT, nargs="+", default=[0.75])
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, mps, cuda or cuda:N")
    p.add_argument("--trust_checkpoint", action="store_true", help="allow a pickled whole-module checkpoint")
    args = p.parse_args(argv)
    if not args.model_path and not args.mae_model_path:
        p.error("nothing to draw: pass --model_path (a classifier) and/or --mae_model_path")
    devices.check_device(p, args.device)
    inputs = {"--model_path": args.model_path, "--mae_model_path": args.mae_model_path}
    outputs = {"--output": args.output} if args.model_path else {}
    outputs.update({"--reconstruction_output": args.reconstruction_output} if args.mae_model_path else {})
    utils.check_outputs(p, outputs, inputs, args.data_dir, args.overwrite)
    for flag, path in outputs.items():
        utils.check_figure_file(p, flag, path)
    return args


@torch.no_grad()
def main(argv=None):
    args = parse_args(argv)
    device = devices.setup_device(args.device).device
    _, test_set = load_dataset(args.dataset, args.data_dir)
    size, classes = test_set.images.shape[-1], test_set.classes
    # Both checkpoints are loaded and checked against the data before anything is computed or written.
    if args.model_path:
        model = load_model(args.model_path, "classifier", "--model_path", size, classes, args.trust_checkpoint)
    if args.mae_model_path:
        mae = load_model(args.mae_model_path, "mae", "--mae_model_path", size, None, args.trust_checkpoint)
        drawable_maskings(mae, ratios=args.mask_ratios)
    chosen = torch.randperm(len(test_set.labels), generator=torch.Generator().manual_seed(args.seed))[:args.num_images]
    images = test_set.images.to(device)
    figures = {}
    if args.model_path:
        model.to(device).eval()
        predictions = torch.cat([model(normalize(batch)).argmax(-1) for batch in images.split(1000)]).cpu()
        labels = test_set.labels  # accuracy per class, then over all
        for name, members in [(name, labels == i) for i, name in enumerate(classes)] + [("all", labels == labels)]:
            accuracy = (predictions[members] == labels[members]).float().mean().item()
            print(f"{name:>12s}  {accuracy * 100:6.2f} %  ({int(members.sum())} images)")
        figures[args.output] = prediction_figure(test_set.images[chosen], labels[chosen], predictions[chosen], classes)
    if args.mae_model_path:
        figures[args.reconstruction_output] = strategies_figure(
            mae.to(device), normalize(images[chosen.to(device)][:16]), ratios=args.mask_ratios, seed=args.seed)
    for path, figure in figures.items():  # written once both are drawn
        utils.atomic_write(path, figure.save, "figure")
        print(f"wrote {path}")


if __name__ == "__main__":
    utils.run_cli(main)
