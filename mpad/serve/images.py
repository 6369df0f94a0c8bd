"""Request bodies -> images: the uploaded bytes checked from the image's header, then decoded as `mpad predict`
decodes image files, and resized for the model without a full-size float copy.

Every refusal is a BadImage with the HTTP status it gets and one line naming the problem; the checks that need
no decoding come first (`open_image`, on the event loop), so a decompression bomb is refused from its header
before any pixel is unpacked. The decoding itself (`decode`) runs on the app's decode threads.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from mpad.data.mvtec import DatasetError, image_array
from mpad.visualize import output_size

# The accepted formats as PIL names them, and their files' first bytes (to name a file cut short in its header).
FORMATS = {"PNG": (b"\x89PNG\r\n\x1a\n",), "JPEG": (b"\xff\xd8\xff",), "TIFF": (b"II*\x00", b"MM\x00*")}
ACCEPTED = "PNG, JPEG or TIFF"
# The shortest side an image may have: below it, an image holds too little of a part to say anything about it
# (a 1x1 image was scored "normal" with confidence), and it is refused with 422.
MIN_SIDE = 32
# Rows converted to float at a time by `model_input`: 64 rows of a 5120 px wide image are 3.9 MB of float32.
STRIP_ROWS = 64


class BadImage(ValueError):
    """A request body that is not a usable image; `status` is the HTTP status it gets (4xx)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Decoded:
    """What the model and the answer need of an image: the model's input (1, 3, H', W'), and the image at the
    size of the returned overlay (h, w, 3) uint8 (None when no map is wanted). The full-size pixels are gone."""

    input: torch.Tensor
    picture: np.ndarray | None


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """The image in `data`, its header read and checked, its pixels not yet decoded.

    BadImage 400 for an empty body or bytes that are no image, 415 for another image format, 413 for more
    than `max_pixels` pixels, 422 for a truncated header or a side under MIN_SIDE pixels.
    """
    if not data:
        raise BadImage(400, f"empty body: send the bytes of one {ACCEPTED} image")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:  # PIL's own limit, far above any sensible --max-pixels
        found = re.search(r"\((\d+) pixels\)", str(err))  # PIL's message says the size; its limit is not mpad's
        size = f"{int(found[1])} pixels, " if found else ""
        raise BadImage(413, f"image of {size}more than --max-pixels {max_pixels}") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        known = next((name for name, magics in FORMATS.items() if data.startswith(magics)), None)
        if known is not None:
            raise BadImage(
                422, f"truncated or corrupt {known} image: its header cannot be read ({len(data)} bytes)"
            ) from err
        raise BadImage(
            400, f"the body is not an image ({len(data)} bytes that no image reader knows); send {ACCEPTED}"
        ) from err
    if im.format not in FORMATS:
        raise BadImage(415, f"{im.format} image: unsupported type; send {ACCEPTED}")
    width, height = im.size
    if width * height > max_pixels:
        raise BadImage(413, f"{width}x{height} image: {width * height} pixels, more than --max-pixels {max_pixels}")
    if min(width, height) < MIN_SIDE:
        raise BadImage(422, f"{width}x{height} image: smaller than {MIN_SIDE} px on a side, too small to inspect")
    return im


def decode(im: Image.Image, input_size: tuple[int, int], max_size: int, picture: bool = True) -> Decoded:
    """An opened image -> Decoded, converted as mpad.data.mvtec.load_image converts files (BadImage 422 for
    pixels that cannot be read: a truncated or corrupt file, a float TIFF outside 0..1).

    `picture`: whether the overlay's picture is wanted (Decoded.picture None otherwise). A JPEG at least twice
    as large as the overlay (`max_size` on its longer side, wanted or not, so that the scores do not depend on
    it) is decoded at 1/2, 1/4 or 1/8 of its size (JPEG draft mode: no more than that many pixels are ever
    unpacked). Its scores then differ slightly from `mpad predict`'s, which decodes every pixel; PNG and TIFF
    answers, and JPEGs below that size, are predict's to the bit.
    """
    with im:
        if im.format == "JPEG":
            scale = max(max_size, *input_size) / max(im.size)  # the longer side kept >= the overlay's
            im.draft(
                "RGB",
                (max(math.ceil(im.width * scale), input_size[1]), max(math.ceil(im.height * scale), input_size[0])),
            )
        try:
            im.load()
            # an RGB image is what image_array would make of it, without its convert() copy (100 MB at 25 MP)
            image = np.asarray(im) if im.mode == "RGB" else image_array(im, f"the {im.format} image")
        except DatasetError as err:
            raise BadImage(422, str(err)) from err
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise BadImage(422, f"truncated or corrupt {im.format} image ({err})") from err
        small = None
        if picture:  # render_map's own resize, here so that the full-size pixels need not wait for the model
            h, w = output_size(image.shape[0], image.shape[1], max_size)
            if (h, w) == image.shape[:2]:
                small = image
            else:  # from the decoded image itself when it holds these pixels: no Image.fromarray copy
                source = im if im.mode == "RGB" else Image.fromarray(image)
                small = np.asarray(source.resize((w, h), Image.BICUBIC))
    return Decoded(model_input(image, input_size), small)


def model_input(image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, *size) float: mpad.features.stack_images([image], size) to the bit, without its
    full-size float32 copy (12 bytes a pixel: 300 MB for 25 megapixels).

    torch's antialiased bicubic resize is separable and runs the width pass first, then the height pass, each
    with weights that depend only on the sizes; so the width pass on strips of STRIP_ROWS rows, then the height
    pass on the narrow result, computes the same numbers (tests/test_serve.py checks the equality)."""
    height, width, _ = image.shape
    strips = (torch.from_numpy(np.array(image[top : top + STRIP_ROWS])) for top in range(0, height, STRIP_ROWS))
    if width == size[1]:  # no width pass: only the height pass's input, as stack_images makes it
        wide = torch.cat([strip.permute(2, 0, 1)[None].float() / 255.0 for strip in strips], dim=2)
    else:  # (a strip copied: the decoded array may be read-only, which torch does not take)
        wide = torch.cat(
            [_bicubic(strip.permute(2, 0, 1)[None].float() / 255.0, (len(strip), size[1])) for strip in strips], dim=2
        )
    return wide if height == size[0] else _bicubic(wide, size)


def _bicubic(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(images, size=tuple(size), mode="bicubic", align_corners=False, antialias=True)
