"""figures.py: the reconstruction grid, the strategies figure and the prediction figure."""
import torch

import figures
from model import MAE_ViT


def tiny_mae():
    torch.manual_seed(0)
    return MAE_ViT(16, 2, 32, 1, 2, 1, 2).eval()


def test_reconstruction_grid_shape_and_fixed_masks():
    model, images = tiny_mae(), torch.rand(4, 3, 16, 16) * 2 - 1
    grid = figures.reconstruction_grid(model, images)
    assert grid.shape == (3, 3 * 17 + 1, 4 * 17 + 1)  # masked | reconstruction | original, 1 px padding
    assert torch.equal(figures.reconstruction_grid(model, images), grid)  # the same masks every time
    assert not torch.equal(figures.reconstruction_grid(model, images, seed=1), grid)


def test_strategies_figure_has_a_row_pair_per_strategy_and_skips_impossible_ones():
    model, images = tiny_mae(), torch.rand(4, 3, 16, 16) * 2 - 1
    all_four = figures.strategies_figure(model, images, ratios=(0.75,))
    # 0.82 keeps 11 of 64 patches: a prime, so block and grid cannot make it; random and blockwise can.
    two = figures.strategies_figure(model, images, ratios=(0.82,))
    row = 2 * 17 * figures.SCALE // 2  # masked + reconstructed rows of one strategy
    assert all_four.height - two.height == 2 * row
    assert model.encoder.shuffle.strategy == "random"  # the model's own masking is restored


def test_prediction_figure_frames_wrong_predictions_in_red():
    images = torch.full((3, 3, 8, 8), 255, dtype=torch.uint8)
    figure = figures.prediction_figure(images, torch.tensor([0, 1, 2]), torch.tensor([0, 2, 2]), ["a", "b", "c"],
                                       columns=3)
    size = 8 * figures.SCALE
    assert figure.size == (3 * (size + 8), size + 28 + 8)
    red = (200, 0, 0)
    assert figure.getpixel((size + 8 + 4 - 2, 10)) == red  # the second image's frame
    assert figure.getpixel((4 - 2, 10)) != red
