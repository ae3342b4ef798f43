"""Export an encoder (from an MAE or a classifier checkpoint) as a timm VisionTransformer state dict, and print the
timm.create_model call it fits (an MAE's has no head: load_state_dict(..., strict=False)):

    python export_timm.py vit-t-mae.pt vit-t-mae-timm.pt"""
from pathlib import Path

import checkpoint as ckpt
import utils
from model import to_timm_state_dict


def timm_model_kwargs(config, num_classes=10):  # timm.create_model's arguments for a ModelConfig
    return dict(img_size=config.image_size, patch_size=config.patch_size, embed_dim=config.emb_dim,
                depth=config.encoder_depth, num_heads=config.encoder_heads, no_embed_class=True, qkv_bias=False,
                num_classes=num_classes)


def main(argv=None):
    parser = utils.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint", type=utils.path_text, help="from mae_pretrain.py or train_classifier.py")
    parser.add_argument("output", type=utils.path_text, help="where to write the timm state dict")
    parser.add_argument("--trust_checkpoint", action="store_true", help="allow a pickled whole-module checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    if Path(args.output).resolve() == Path(args.checkpoint).resolve():
        parser.error(f"argument output: {args.output} is the input checkpoint; writing there would replace it")
    utils.check_outputs(parser, {"output": args.output}, {"checkpoint": args.checkpoint}, overwrite=args.overwrite)
    checkpoint = ckpt.load_checkpoint(args.checkpoint, args.trust_checkpoint)
    if checkpoint["kind"] not in ("mae", "classifier"):
        raise utils.UserError(f"{args.checkpoint} holds neither an MAE nor a classifier")
    state = to_timm_state_dict(checkpoint["model"])
    ckpt.save_checkpoint(args.output, state)
    shape = timm_model_kwargs(checkpoint["config"], len(state["head.weight"]) if "head.weight" in state else 10)
    print(f"wrote {len(state)} tensors to {args.output}; load them into timm.create_model("
          f"'vit_tiny_patch16_224', {', '.join(f'{k}={v!r}' for k, v in shape.items())})")


if __name__ == "__main__":
    utils.run_cli(main)
