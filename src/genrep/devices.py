"""Device names from configs and flags to torch devices."""

import torch

from .errors import GenrepError


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise GenrepError(f"device '{name}' asked for CUDA but no GPU is visible; use the cpu device (--train.device cpu)")
        return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
    if name != "cpu":
        raise GenrepError(f"device '{name}' is unknown; choose auto, cpu, cuda or cuda:N")
    return torch.device("cpu")
