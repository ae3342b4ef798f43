"""model.py: masking strategies, MAE shapes and masks, the loss, and the reference's parameter layout."""
import pytest
import torch
from einops import rearrange

from model import (
    MAE_Decoder,
    MAE_Encoder,
    MAE_ViT,
    PatchShuffle,
    ViT_Classifier,
    encoder_state_dict,
    mae_loss,
    near_square_shape,
    take_indexes,
)

SIDE, T, BATCH = 16, 256, 64  # the paper's setting: 32 x 32 images, 2 x 2 patches -> a 16 x 16 grid
RATIOS = (0.5, 0.75, 0.9)
# A tiny MAE: 16 x 16 images, 2 x 2 patches (64 patches), width 32, 2 heads, one block each side.
TINY = dict(image_size=16, patch_size=2, emb_dim=32, encoder_layer=1, encoder_head=2, decoder_layer=1,
            decoder_head=2)
TINY_T = 64


def shuffle_batch(strategy, ratio, batch=BATCH, seed=0):
    """Run PatchShuffle on (T, B, C) patches; returns the patches, its outputs and the visible ids (B, keep)."""
    torch.manual_seed(seed)
    shuffle = PatchShuffle(ratio, strategy)
    patches = torch.randn(T, batch, 5)
    visible, forward_indexes, backward_indexes = shuffle(patches)
    keep = int(T * (1 - ratio))
    return patches, visible, forward_indexes, backward_indexes, forward_indexes[:keep].T


def rows_cols(visible_ids):
    """The sorted distinct rows and columns of one sample's visible patch ids."""
    return sorted(set((visible_ids // SIDE).tolist())), sorted(set((visible_ids % SIDE).tolist()))


def is_product(visible_ids, rows, cols):
    return set(visible_ids.tolist()) == {r * SIDE + c for r in rows for c in cols}


# ------------------------------------------------------------------------------------------------ PatchShuffle


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("strategy", ["random", "block", "grid"])
def test_patch_shuffle_keeps_exact_count_and_its_indexes_are_inverse_permutations(strategy, ratio):
    patches, visible, forward_indexes, backward_indexes, visible_ids = shuffle_batch(strategy, ratio)
    keep = int(T * (1 - ratio))
    assert keep == {0.5: 128, 0.75: 64, 0.9: 25}[ratio]
    assert visible.shape == (keep, BATCH, 5)
    assert forward_indexes.shape == backward_indexes.shape == (T, BATCH)
    identity = torch.arange(T)[:, None].expand(T, BATCH)
    assert torch.equal(forward_indexes.sort(dim=0).values, identity)
    assert torch.equal(backward_indexes.sort(dim=0).values, identity)
    assert torch.equal(take_indexes(take_indexes(patches, forward_indexes), backward_indexes), patches)
    assert torch.equal(visible, take_indexes(patches, forward_indexes[:keep]))
    assert all(len(set(ids.tolist())) == keep for ids in visible_ids)
    # Each sample draws its own mask.
    assert len({tuple(sorted(ids.tolist())) for ids in visible_ids}) > 1


@pytest.mark.parametrize("ratio", RATIOS)
def test_block_keeps_one_axis_aligned_rectangle(ratio):
    *_, visible_ids = shuffle_batch("block", ratio)
    tops = set()
    for ids in visible_ids:
        rows, cols = rows_cols(ids)
        assert rows == list(range(rows[0], rows[-1] + 1)), "visible rows are not contiguous"
        assert cols == list(range(cols[0], cols[-1] + 1)), "visible columns are not contiguous"
        assert is_product(ids, rows, cols)
        tops.add((rows[0], cols[0]))
    assert len(tops) > 1, "every sample got the block at the same place"


def test_grid_at_075_keeps_every_second_row_and_column():
    *_, visible_ids = shuffle_batch("grid", 0.75)
    phases = set()
    for ids in visible_ids:
        rows, cols = rows_cols(ids)
        assert len(rows) == len(cols) == 8
        assert rows == list(range(rows[0], SIDE, 2)) and cols == list(range(cols[0], SIDE, 2))
        assert is_product(ids, rows, cols)
        phases.add((rows[0], cols[0]))
    assert phases == {(0, 0), (0, 1), (1, 0), (1, 1)}  # a random phase per sample; 64 samples see all four


@pytest.mark.parametrize("ratio", [0.5, 0.9])
def test_grid_is_an_evenly_spaced_lattice(ratio):
    *_, visible_ids = shuffle_batch("grid", ratio)
    for ids in visible_ids:
        rows, cols = rows_cols(ids)
        assert len({b - a for a, b in zip(rows, rows[1:])}) == 1
        assert len({b - a for a, b in zip(cols, cols[1:])}) == 1
        assert is_product(ids, rows, cols)


def test_random_masks_are_reproducible_under_a_seed():
    first = shuffle_batch("random", 0.75, seed=3)[2]
    again = shuffle_batch("random", 0.75, seed=3)[2]
    other = shuffle_batch("random", 0.75, seed=4)[2]
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_near_square_shape():
    assert near_square_shape(64, 16, 16) == (8, 8)
    assert near_square_shape(25, 16, 16) == (5, 5)
    assert near_square_shape(128, 16, 16) == (8, 16)
    assert near_square_shape(13, 16, 16) == (1, 13)  # a prime that still fits as a strip
    assert near_square_shape(17, 16, 16) is None  # a prime wider than the grid
    assert near_square_shape(34, 16, 16) is None  # 2 x 17 does not fit either


@pytest.mark.parametrize("strategy", ["block", "grid"])
def test_a_ratio_the_strategy_cannot_make_raises_a_clear_error(strategy):
    ratio = 1 - 17.5 / 256  # keeps int(17.5) = 17 patches: prime, and wider than a 16-patch row
    with pytest.raises(ValueError, match=rf"{strategy} masking cannot keep 17 of 256 patches.*try another ratio"):
        PatchShuffle(ratio, strategy)(torch.randn(T, 2, 3))
    with pytest.raises(ValueError, match="cannot keep 17"):  # caught when the model is built, not mid-training
        MAE_Encoder(32, 2, 32, 1, 2, mask_ratio=ratio, mask_strategy=strategy)
    visible, _, _ = PatchShuffle(ratio, "random")(torch.randn(T, 2, 3))  # random can make any count
    assert visible.shape[0] == 17


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.25, 1.5])
def test_a_ratio_outside_the_open_unit_interval_raises(ratio):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        PatchShuffle(ratio, "random")
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        MAE_ViT(**TINY, mask_ratio=ratio)


def test_unknown_strategy_no_visible_patch_and_non_square_grids_raise():
    with pytest.raises(ValueError, match="unknown mask strategy 'checkers'"):
        PatchShuffle(0.75, "checkers")
    with pytest.raises(ValueError, match="no visible patch"):
        PatchShuffle(0.999, "random")(torch.randn(T, 2, 3))
    with pytest.raises(ValueError, match="square patch grid"):
        PatchShuffle(0.75, "block")(torch.randn(200, 2, 3))
    assert PatchShuffle(0.75, "random")(torch.randn(200, 2, 3))[0].shape == (50, 2, 3)


# ------------------------------------------------------------------------------------------------------ MAE_ViT


def patch_view(images, p=2):
    return rearrange(images, "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=p, p2=p)


@pytest.mark.parametrize("strategy", ["random", "block", "grid"])
def test_mae_forward_shapes_and_mask_match_the_encoders_shuffle(strategy):
    model = MAE_ViT(**TINY, mask_strategy=strategy).eval()
    img = torch.randn(4, 3, 16, 16)
    keep = TINY_T // 4
    torch.manual_seed(7)
    _, backward_indexes = model.encoder(img)
    torch.manual_seed(7)
    predicted, mask = model(img)
    assert predicted.shape == mask.shape == (4, 3, 16, 16)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert mask.flatten(1).sum(1).tolist() == [(TINY_T - keep) * 3 * 2 * 2] * 4
    per_patch = patch_view(mask)
    assert torch.equal(per_patch.amin(-1), per_patch.amax(-1)), "a patch is partly masked"
    # A patch is masked exactly when the encoder's shuffle put it after the visible ones.
    assert torch.equal(per_patch[..., 0].bool(), (backward_indexes >= keep).T)


def test_mae_prediction_ignores_masked_input_pixels():
    model = MAE_ViT(**TINY).eval()
    img, noise = torch.randn(2, 3, 16, 16), 10 * torch.randn(2, 3, 16, 16)
    torch.manual_seed(1)  # the same seed before each call: the same mask
    predicted, mask = model(img)
    torch.manual_seed(1)
    predicted_masked_changed, _ = model(img + mask * noise)
    torch.manual_seed(1)
    predicted_visible_changed, _ = model(img + (1 - mask) * noise)
    assert torch.allclose(predicted, predicted_masked_changed, atol=1e-5)  # the encoder never saw those pixels
    assert not torch.allclose(predicted, predicted_visible_changed, atol=1e-3)


def test_a_narrower_decoder_gets_a_projection_and_trains_end_to_end():
    model = MAE_ViT(**TINY, decoder_emb_dim=16)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["decoder.embed.weight"] == (16, 32)
    assert shapes["decoder.mask_token"] == (1, 1, 16)
    assert shapes["decoder.pos_embedding"] == (TINY_T + 1, 1, 16)
    assert shapes["decoder.head.weight"] == (12, 16)
    img = torch.randn(2, 3, 16, 16)
    predicted, mask = model(img)
    assert predicted.shape == mask.shape == img.shape
    mae_loss(predicted, img, mask, 2).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    # The same width needs no projection, as in the reference.
    assert not any(k.startswith("decoder.embed") for k in MAE_ViT(**TINY).state_dict())


def test_bad_sizes_raise_value_errors():
    with pytest.raises(ValueError, match="image size 30 is not divisible by patch size 4"):
        MAE_ViT(**{**TINY, "image_size": 30, "patch_size": 4})
    with pytest.raises(ValueError, match="image size 30"):
        MAE_Decoder(30, 4, 32, 1, 2)
    with pytest.raises(ValueError, match="width 32 is not divisible by 3 attention heads"):
        MAE_ViT(**{**TINY, "encoder_head": 3})
    with pytest.raises(ValueError, match="width 30 is not divisible by 4"):
        MAE_ViT(**{**TINY, "decoder_head": 4}, decoder_emb_dim=30)


# --------------------------------------------------------------------------------------------------------- loss


def test_mae_loss_ignores_visible_patches():
    torch.manual_seed(0)
    model = MAE_ViT(**TINY)
    img = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        predicted, mask = model(img)
    loss = mae_loss(predicted, img, mask, 2)
    changed_visible = predicted + 5 * (1 - mask) * torch.randn_like(predicted)
    changed_masked = predicted + 5 * mask * torch.randn_like(predicted)
    assert torch.allclose(mae_loss(changed_visible, img, mask, 2), loss)
    assert not torch.allclose(mae_loss(changed_masked, img, mask, 2), loss)
    assert not torch.allclose(mae_loss(predicted, img, mask, 2, norm_pix_loss=True), loss)


def hand_loss(pred, img, masked_patches, p, norm_pix):
    """Mean over the masked patches of the per-patch mean squared error, written out with plain Python."""
    losses = []
    for b, i, j in masked_patches:  # batch, patch row, patch column
        target = img[b, :, i * p:(i + 1) * p, j * p:(j + 1) * p].flatten().tolist()
        guess = pred[b, :, i * p:(i + 1) * p, j * p:(j + 1) * p].flatten().tolist()
        if norm_pix:
            n = len(target)
            mean = sum(target) / n
            var = sum((t - mean) ** 2 for t in target) / (n - 1)  # unbiased, like the paper's code
            target = [(t - mean) / (var + 1e-6) ** 0.5 for t in target]
        losses.append(sum((g - t) ** 2 for g, t in zip(guess, target)) / len(target))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_mae_loss_equals_a_hand_computation(norm_pix):
    torch.manual_seed(0)
    p = 2
    img, pred = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)  # 2 images of 2 x 2 patches
    masked_patches = [(0, 0, 1), (0, 1, 0), (1, 1, 1)]
    mask = torch.zeros(2, 3, 4, 4)
    for b, i, j in masked_patches:
        mask[b, :, i * p:(i + 1) * p, j * p:(j + 1) * p] = 1
    loss = mae_loss(pred, img, mask, p, norm_pix_loss=norm_pix)
    assert loss.item() == pytest.approx(hand_loss(pred, img, masked_patches, p, norm_pix), rel=1e-5)


def test_mae_loss_closed_form_on_one_patch():
    img = torch.arange(12.0).reshape(1, 3, 2, 2)  # one 2 x 2 patch holding 0..11
    zeros, mask = torch.zeros_like(img), torch.ones_like(img)
    assert mae_loss(zeros, img, mask, 2).item() == pytest.approx(sum(v * v for v in range(12)) / 12)
    # Predicting 0 for a standardised target costs the mean squared z-score: (n - 1) / n with unbiased var.
    var = torch.arange(12.0).var().item()
    expected = 11 / 12 * var / (var + 1e-6)
    assert mae_loss(zeros, img, mask, 2, norm_pix_loss=True).item() == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------------------------ reference parameter layout


def block_shapes(prefix, dim):
    """A timm Block as the reference uses it: no qkv bias, mlp ratio 4."""
    return {f"{prefix}.norm1.weight": (dim,), f"{prefix}.norm1.bias": (dim,),
            f"{prefix}.attn.qkv.weight": (3 * dim, dim),
            f"{prefix}.attn.proj.weight": (dim, dim), f"{prefix}.attn.proj.bias": (dim,),
            f"{prefix}.norm2.weight": (dim,), f"{prefix}.norm2.bias": (dim,),
            f"{prefix}.mlp.fc1.weight": (4 * dim, dim), f"{prefix}.mlp.fc1.bias": (4 * dim,),
            f"{prefix}.mlp.fc2.weight": (dim, 4 * dim), f"{prefix}.mlp.fc2.bias": (dim,)}


def backbone_shapes(prefix, dim, depth, patches, patch):
    shapes = {f"{prefix}cls_token": (1, 1, dim), f"{prefix}pos_embedding": (patches, 1, dim),
              f"{prefix}patchify.weight": (dim, 3, patch, patch), f"{prefix}patchify.bias": (dim,),
              f"{prefix}layer_norm.weight": (dim,), f"{prefix}layer_norm.bias": (dim,)}
    for i in range(depth):
        shapes.update(block_shapes(f"{prefix}transformer.{i}", dim))
    return shapes


def reference_shapes():
    """The reference's MAE_ViT (ViT-T/2 on 32 x 32): 12 encoder blocks, 4 decoder blocks, width 192."""
    shapes = backbone_shapes("encoder.", 192, 12, 256, 2)
    shapes.update({"decoder.mask_token": (1, 1, 192), "decoder.pos_embedding": (257, 1, 192),
                   "decoder.head.weight": (12, 192), "decoder.head.bias": (12,)})
    for i in range(4):
        shapes.update(block_shapes(f"decoder.transformer.{i}", 192))
    return shapes


def test_default_mae_has_exactly_the_reference_parameter_names_and_shapes():
    model = MAE_ViT()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == reference_shapes()


def test_a_reference_state_dict_loads_strictly():
    torch.manual_seed(0)
    reference = {k: torch.randn(shape) for k, shape in reference_shapes().items()}
    model = MAE_ViT()
    model.load_state_dict(reference, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference[k]), k


def test_classifier_parameter_names_and_shared_encoder():
    encoder = MAE_Encoder(16, 2, 32, 2, 2)
    classifier = ViT_Classifier(encoder, num_classes=7)
    expected = backbone_shapes("", 32, 2, TINY_T, 2)
    expected.update({"head.weight": (7, 32), "head.bias": (7,)})
    assert {k: tuple(v.shape) for k, v in classifier.state_dict().items()} == expected
    assert classifier.cls_token is encoder.cls_token and classifier.transformer is encoder.transformer
    classifier.eval()
    img = torch.randn(3, 3, 16, 16)
    logits = classifier(img)
    assert logits.shape == (3, 7)
    assert torch.equal(logits, classifier(img)), "the classifier must see every patch, without random masking"


def test_encoder_state_dict_from_an_mae_and_from_a_classifier():
    mae = MAE_ViT(**TINY)
    expected_keys = set(MAE_Encoder(16, 2, 32, 1, 2).state_dict())
    from_mae = encoder_state_dict(mae.state_dict())
    assert set(from_mae) == expected_keys
    encoder = MAE_Encoder(16, 2, 32, 1, 2)
    encoder.load_state_dict(from_mae, strict=True)
    assert torch.equal(encoder.pos_embedding, mae.encoder.pos_embedding)

    classifier = ViT_Classifier(MAE_Encoder(16, 2, 32, 1, 2), num_classes=10)
    from_classifier = encoder_state_dict(classifier.state_dict())
    assert set(from_classifier) == expected_keys
    encoder.load_state_dict(from_classifier, strict=True)
    assert torch.equal(encoder.transformer[0].attn.qkv.weight, classifier.transformer[0].attn.qkv.weight)


def test_mae_loss_counts_masked_patches_exactly_under_bf16_autocast():
    # 255 images x 192 masked patches = 48,960: bf16 (8 significant bits) would count 48,896.
    from model import MAE_ViT, mae_loss

    torch.manual_seed(0)
    model = MAE_ViT(32, 2, 32, 1, 2, 1, 2)
    images = torch.randn(255, 3, 32, 32)
    torch.manual_seed(1)
    predicted, mask = model(images)
    exact = mae_loss(predicted, images, mask, 2)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        predicted_bf16, mask_bf16 = model(images)
    assert mask_bf16.dtype == torch.float32 and mask_bf16[:, 0].sum() == 255 * 192 * 2 * 2  # 2 x 2 pixels a patch
    fast = mae_loss(predicted_bf16, images, mask_bf16, 2)
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, exact, rtol=1e-2, atol=0)
