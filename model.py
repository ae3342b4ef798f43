"""The networks: strategy-aware PatchShuffle, MAE encoder / decoder, MAE_ViT and ViT_Classifier.

Parameter names and shapes follow the reference implementation (IcarusWizard/MAE), so its weights load:
``encoder.cls_token`` (1, 1, C), ``encoder.pos_embedding`` (T, 1, C), ``encoder.patchify`` (a conv),
``encoder.transformer.{i}`` (timm ``Block``s), ``encoder.layer_norm``, ``decoder.mask_token``,
``decoder.pos_embedding`` (T + 1, 1, C), ``decoder.transformer``, ``decoder.head``.
The public interfaces keep the reference's sequence-first (T, B, C) layout; inside, the networks run
batch-first (B, T, C), which is what timm's blocks and fused attention want.
"""
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
from einops import rearrange
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block

MASK_STRATEGIES = ("random", "block", "grid", "blockwise")


@dataclass
class ModelConfig:
    """The architecture, saved in every checkpoint under ``config``: enough to rebuild the model exactly.

    The defaults are the reference's ViT-T/2 for 32 x 32 images. An MAE uses every field but ``num_classes`` and
    ``probe_head``; a classifier uses the encoder's fields plus those two.
    """
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

    @classmethod
    def from_dict(cls, values):
        """From a checkpoint's plain dict; unknown keys (a newer version's) are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_dict(self):
        return asdict(self)


def build_mae(config: ModelConfig):
    return MAE_ViT(config.image_size, config.patch_size, config.emb_dim, config.encoder_depth,
                   config.encoder_heads, config.decoder_depth, config.decoder_heads, config.mask_ratio,
                   config.mask_strategy, config.decoder_emb_dim)


def build_classifier(config: ModelConfig, drop_path_rate=0.0):
    encoder = MAE_Encoder(config.image_size, config.patch_size, config.emb_dim, config.encoder_depth,
                          config.encoder_heads, drop_path_rate=drop_path_rate)
    return ViT_Classifier(encoder, config.num_classes, probe_head=config.probe_head)


def take_indexes(sequences, indexes):
    """Gather along the sequence dimension: sequences (T, B, C), indexes (T', B) -> (T', B, C)."""
    return torch.gather(sequences, 0, indexes.unsqueeze(-1).expand(-1, -1, sequences.shape[-1]))


def near_square_shape(keep, rows, cols):
    """The (r, c) with r * c == keep, r <= rows, c <= cols, closest to a square; None if there is none."""
    for r in range(math.isqrt(keep), 0, -1):
        if keep % r == 0:
            for rr, cc in ((r, keep // r), (keep // r, r)):
                if rr <= rows and cc <= cols:
                    return rr, cc
    return None


class PatchShuffle(nn.Module):
    """Chooses which patches the encoder sees.

    Every strategy keeps exactly ``int(T * (1 - ratio))`` patches so that a batch stays one dense tensor.
    ``random`` is the paper's uniform sampling without replacement; ``block`` keeps one contiguous (near-)square
    at a random place; ``grid`` keeps a regular lattice (every second row and column at ratio 0.75) with a random
    phase; ``blockwise`` is BEiT's block-wise masking, the MAE paper's own "block" ablation: masked rectangles of
    random area and aspect ratio until the ratio is reached. Masks are built on the patches' device with tensor
    ops: no Python loop over samples.
    """

    def __init__(self, ratio, strategy="random"):
        super().__init__()
        if not 0 < ratio < 1:
            raise ValueError(f"mask ratio must lie strictly between 0 and 1, got {ratio}")
        if strategy not in MASK_STRATEGIES:
            raise ValueError(f"unknown mask strategy {strategy!r}; choose one of {', '.join(MASK_STRATEGIES)}")
        self.ratio = ratio
        self.strategy = strategy

    def num_visible(self, num_patches):
        return int(num_patches * (1 - self.ratio))

    def check(self, num_patches):
        """Raise a clear ValueError if this strategy cannot mask ``num_patches`` patches at this ratio."""
        side = math.isqrt(num_patches)
        keep = self.num_visible(num_patches)
        if keep < 1:
            raise ValueError(f"mask ratio {self.ratio} leaves no visible patch out of {num_patches}")
        if self.strategy != "random" and side * side != num_patches:
            raise ValueError(f"{self.strategy} masking needs a square patch grid, got {num_patches} patches")
        if self.strategy in ("block", "grid") and self._rectangle(num_patches) is None:
            raise ValueError(
                f"{self.strategy} masking cannot keep {keep} of {num_patches} patches (mask ratio "
                f"{self.ratio}): {keep} has no factorisation r x c with r, c <= {side}; try another ratio")

    def _rectangle(self, num_patches):
        side = math.isqrt(num_patches)
        return near_square_shape(self.num_visible(num_patches), side, side)

    def visible_mask(self, batch_size, num_patches, device):
        """(B, T) bool, True where a patch stays visible; exactly ``num_visible`` per row."""
        self.check(num_patches)
        if self.strategy == "random":
            noise = torch.rand(batch_size, num_patches, device=device)
            rank = noise.argsort(dim=1).argsort(dim=1)
            return rank < self.num_visible(num_patches)
        if self.strategy == "blockwise":
            return self._blockwise_visible(batch_size, num_patches, device)
        side = math.isqrt(num_patches)
        r, c = self._rectangle(num_patches)
        if self.strategy == "block":
            # Contiguous rows/cols starting at a random offset: stride 1.
            row_step, col_step = 1, 1
        else:
            # A lattice spread over the whole image: the widest stride that still fits r rows and c columns.
            row_step, col_step = side // r, side // c
        row_span, col_span = (r - 1) * row_step + 1, (c - 1) * col_step + 1
        top = torch.randint(0, side - row_span + 1, (batch_size, 1), device=device)
        left = torch.randint(0, side - col_span + 1, (batch_size, 1), device=device)
        rows = top + row_step * torch.arange(r, device=device)  # (B, r)
        cols = left + col_step * torch.arange(c, device=device)  # (B, c)
        visible_ids = (rows[:, :, None] * side + cols[:, None, :]).flatten(1)  # (B, r * c)
        mask = torch.zeros(batch_size, num_patches, dtype=torch.bool, device=device)
        return mask.scatter_(1, visible_ids, True)

    def _blockwise_visible(self, batch_size, num_patches, device, rectangles=16, min_aspect=0.3):
        """BEiT's block-wise masking, vectorised: ``rectangles`` masked rectangles per image, drawn in order.

        Each rectangle has a random area in [min_area, masked count] and aspect ratio in [0.3, 1 / 0.3] (log-
        uniform), at a random place. A patch's rank is the first rectangle that covers it (plus a random tie-
        break); the ``T - keep`` lowest ranks are masked. So whole rectangles are added until the ratio is
        reached, the last one is trimmed, and if the rectangles fall short, random patches top the count up.
        """
        side = math.isqrt(num_patches)
        masked = num_patches - self.num_visible(num_patches)
        min_area = max(1, min(masked, round(num_patches * 16 / 196)))  # BEiT: 16 patches of a 14 x 14 grid
        shape = (batch_size, rectangles)
        area = torch.empty(shape, device=device).uniform_(min_area, masked)
        log_aspect = torch.empty(shape, device=device).uniform_(math.log(min_aspect), -math.log(min_aspect))
        h = (area * log_aspect.exp()).sqrt().round().clamp(1, side).long()
        w = (area / log_aspect.exp()).sqrt().round().clamp(1, side).long()
        top = (torch.rand(shape, device=device) * (side - h + 1)).long()
        left = (torch.rand(shape, device=device) * (side - w + 1)).long()
        r = torch.arange(side, device=device).view(1, 1, side, 1)
        c = torch.arange(side, device=device).view(1, 1, 1, side)
        inside = ((r >= top[..., None, None]) & (r < (top + h)[..., None, None])
                  & (c >= left[..., None, None]) & (c < (left + w)[..., None, None])).flatten(2)  # (B, K, T)
        order = torch.arange(rectangles, device=device).view(1, -1, 1)
        first_cover = torch.where(inside, order, rectangles).amin(dim=1).float()  # (B, T); K: never covered
        rank = (first_cover + torch.rand(batch_size, num_patches, device=device)).argsort(dim=1).argsort(dim=1)
        return rank >= masked

    def indexes(self, batch_size, num_patches, device):
        """forward_indexes, backward_indexes, both (B, T): visible patches first, then the masked ones."""
        visible = self.visible_mask(batch_size, num_patches, device)
        # A stable sort on "is masked" puts the visible patches first, in raster order.
        forward_indexes = (~visible).to(torch.uint8).argsort(dim=1, stable=True)
        backward_indexes = forward_indexes.argsort(dim=1)
        return forward_indexes, backward_indexes

    def forward(self, patches):
        """patches (T, B, C) -> visible (keep, B, C), forward_indexes (T, B), backward_indexes (T, B)."""
        T, B, _ = patches.shape
        forward_indexes, backward_indexes = self.indexes(B, T, patches.device)
        forward_indexes, backward_indexes = forward_indexes.T, backward_indexes.T
        visible = take_indexes(patches, forward_indexes[: self.num_visible(T)])
        return visible, forward_indexes, backward_indexes


def transformer_blocks(dim, depth, heads, drop_path_rate=0.0):
    """A stack of timm Blocks; drop path grows linearly with depth (as in DeiT / MAE fine-tuning)."""
    if dim % heads:
        raise ValueError(f"embedding width {dim} is not divisible by {heads} attention heads")
    rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
    return nn.Sequential(*[Block(dim, heads, 4.0, False, drop_path=rate) for rate in rates])


def check_image_size(image_size, patch_size):
    if image_size % patch_size != 0:
        raise ValueError(f"image size {image_size} is not divisible by patch size {patch_size}")


class ViTBackbone(nn.Module):
    """What MAE_Encoder and ViT_Classifier share: patch embedding and the transformer over the tokens.

    Subclasses own ``patchify``, ``pos_embedding``, ``cls_token``, ``transformer`` and ``layer_norm``.
    """

    def embed(self, img):
        """img (B, 3, H, W) -> patch tokens with positions (B, T, C)."""
        patches = self.patchify(img).flatten(2).transpose(1, 2)
        return patches + self.pos_embedding.view(1, *self.pos_embedding.shape[::2])  # (T, 1, C) -> (1, T, C)

    def encode(self, tokens):
        """Prepend the cls token and run the transformer: (B, t, C) -> (B, 1 + t, C)."""
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        return self.layer_norm(self.transformer(torch.cat([cls, tokens], dim=1)))

    def forward_features(self, img):
        """All patches, no masking (fine-tuning, probing, kNN): (B, 1 + T, C)."""
        return self.encode(self.embed(img))


class MAE_Encoder(ViTBackbone):
    def __init__(self, image_size=32, patch_size=2, emb_dim=192, num_layer=12, num_head=3, mask_ratio=0.75,
                 mask_strategy="random", drop_path_rate=0.0):
        super().__init__()
        check_image_size(image_size, patch_size)
        num_patches = (image_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, emb_dim))
        self.pos_embedding = nn.Parameter(torch.zeros(num_patches, 1, emb_dim))
        self.shuffle = PatchShuffle(mask_ratio, mask_strategy)
        self.shuffle.check(num_patches)
        self.patchify = nn.Conv2d(3, emb_dim, patch_size, patch_size)
        self.transformer = transformer_blocks(emb_dim, num_layer, num_head, drop_path_rate)
        self.layer_norm = nn.LayerNorm(emb_dim)
        trunc_normal_(self.cls_token, std=0.02)
        trunc_normal_(self.pos_embedding, std=0.02)

    def forward(self, img):
        """img -> features (1 + keep, B, C) and backward_indexes (T, B), as the reference returns them."""
        tokens = self.embed(img)
        B, T, C = tokens.shape
        forward_indexes, backward_indexes = self.shuffle.indexes(B, T, img.device)
        keep = forward_indexes[:, : self.shuffle.num_visible(T)]
        visible = torch.gather(tokens, 1, keep.unsqueeze(-1).expand(-1, -1, C))
        features = self.encode(visible)
        return features.transpose(0, 1), backward_indexes.T


class MAE_Decoder(nn.Module):
    def __init__(self, image_size=32, patch_size=2, emb_dim=192, num_layer=4, num_head=3, encoder_emb_dim=None):
        super().__init__()
        check_image_size(image_size, patch_size)
        num_patches = (image_size // patch_size) ** 2
        encoder_emb_dim = encoder_emb_dim or emb_dim
        # The reference decoder shares the encoder's width and has no projection; a narrower one needs one.
        self.embed = nn.Identity() if encoder_emb_dim == emb_dim else nn.Linear(encoder_emb_dim, emb_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, emb_dim))
        self.pos_embedding = nn.Parameter(torch.zeros(num_patches + 1, 1, emb_dim))
        self.transformer = transformer_blocks(emb_dim, num_layer, num_head)
        self.head = nn.Linear(emb_dim, 3 * patch_size ** 2)
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        trunc_normal_(self.mask_token, std=0.02)
        trunc_normal_(self.pos_embedding, std=0.02)

    def forward(self, features, backward_indexes):
        """features (1 + keep, B, C_enc), backward_indexes (T, B) -> image (B, 3, H, W), mask (B, 3, H, W)."""
        features = self.embed(features.transpose(0, 1))  # (B, 1 + keep, C)
        backward_indexes = backward_indexes.T  # (B, T)
        B, T = backward_indexes.shape
        keep = features.shape[1] - 1
        mask_tokens = self.mask_token.expand(B, T - keep, -1)
        shuffled = torch.cat([features[:, 1:], mask_tokens], dim=1)  # visible first, as the encoder ordered them
        unshuffled = torch.gather(shuffled, 1, backward_indexes.unsqueeze(-1).expand(-1, -1, shuffled.shape[-1]))
        positions = self.pos_embedding.view(1, *self.pos_embedding.shape[::2])  # (T + 1, 1, C) -> (1, T + 1, C)
        tokens = torch.cat([features[:, :1], unshuffled], dim=1) + positions
        patches = self.head(self.transformer(tokens)[:, 1:])  # drop the cls token: (B, T, 3 * p * p)
        # A patch is masked if it came after the visible ones. float32 whatever the autocast dtype: bf16 would count
        # 48,960 masked patches as 48,896 in the loss's denominator.
        masked = (backward_indexes >= keep).float()
        return self.patches_to_image(patches), self.patches_to_image(masked[..., None].expand_as(patches))

    def patches_to_image(self, patches):
        p = self.patch_size
        return rearrange(patches, "b (h w) (c p1 p2) -> b c (h p1) (w p2)", h=self.grid, p1=p, p2=p)


class MAE_ViT(nn.Module):
    def __init__(self, image_size=32, patch_size=2, emb_dim=192, encoder_layer=12, encoder_head=3, decoder_layer=4,
                 decoder_head=3, mask_ratio=0.75, mask_strategy="random", decoder_emb_dim=None):
        super().__init__()
        self.encoder = MAE_Encoder(image_size, patch_size, emb_dim, encoder_layer, encoder_head, mask_ratio,
                                   mask_strategy)
        self.decoder = MAE_Decoder(image_size, patch_size, decoder_emb_dim or emb_dim, decoder_layer, decoder_head,
                                   encoder_emb_dim=emb_dim)

    def forward(self, img):
        """img (B, 3, H, W) -> predicted_img (B, 3, H, W), mask (B, 3, H, W) with 1 on masked pixels."""
        features, backward_indexes = self.encoder(img)
        return self.decoder(features, backward_indexes)


def mae_loss(predicted_img, img, mask, patch_size, norm_pix_loss=False):
    """Mean squared error over the masked patches only.

    With ``norm_pix_loss`` each target patch is normalised by its own mean and variance (the paper's option).
    """
    to_patches = lambda x: rearrange(x, "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=patch_size, p2=patch_size)
    pred, target, patch_mask = to_patches(predicted_img), to_patches(img), to_patches(mask)[..., 0]
    if norm_pix_loss:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = ((pred.float() - target.float()) ** 2).mean(dim=-1)
    patch_mask = patch_mask.float()  # counts in float32 (exact to 2^24), never in the autocast dtype
    return (per_patch * patch_mask).sum() / patch_mask.sum()


def encoder_state_dict(state_dict):
    """The encoder's weights (keys as in MAE_Encoder) from an MAE_ViT or a ViT_Classifier state dict."""
    if any(k.startswith("encoder.") for k in state_dict):
        return {k[len("encoder."):]: v for k, v in state_dict.items() if k.startswith("encoder.")}
    return {k: v for k, v in state_dict.items() if not k.startswith("head.")}


class ViT_Classifier(ViTBackbone):
    """The encoder without masking, plus a linear head on the cls token.

    ``probe_head`` puts a BatchNorm without affine parameters before the linear layer: the MAE paper's linear probe,
    which makes the probe insensitive to the scale of the frozen features.
    """

    def __init__(self, encoder: MAE_Encoder, num_classes=10, probe_head=False):
        super().__init__()
        self.cls_token = encoder.cls_token
        self.pos_embedding = encoder.pos_embedding
        self.patchify = encoder.patchify
        self.transformer = encoder.transformer
        self.layer_norm = encoder.layer_norm
        dim = self.pos_embedding.shape[-1]
        linear = nn.Linear(dim, num_classes)
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False), linear) if probe_head else linear

    def forward(self, img):
        return self.head(self.forward_features(img)[:, 0])

    def no_weight_decay(self):
        """Parameter names timm's optimizer helpers keep out of weight decay."""
        return {"cls_token", "pos_embedding"}

    def group_matcher(self, coarse=False):
        """Layer ids for timm's layer-wise lr decay: the embeddings are layer 0, block i is layer i + 1."""
        return {"stem": r"^cls_token|^pos_embedding|^patchify",
                "blocks": [(r"^transformer\.(\d+)", None), (r"^layer_norm", (99999,))]}


def to_timm_state_dict(state_dict):
    """Our encoder (or classifier) weights under timm VisionTransformer names.

    Loads into ``timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=2, no_embed_class=True,
    qkv_bias=False, num_classes=10)``: our position embedding covers the patches only (no cls position), which is
    timm's ``no_embed_class``; the reference's blocks have no qkv bias.
    """
    renames = {"patchify.": "patch_embed.proj.", "transformer.": "blocks.", "layer_norm.": "norm."}
    converted = {}
    for name, value in encoder_state_dict(state_dict).items():
        if name == "pos_embedding":
            name, value = "pos_embed", value.transpose(0, 1)  # (T, 1, C) -> (1, T, C)
        for ours, theirs in renames.items():
            if name.startswith(ours):
                name = theirs + name[len(ours):]
        converted[name] = value
    head = {k: v for k, v in state_dict.items() if k in ("head.weight", "head.bias")}
    converted.update(head)  # a plain linear classifier head carries over; a probe head or an MAE has none
    return converted
