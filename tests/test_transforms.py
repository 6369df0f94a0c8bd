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


def test_stack_images_is_the_channels_last_resize_it_replaced_bit_for_bit():
    """to_tensor hands `resize` a contiguous (3, H, W) tensor, where it used to hand it the channels-last float
    copy of a permuted view (2x slower): the separable antialiased kernel sums the same taps in the same order
    whatever the layout, so the model input is unchanged, down- and upsizing, odd sizes included."""
    rng = np.random.default_rng(0)
    for h, w, size in ((1024, 1024, (240, 240)), (700, 700, (240, 240)), (37, 53, (64, 64)), (31, 29, (17, 90))):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image.setflags(write=False)  # as load_image may return it
        before = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float() / 255.0
        assert not before.is_contiguous()  # the layout the old to_tensor gave resize
        assert torch.equal(stack_images([image], size), resize(before[None], size))
