"""Meta's `consolidated.NN.pth` shards (Llama 2, 3 and 4): found in order, read lazily, tensors to numpy."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from llama_jax.convert import ConvertError


def find_shards(meta_dir: Path) -> list[Path]:
    """consolidated.00.pth, consolidated.01.pth, ... numbered without gaps."""
    if not meta_dir.is_dir():
        raise ConvertError(f"{meta_dir}: directory not found")
    shards = sorted(meta_dir.glob("consolidated.*.pth"))
    if not shards:
        raise ConvertError(f"{meta_dir}: no consolidated.*.pth files")
    numbers = [int(m.group(1)) if (m := re.fullmatch(r"consolidated\.(\d+)\.pth", p.name)) else -1 for p in shards]
    for expected, (number, path) in enumerate(zip(numbers, shards)):
        if number != expected:
            raise ConvertError(f"{meta_dir / f'consolidated.{expected:02d}.pth'}: shard missing "
                               f"(found {', '.join(p.name for p in shards)})")
    return shards


def load_shard(path: Path) -> dict:
    """A lazily read (memory-mapped) state dict of one .pth shard."""
    import torch

    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # torch reports bad files as RuntimeError, UnpicklingError, ...
        text = str(err).strip().splitlines()
        raise ConvertError(f"{path}: not a readable PyTorch checkpoint ({text[0] if text else type(err).__name__})") \
            from None


def to_numpy(tensor) -> np.ndarray:
    """A torch tensor as numpy (bfloat16 as ml_dtypes' bfloat16, which numpy lacks)."""
    import ml_dtypes
    import torch

    tensor = tensor.contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()
