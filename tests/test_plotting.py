"""Figures: sample grids large enough to see."""

from __future__ import annotations

import pytest
from PIL import Image

from pyrovae import TrainConfig, build_vae
from pyrovae.plotting import display_scale, save_sample_grid


@pytest.mark.parametrize("size, scale, width", [
    (28, 3, 3 * (8 * 28 + 9 * 2)),  # MNIST: 726 pixels, not 242
    (8, 10, 10 * (8 * 8 + 9 * 2)),  # scikit-learn's digits: 820 pixels, not 82
])
def test_an_8x8_sample_grid_of_small_images_is_enlarged_by_a_whole_factor(tmp_path, size, scale,
                                                                          width):
    assert display_scale((1, size, size)) == scale
    vae = build_vae(TrainConfig(hidden_dims=(8,), latent_dim=2), data_dim=size * size)
    save_sample_grid(vae, tmp_path / "grid.png", (1, size, size), 64)
    with Image.open(tmp_path / "grid.png") as image:
        assert image.size == (width, width)
        # nearest neighbour: each scale x scale block holds one value
        block = [image.getpixel((2 * scale + dx, 2 * scale + dy))
                 for dx in range(scale) for dy in range(scale)]
        assert len(set(block)) == 1


def test_large_images_are_not_enlarged():
    assert display_scale((3, 96, 64)) == 1
