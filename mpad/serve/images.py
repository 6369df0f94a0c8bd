"""Request bodies -> images: the uploaded bytes checked, then decoded as `mpad predict` decodes image files.

Every refusal is a BadImage with the HTTP status it gets and one line naming the problem; the checks that need
no decoding come first, so a decompression bomb is refused from its header before any pixel is unpacked.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from mpad.data.mvtec import DatasetError, image_array

# The accepted formats as PIL names them, and their files' first bytes (to name a file cut short in its header).
FORMATS = {"PNG": (b"\x89PNG\r\n\x1a\n",), "JPEG": (b"\xff\xd8\xff",), "TIFF": (b"II*\x00", b"MM\x00*")}
ACCEPTED = "PNG, JPEG or TIFF"


class BadImage(ValueError):
    """A request body that is not a usable image; `status` is the HTTP status it gets (4xx)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """PNG, JPEG or TIFF bytes -> uint8 RGB (H, W, 3), converted as mpad.data.mvtec.load_image converts files.

    BadImage 400 for an empty body or bytes that are no image, 415 for another image format, 413 for more
    than `max_pixels` pixels (read from the header, before decoding), 422 for a truncated or corrupt file
    or pixels that cannot be read as 8-bit RGB (e.g. a float TIFF outside 0..1).
    """
    if not data:
        raise BadImage(400, f"empty body: send the bytes of one {ACCEPTED} image")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:  # PIL's own limit, far above any sensible --max-pixels
        raise BadImage(413, f"image of more than --max-pixels {max_pixels} pixels ({err})") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        known = next((name for name, magics in FORMATS.items() if data.startswith(magics)), None)
        if known is not None:
            raise BadImage(
                422, f"truncated or corrupt {known} image: its header cannot be read ({len(data)} bytes)"
            ) from err
        raise BadImage(
            400, f"the body is not an image ({len(data)} bytes that no image reader knows); send {ACCEPTED}"
        ) from err
    with im:
        if im.format not in FORMATS:
            raise BadImage(415, f"{im.format} image: unsupported type; send {ACCEPTED}")
        width, height = im.size
        if width * height > max_pixels:
            raise BadImage(413, f"{width}x{height} image: {width * height} pixels, more than --max-pixels {max_pixels}")
        try:
            im.load()
            return image_array(im, f"the {im.format} image")
        except DatasetError as err:
            raise BadImage(422, str(err)) from err
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise BadImage(422, f"truncated or corrupt {im.format} image ({err})") from err
