"""PatchShuffle (four masking strategies), MAE_Encoder / Decoder, MAE_ViT, ViT_Classifier: the reference's
(IcarusWizard/MAE) parameters and sequence-first (T, B, C) interfaces; inside, batch-first (B, T, C) as timm's."""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from einops import rearrange
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block

from data import random_rectangles

MASK_STRATEGIES = ("random", "block", "grid", "blockwise")


@dataclass
class ModelConfig:  # the architecture, saved in every checkpoint; the defaults are the reference's ViT-T/2 on 32 x 32
    image_size: int = 32
    patch_size: int = 2
    emb_dim: int = 192
    encoder_depth: int = 12
    encoder_heads: int = 3
    decoder_depth: int = 4
    decoder_heads: int = 3
    decoder_emb_dim: int = None  # None: the encoder's width, as in the reference
    mask_ratio: float = 0.75
    mask_strategy: str = "random"
    num_classes: int = 10
    probe_head: bool = False  # BatchNorm + linear (the linear probe) instead of a linear head

    ENCODER_FIELDS = ("image_size", "patch_size", "emb_dim", "encoder_depth", "encoder_heads")
    to_dict = asdict

    @classmethod
    def from_dict(cls, values):  # unknown keys (a newer version's) are ignored
        return cls(**{k: v for k, v in values.items() if k in cls.__dataclass_fields__})


def build_mae(c: ModelConfig):
    return MAE_ViT(c.image_size, c.patch_size, c.emb_dim, c.encoder_depth, c.encoder_heads,
                   decoder_layer=c.decoder_depth, decoder_head=c.decoder_heads, mask_ratio=c.mask_ratio,
                   mask_strategy=c.mask_strategy, decoder_emb_dim=c.decoder_emb_dim)


def build_classifier(c: ModelConfig, drop_path_rate=0.0):
    return ViT_Classifier(MAE_Encoder(c.image_size, c.patch_size, c.emb_dim, c.encoder_depth, c.encoder_heads,
                                      drop_path_rate=drop_path_rate), c.num_classes, probe_head=c.probe_head)


def take_indexes(sequences, indexes, dim=0):  # (T, B, C), (T', B) -> (T', B, C); with dim=1 the same batch-first
    return torch.gather(sequences, dim, indexes.unsqueeze(-1).expand(-1, -1, sequences.shape[-1]))


def near_square_shape(keep, rows, cols):  # (r, c) nearest a square, r * c == keep, r <= rows, c <= cols; or None
    shapes = [(d, keep // d) for r in range(math.isqrt(keep), 0, -1) if keep % r == 0 for d in (r, keep // r)]
    return next(((r, c) for r, c in shapes if r <= rows and c <= cols), None)


class PatchShuffle(nn.Module):
    """Chooses exactly ``int(T * (1 - ratio))`` visible patches per image. random: uniform (the paper); block: one
    (near-)square at a random place; grid: a lattice with a random phase; blockwise: BEiT's masked rectangles."""

    def __init__(self, ratio, strategy="random"):
        super().__init__()
        if not 0 < ratio < 1:
            raise ValueError(f"mask ratio must lie strictly between 0 and 1, got {ratio}")
        if strategy not in MASK_STRATEGIES:
            raise ValueError(f"unknown mask strategy {strategy!r}; choose one of {', '.join(MASK_STRATEGIES)}")
        self.ratio, self.strategy = ratio, strategy

    def num_visible(self, num_patches):
        return int(num_patches * (1 - self.ratio))

    def check(self, num_patches):  # a ValueError if this cannot mask ``num_patches``; else the block/grid shape
        side, keep = math.isqrt(num_patches), self.num_visible(num_patches)
        if keep < 1:
            raise ValueError(f"mask ratio {self.ratio} leaves no visible patch out of {num_patches}")
        if self.strategy != "random" and side * side != num_patches:
            raise ValueError(f"{self.strategy} masking needs a square patch grid, got {num_patches} patches")
        shape = near_square_shape(keep, side, side)
        if self.strategy in ("block", "grid") and shape is None:
            raise ValueError(f"{self.strategy} masking cannot keep {keep} of {num_patches} patches (mask ratio "
                             f"{self.ratio}): {keep} has no factorisation r x c with r, c <= {side}; try another ratio")
        return shape

    def visible_mask(self, batch_size, num_patches, device):  # (B, T) bool, True where a patch stays visible
        shape = self.check(num_patches)
        if self.strategy == "random":
            rank = torch.rand(batch_size, num_patches, device=device).argsort(dim=1).argsort(dim=1)
            return rank < self.num_visible(num_patches)
        side = math.isqrt(num_patches)
        if self.strategy == "blockwise":
            # BEiT's: a patch ranks by the first of K = 16 random rectangles (aspect 0.3 to 1 / 0.3) that covers it
            # (random tie-break); the lowest ranks are masked (the last rectangle trimmed, random patches top up).
            masked, rectangles = num_patches - self.num_visible(num_patches), 16
            min_area = max(1, min(masked, round(num_patches * 16 / 196)))  # BEiT: 16 patches of a 14 x 14 grid
            area = torch.empty(batch_size, rectangles, device=device).uniform_(min_area, masked)
            log_aspect = torch.empty(batch_size, rectangles, device=device).uniform_(math.log(0.3), -math.log(0.3))
            inside = random_rectangles(area, log_aspect, side, side).flatten(2)  # (B, K, T)
            order = torch.arange(rectangles, device=device).view(1, -1, 1)
            first_cover = torch.where(inside, order, rectangles).amin(dim=1).float()  # (B, T); K: never covered
            rank = (first_cover + torch.rand(batch_size, num_patches, device=device)).argsort(dim=1).argsort(dim=1)
            return rank >= masked
        # block: contiguous rows and columns; grid: the widest stride that still fits r rows and c columns
        steps = [(n, 1 if self.strategy == "block" else side // n) for n in shape]  # (r, row step), (c, column step)
        rows, cols = (torch.randint(0, side - (n - 1) * step, (batch_size, 1), device=device)  # (B, r), (B, c)
                      + step * torch.arange(n, device=device) for n, step in steps)
        visible_ids = (rows[:, :, None] * side + cols[:, None, :]).flatten(1)  # (B, r * c)
        return torch.zeros(batch_size, num_patches, dtype=torch.bool, device=device).scatter_(1, visible_ids, True)

    def indexes(self, batch_size, num_patches, device):  # forward, backward (B, T): visible patches first, raster order
        forward_indexes = (~self.visible_mask(batch_size, num_patches, device)).byte().argsort(dim=1, stable=True)
        return forward_indexes, forward_indexes.argsort(dim=1)

    def forward(self, patches):  # (T, B, C) -> visible (keep, B, C), forward_indexes, backward_indexes (T, B)
        T, B, _ = patches.shape
        forward_indexes, backward_indexes = (i.T for i in self.indexes(B, T, patches.device))
        return take_indexes(patches, forward_indexes[: self.num_visible(T)]), forward_indexes, backward_indexes


def transformer_blocks(dim, depth, heads, drop_path_rate=0.0):  # timm Blocks without qkv bias (the reference's)
    if dim % heads:
        raise ValueError(f"embedding width {dim} is not divisible by {heads} attention heads")
    rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
    return nn.Sequential(*[Block(dim, heads, 4.0, False, drop_path=rate) for rate in rates])


def count_patches(image_size, patch_size):
    if image_size % patch_size != 0:
        raise ValueError(f"image size {image_size} is not divisible by patch size {patch_size}")
    return (image_size // patch_size) ** 2


class ViTBackbone(nn.Module):  # MAE_Encoder's and ViT_Classifier's (they own its modules: embeddings, blocks, norm)
    def embed(self, img):  # (B, 3, H, W) -> (B, T, C); pos_embedding (T, 1, C) transposed to (1, T, C)
        return self.patchify(img).flatten(2).transpose(1, 2) + self.pos_embedding.transpose(0, 1)

    def encode(self, tokens):  # (B, t, C) -> (B, 1 + t, C), the cls token first
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        return self.layer_norm(self.transformer(torch.cat([cls, tokens], dim=1)))

    def forward_features(self, img):  # all patches, no masking: (B, 1 + T, C)
        return self.encode(self.embed(img))


class MAE_Encoder(ViTBackbone):
    def __init__(self, image_size=32, patch_size=2, emb_dim=192, num_layer=12, num_head=3, mask_ratio=0.75,
                 mask_strategy="random", drop_path_rate=0.0):
        super().__init__()
        num_patches = count_patches(image_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, emb_dim))
        self.pos_embedding = nn.Parameter(torch.zeros(num_patches, 1, emb_dim))
        self.shuffle = PatchShuffle(mask_ratio, mask_strategy)
        self.shuffle.check(num_patches)
        self.patchify = nn.Conv2d(3, emb_dim, patch_size, patch_size)
        self.transformer = transformer_blocks(emb_dim, num_layer, num_head, drop_path_rate)
        self.layer_norm = nn.LayerNorm(emb_dim)
        trunc_normal_(self.cls_token, std=0.02)
        trunc_normal_(self.pos_embedding, std=0.02)

    def forward(self, img):  # img -> features (1 + keep, B, C), backward_indexes (T, B), as the reference returns them
        tokens = self.embed(img)  # (B, T, C)
        forward_indexes, backward_indexes = self.shuffle.indexes(*tokens.shape[:2], img.device)
        features = self.encode(take_indexes(tokens, forward_indexes[:, : self.shuffle.num_visible(tokens.shape[1])], 1))
        return features.transpose(0, 1), backward_indexes.T


class MAE_Decoder(nn.Module):
    def __init__(self, image_size=32, patch_size=2, emb_dim=192, num_layer=4, num_head=3, encoder_emb_dim=None):
        super().__init__()
        num_patches = count_patches(image_size, patch_size)
        # The reference decoder shares the encoder's width and has no projection; a narrower one needs one.
        self.embed = nn.Identity() if encoder_emb_dim in (None, emb_dim) else nn.Linear(encoder_emb_dim, emb_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, emb_dim))
        self.pos_embedding = nn.Parameter(torch.zeros(num_patches + 1, 1, emb_dim))
        self.transformer = transformer_blocks(emb_dim, num_layer, num_head)
        self.head = nn.Linear(emb_dim, 3 * patch_size ** 2)
        self.patch_size, self.grid = patch_size, image_size // patch_size
        trunc_normal_(self.mask_token, std=0.02)
        trunc_normal_(self.pos_embedding, std=0.02)

    def forward(self, features, backward_indexes):  # (1 + keep, B, C_enc), (T, B) -> image, mask (B, 3, H, W)
        features, backward_indexes = self.embed(features.transpose(0, 1)), backward_indexes.T  # batch-first
        (B, T), keep = backward_indexes.shape, features.shape[1] - 1
        shuffled = torch.cat([features[:, 1:], self.mask_token.expand(B, T - keep, -1)], dim=1)  # visible first
        unshuffled = take_indexes(shuffled, backward_indexes, 1)
        tokens = torch.cat([features[:, :1], unshuffled], dim=1) + self.pos_embedding.transpose(0, 1)  # (T + 1, 1, C)
        patches = self.head(self.transformer(tokens)[:, 1:])  # without the cls token: (B, T, 3 * p * p)
        # float32 whatever the autocast dtype: bf16 would count 48,960 masked patches as 48,896 in the loss.
        masked = (backward_indexes >= keep).float()
        to_image = lambda x: rearrange(x, "b (h w) (c p1 p2) -> b c (h p1) (w p2)", h=self.grid, p1=self.patch_size,
                                       p2=self.patch_size)
        return to_image(patches), to_image(masked[..., None].expand_as(patches))


class MAE_ViT(nn.Module):
    def __init__(self, image_size=32, patch_size=2, emb_dim=192, encoder_layer=12, encoder_head=3, decoder_layer=4,
                 decoder_head=3, mask_ratio=0.75, mask_strategy="random", decoder_emb_dim=None):
        super().__init__()
        self.encoder = MAE_Encoder(image_size, patch_size, emb_dim, encoder_layer, encoder_head,
                                   mask_ratio=mask_ratio, mask_strategy=mask_strategy)
        self.decoder = MAE_Decoder(image_size, patch_size, decoder_emb_dim or emb_dim, decoder_layer, decoder_head,
                                   encoder_emb_dim=emb_dim)

    def forward(self, img):  # img (B, 3, H, W) -> predicted_img, mask (B, 3, H, W) with 1 on masked pixels
        return self.decoder(*self.encoder(img))


def mae_loss(predicted_img, img, mask, patch_size, norm_pix_loss=False):  # masked patches' MSE (norm_pix: the paper's)
    to_patches = lambda x: rearrange(x, "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=patch_size, p2=patch_size)
    pred, target, patch_mask = to_patches(predicted_img), to_patches(img), to_patches(mask)[..., 0].float()
    if norm_pix_loss:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = ((pred.float() - target.float()) ** 2).mean(dim=-1)
    return (per_patch * patch_mask).sum() / patch_mask.sum()  # counts in float32 (exact to 2^24), not in bf16/fp16


def encoder_state_dict(state_dict):  # MAE_Encoder's weights from an MAE_ViT or a ViT_Classifier state dict
    if any(k.startswith("encoder.") for k in state_dict):
        return {k[len("encoder."):]: v for k, v in state_dict.items() if k.startswith("encoder.")}
    return {k: v for k, v in state_dict.items() if not k.startswith("head.")}


class ViT_Classifier(ViTBackbone):  # unmasked encoder, a linear head on the cls token (``probe_head``: BatchNorm first)
    def __init__(self, encoder: MAE_Encoder, num_classes=10, probe_head=False):
        super().__init__()
        self.cls_token, self.pos_embedding, self.patchify = encoder.cls_token, encoder.pos_embedding, encoder.patchify
        self.transformer, self.layer_norm = encoder.transformer, encoder.layer_norm
        dim = self.pos_embedding.shape[-1]
        linear = nn.Linear(dim, num_classes)
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False), linear) if probe_head else linear

    def forward(self, img):
        return self.head(self.forward_features(img)[:, 0])

    def no_weight_decay(self):  # for timm's optimizer helpers
        return {"cls_token", "pos_embedding"}

    def group_matcher(self, coarse=False):  # timm's layer-wise lr decay: embeddings layer 0, block i layer i + 1
        return {"stem": r"^cls_token|^pos_embedding|^patchify",
                "blocks": [(r"^transformer\.(\d+)", None), (r"^layer_norm", (99999,))]}


def to_timm_state_dict(state_dict):  # for timm's VisionTransformer(no_embed_class=True, qkv_bias=False), head kept
    renames = {"patchify": "patch_embed.proj", "transformer": "blocks", "layer_norm": "norm",
               "pos_embedding": "pos_embed"}
    converted = {}
    for name, value in encoder_state_dict(state_dict).items():
        first, dot, rest = name.partition(".")
        converted[renames.get(first, first) + dot + rest] = value.transpose(0, 1) if first == "pos_embedding" else value
    return {**converted, **{k: v for k, v in state_dict.items() if k in ("head.weight", "head.bias")}}
