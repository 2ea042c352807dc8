"""Images into the arrays `LlamaVision` takes, as Hugging Face's MllamaImageProcessor makes them.

    batch = image_inputs([[load_image("cat.png")]], tokens, config.vision)
    # pixels [b, i, tiles, 3, size, size], aspect_ratio_ids, aspect_ratio_mask, tile_from, tile_until

Per image (numpy and Pillow only):
1. RGB, with any transparency composited onto white.
2. The tile arrangement: among the (rows, cols) of at most `max_tiles`
   tiles, the canvas that needs the least upscaling (else the least
   downscaling), ties to the smaller canvas.
3. Resize without distortion to fit that canvas, never below one tile per
   side (Pillow's bilinear filter, as the HF processor's PIL backend).
4. Pad with black at the bottom and right, scale to [0, 1], normalise with
   the model's mean and std, cut into tiles (row by row).
The aspect-ratio id is the arrangement's index in `VisionConfig.aspect_ratios`
plus one; the aspect-ratio mask marks the tiles an image has (the first tile
always, as HF marks it even for padding images).

Which text tokens see an image follows the processor's rule: from the
image's <|image|> token up to the next image's token, the last image (and
the run of consecutive image tokens just before it) up to the end, which is
left open so that generated tokens see it too.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from llama_jax.cli import first_line
from llama_jax.config import VisionConfig

OPEN_END = 2**30  # tile_until of a span reaching the end of the text: generated tokens see it too


def load_image(path: str | os.PathLike | BinaryIO, name: str | None = None) -> Image.Image:
    """The image file at `path` (or in a binary file object, such as a data URL's decoded bytes
    in `io.BytesIO`), decoded; ValueError (one line, starting with `name`, default the path) if
    it is missing or not an image."""
    name = name or str(path)
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except FileNotFoundError:
        raise ValueError(f"{name}: image file not found") from None
    except IsADirectoryError:
        raise ValueError(f"{name}: is a directory, not an image file") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise ValueError(f"{name}: not an image Pillow can read ({first_line(err)})") from None


def best_tiling(height: int, width: int, vision: VisionConfig) -> tuple[int, int]:
    """(rows, cols) of tiles for an image of this size (step 2 of the module docstring)."""
    tile = vision.image_size
    scales = [min(rows * tile / height, cols * tile / width) for rows, cols in vision.aspect_ratios]
    upscales = [s for s in scales if s >= 1]
    chosen = min(upscales) if upscales else max(scales)
    candidates = [ar for ar, s in zip(vision.aspect_ratios, scales) if s == chosen]
    return min(candidates, key=lambda ar: ar[0] * ar[1])


def fitted_size(height: int, width: int, rows: int, cols: int, tile: int) -> tuple[int, int]:
    """(height, width) to resize to: the image scaled to fit rows x cols tiles, at least a tile a side."""
    target_h = min(max(height, tile), rows * tile)
    target_w = min(max(width, tile), cols * tile)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparency (an alpha band or a transparent palette entry) composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def image_tiles(image: Image.Image, vision: VisionConfig) -> tuple[np.ndarray, tuple[int, int]]:
    """(tiles float32 [rows*cols, 3, size, size], (rows, cols)) of one image."""
    image = to_rgb(image)
    width, height = image.size
    rows, cols = best_tiling(height, width, vision)
    tile = vision.image_size
    new_h, new_w = fitted_size(height, width, rows, cols, tile)
    resized = np.asarray(image.resize((new_w, new_h), resample=Image.Resampling.BILINEAR))
    canvas = np.zeros((rows * tile, cols * tile, 3), np.uint8)
    canvas[:new_h, :new_w] = resized
    # HF's arithmetic: scale in float64, then normalise in float32.
    scaled = (canvas.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean, std = np.asarray(vision.image_mean, np.float32), np.asarray(vision.image_std, np.float32)
    normalised = ((scaled - mean) / std).transpose(2, 0, 1)                 # [3, H, W]
    tiles = normalised.reshape(3, rows, tile, cols, tile).transpose(1, 3, 0, 2, 4)
    return np.ascontiguousarray(tiles.reshape(rows * cols, 3, tile, tile)), (rows, cols)


def tile_spans(tokens: Sequence[int], image_token_id: int, tiles: Sequence[int],
               max_tiles: int) -> tuple[np.ndarray, np.ndarray]:
    """(tile_from, tile_until), int32 [images, max_tiles]: the positions that see each tile.

    `tiles[k]` is how many tiles image k has (later ones are never seen).
    ValueError (one line) unless there is one <|image|> token per image.
    """
    starts = [i for i, token in enumerate(tokens) if token == image_token_id]
    if len(starts) != len(tiles):
        raise ValueError(f"the prompt has {len(starts)} <|image|> token(s) for {len(tiles)} image(s); "
                         "put one <|image|> where each image belongs")
    ends = starts[1:] + [OPEN_END]
    for k in range(len(starts) - 2, -1, -1):  # consecutive image tokens see what the last of them sees
        if ends[k] == starts[k] + 1:
            ends[k] = ends[k + 1]
    tile_from = np.zeros((len(starts), max_tiles), np.int32)
    tile_until = np.zeros((len(starts), max_tiles), np.int32)
    for k, (start, end, n) in enumerate(zip(starts, ends, tiles)):
        tile_from[k, :n], tile_until[k, :n] = start, end
    return tile_from, tile_until


def image_shapes(vision: VisionConfig, rows: int) -> dict[str, tuple[tuple[int, ...], type]]:
    """{name: (shape, dtype)} of the `images` arrays for `rows` rows (`vision.max_images` slots each)."""
    slots = (rows, vision.max_images, vision.max_tiles)
    return {"pixels": (slots + (3, vision.image_size, vision.image_size), np.float32),
            "aspect_ratio_ids": (slots[:2], np.int32), "aspect_ratio_mask": (slots, np.int32),
            "tile_from": (slots, np.int32), "tile_until": (slots, np.int32)}


def image_inputs(images: Sequence[Sequence[Image.Image]], prompts: Sequence[Sequence[int]],
                 vision: VisionConfig) -> dict[str, np.ndarray]:
    """The `images` argument of `LlamaVision` for a batch: row r's images and its token ids.

    Every row gets `vision.max_images` image slots (unused ones are empty and
    seen by no token). ValueError (one line) for a row with more images than
    that, or whose <|image|> tokens do not match its images.
    """
    rows, slots, tiles = len(prompts), vision.max_images, vision.max_tiles
    out = {name: np.zeros(shape, dtype) for name, (shape, dtype) in image_shapes(vision, rows).items()}
    out["aspect_ratio_mask"][:, :, 0] = 1
    for r, (row_images, tokens) in enumerate(zip(images, prompts)):
        if len(row_images) > slots:
            raise ValueError(f"prompt {r} has {len(row_images)} images; this model takes at most {slots} "
                             "per prompt (vision.max_images)")
        counts = []
        for k, image in enumerate(row_images):
            pixels, (n_rows, n_cols) = image_tiles(image, vision)
            out["pixels"][r, k, :len(pixels)] = pixels
            out["aspect_ratio_ids"][r, k] = vision.aspect_ratios.index((n_rows, n_cols)) + 1
            out["aspect_ratio_mask"][r, k, :len(pixels)] = 1
            counts.append(len(pixels))
        try:
            tile_from, tile_until = tile_spans(tokens, vision.image_token_id, counts, tiles)
        except ValueError as err:
            raise ValueError(f"prompt {r}: {err}") from None
        out["tile_from"][r, :len(counts)], out["tile_until"][r, :len(counts)] = tile_from, tile_until
    return out
