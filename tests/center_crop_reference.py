"""The reference for data.resize center_crop: guided-diffusion's ``center_crop_arr`` (openai/guided-diffusion,
guided_diffusion/image_datasets.py), transcribed, which the diffusion-features paper's loader (diffssl) calls too."""

from __future__ import annotations

import numpy as np
from PIL import Image


def guided_diffusion_center_crop_arr(pil_image, image_size):
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


def crop_file(path, image_size) -> np.ndarray:
    """What guided-diffusion's ImageDataset gives for one file (before its flip and scaling): RGB, centre-cropped,
    [H, W, 3] uint8."""
    with Image.open(path) as im:
        im.load()
        return guided_diffusion_center_crop_arr(im.convert("RGB"), image_size)
