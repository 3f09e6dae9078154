"""Decoding of uploaded images: PNG or JPEG only, the pixel count checked from the header before any
decoding, and every failure a client error. CPU-bound: callers run it off the event loop."""

from __future__ import annotations

import io

from PIL import Image

FORMATS = ("PNG", "JPEG")


class UploadError(ValueError):
    """An upload that cannot be used; ``status`` is the HTTP answer (413 or 415)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def decode_upload(data: bytes, max_pixels: int, size: int) -> Image.Image:
    """``data`` as an RGB ``size`` x ``size`` image; UploadError 413 over ``max_pixels``, 415 for
    anything that is not a PNG or JPEG that decodes."""
    try:
        im = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as e:  # over PIL's own limit, which it checks on open
        raise UploadError(413, f"the image has too many pixels: {e}") from e
    except Exception as e:  # whatever the parser trips on is the upload's fault
        raise UploadError(415, f"the upload is not a PNG or JPEG image ({type(e).__name__})") from e
    w, h = im.size
    if w * h > max_pixels:
        raise UploadError(413, f"the image has {w}x{h} = {w * h} pixels, over the limit of {max_pixels}")
    try:
        im.load()
        return im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    except Exception as e:  # corrupt or truncated data
        raise UploadError(415, f"the {im.format} image cannot be decoded: {e}") from e
