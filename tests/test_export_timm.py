"""Our encoder and classifier weights under timm VisionTransformer names: to_timm_state_dict and export_timm.py."""
import pytest
import timm
import torch

import checkpoint as ckpt
import export_timm
import utils
from model import MAE_Encoder, MAE_ViT, ModelConfig, ViT_Classifier, to_timm_state_dict

TIMM_ARGS = dict(pretrained=False, no_embed_class=True, qkv_bias=False)
TINY = dict(image_size=16, patch_size=2, emb_dim=32, encoder_depth=2, encoder_heads=2)


def timm_vit(num_classes=10, **sizes):
    """The timm model of the docs, optionally resized (img_size, embed_dim, depth, num_heads)."""
    sizes = {"img_size": 32, "patch_size": 2, **sizes}
    return timm.create_model("vit_tiny_patch16_224", num_classes=num_classes, **TIMM_ARGS, **sizes).eval()


def perturbed(module, seed=0):
    """Every parameter moved off its initial value (LayerNorm weights 1 / biases 0 would hide a mix-up)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return module.eval()


def images(batch=2, size=32, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)).clamp(-1, 1)


def tiny_timm_kwargs(num_classes=10):
    return dict(img_size=TINY["image_size"], patch_size=TINY["patch_size"], embed_dim=TINY["emb_dim"],
                depth=TINY["encoder_depth"], num_heads=TINY["encoder_heads"], num_classes=num_classes)


def tiny_mae():
    return perturbed(MAE_ViT(TINY["image_size"], TINY["patch_size"], TINY["emb_dim"], TINY["encoder_depth"],
                             TINY["encoder_heads"], decoder_layer=1, decoder_head=2))


# ----------------------------------------------------------------------------------------- state dicts


def test_mae_state_dict_loads_into_default_vit_tiny_and_features_match():
    torch.manual_seed(0)
    mae = perturbed(MAE_ViT())  # the full ViT-T/2 of the reference
    state = to_timm_state_dict(mae.state_dict())
    assert not any(k.startswith(("encoder.", "decoder.")) for k in state)
    assert state["pos_embed"].shape == (1, 256, 192)
    reference = timm_vit()
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert set(missing) == {"head.weight", "head.bias"}
    assert unexpected == []
    x = images()
    with torch.no_grad():
        ours, theirs = mae.encoder.forward_features(x), reference.forward_features(x)
    assert ours.shape == theirs.shape == (2, 257, 192)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def test_every_timm_tensor_comes_from_our_encoder():
    """No key of ours is dropped or left unrenamed, and the values are our tensors (pos_embed transposed)."""
    mae = tiny_mae()
    state = to_timm_state_dict(mae.state_dict())
    reference = timm_vit(**tiny_timm_kwargs())
    assert set(state) == set(reference.state_dict()) - {"head.weight", "head.bias"}
    encoder = mae.encoder.state_dict()
    assert len(state) == len(encoder)  # one timm tensor per encoder tensor
    assert torch.equal(state["pos_embed"], encoder["pos_embedding"].transpose(0, 1))
    assert torch.equal(state["cls_token"], encoder["cls_token"])
    assert torch.equal(state["patch_embed.proj.weight"], encoder["patchify.weight"])
    assert torch.equal(state["blocks.1.attn.qkv.weight"], encoder["transformer.1.attn.qkv.weight"])
    assert torch.equal(state["norm.bias"], encoder["layer_norm.bias"])


def test_classifier_state_dict_loads_strictly_and_logits_match():
    torch.manual_seed(0)
    classifier = perturbed(ViT_Classifier(MAE_Encoder(32, 2, 64, 2, 4), num_classes=10))
    state = to_timm_state_dict(classifier.state_dict())
    reference = timm_vit(embed_dim=64, depth=2, num_heads=4)
    reference.load_state_dict(state, strict=True)  # the head carries over too
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(reference.forward_features(x), classifier.forward_features(x), atol=1e-4,
                                   rtol=1e-4)
        logits = classifier(x)
        torch.testing.assert_close(reference(x), logits, atol=1e-4, rtol=1e-4)
    assert logits.shape == (2, 10)


def test_probe_head_classifier_exports_the_encoder_only():
    """A BatchNorm + linear probe head has no timm counterpart: the encoder goes over, the head does not."""
    classifier = perturbed(ViT_Classifier(MAE_Encoder(16, 2, 32, 2, 2), num_classes=10, probe_head=True))
    state = to_timm_state_dict(classifier.state_dict())
    assert not any(k.startswith("head") for k in state)
    missing, unexpected = timm_vit(**tiny_timm_kwargs()).load_state_dict(state, strict=False)
    assert set(missing) == {"head.weight", "head.bias"} and unexpected == []


# ----------------------------------------------------------------------------------------- export_timm.py


def save_tiny_checkpoint(path, kind, model):
    ckpt.save_checkpoint(path, {"kind": kind, "model": model.state_dict(), "args": dict(TINY)})
    return path


def test_export_timm_writes_a_weights_only_file_that_timm_loads(tmp_path, capsys):
    mae = tiny_mae()
    checkpoint = save_tiny_checkpoint(tmp_path / "mae.pt", "mae", mae)
    out = tmp_path / "out" / "timm.pt"
    export_timm.main([str(checkpoint), str(out)])
    state = torch.load(out, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    printed = capsys.readouterr().out
    assert "embed_dim=32" in printed and "depth=2" in printed and "img_size=16" in printed
    kwargs = export_timm.timm_model_kwargs(ModelConfig.from_dict(TINY))
    assert kwargs == dict(tiny_timm_kwargs(), no_embed_class=True, qkv_bias=False)
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).eval()
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert set(missing) == {"head.weight", "head.bias"} and unexpected == []
    x = images(size=16)
    with torch.no_grad():
        torch.testing.assert_close(reference.forward_features(x), mae.encoder.forward_features(x), atol=1e-4,
                                   rtol=1e-4)


def test_export_timm_of_a_classifier_checkpoint_keeps_the_head(tmp_path):
    classifier = perturbed(ViT_Classifier(MAE_Encoder(16, 2, 32, 2, 2), num_classes=7))
    checkpoint = save_tiny_checkpoint(tmp_path / "cls.pt", "classifier", classifier)
    out = tmp_path / "timm.pt"
    export_timm.main([str(checkpoint), str(out)])
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False,
                                  **export_timm.timm_model_kwargs(ModelConfig.from_dict(TINY), num_classes=7)).eval()
    reference.load_state_dict(torch.load(out, weights_only=True), strict=True)
    x = images(size=16)
    with torch.no_grad():
        torch.testing.assert_close(reference(x), classifier(x), atol=1e-4, rtol=1e-4)


def test_export_timm_refuses_a_checkpoint_without_an_encoder(tmp_path):
    path = tmp_path / "other.pt"
    ckpt.save_checkpoint(path, {"model": {"fc.weight": torch.zeros(2, 2)}})
    with pytest.raises(utils.UserError, match="neither an MAE nor a classifier"):
        export_timm.main([str(path), str(tmp_path / "out.pt")])
    assert not (tmp_path / "out.pt").exists()
