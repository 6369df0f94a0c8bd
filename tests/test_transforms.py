"""Images to model input (mpad/transforms.py, mpad.features.stack_images)."""

from __future__ import annotations

import numpy as np
import torch

from mpad.features import stack_images
from mpad.transforms import model_input, normalise, resize

MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


def test_resize_to_the_same_size_is_the_identity_bit_for_bit():
    images = torch.rand(2, 3, 37, 41, generator=torch.Generator().manual_seed(0)) * 1.4 - 0.2  # overshoot too
    assert torch.equal(resize(images, (37, 41)), images)


def test_the_model_sees_the_clamped_resize_whichever_way_it_came():
    """stack_images leaves bicubic's overshoot to the consumers, which clamp first: encode's model_input of its
    output, and the exported graph's normalise, equal clamp-then-normalise of the resize, bit for bit. A sharp
    edge makes bicubic overshoot, so the clamp is exercised."""
    image = np.zeros((40, 50, 3), np.uint8)
    image[:, 25:] = 255
    stacked = stack_images([image], (64, 64))
    assert float(stacked.min()) < 0 and float(stacked.max()) > 1  # overshoot left in place
    clamped = stacked.clamp(0, 1)
    expected = (clamped - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.equal(model_input(stacked, (64, 64), MEAN, STD), expected)
    assert torch.equal(normalise(stacked, MEAN, STD), expected)
