"""Where and in which numerics a model runs: the device, autocast, seeding and RNG state, peak memory."""

import random
import resource

import numpy as np
import torch

from cbam.errors import ConfigError

from . import distributed as dist

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """Under torchrun, `auto` and `cuda` mean this process's own GPU, cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name} but CUDA is not available here: use trainer.device=auto or cpu")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ConfigError(f"trainer.device={name!r} is unknown: use auto, cpu or cuda")
    if name == "cuda" and dist.launched_world_size() > 1:
        return torch.device("cuda", dist.local_rank())
    return torch.device(name)


def check_precision(precision: str, key: str = "trainer.precision") -> torch.dtype:
    if precision not in PRECISIONS:
        raise ConfigError(f"{key}={precision!r} is unknown: use one of {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def autocast_kwargs(device: torch.device, precision: str) -> dict:
    """The keyword arguments of torch.autocast for a precision name: fp32 is autocast disabled."""
    dtype = check_precision(precision)
    return {"device_type": device.type, "dtype": dtype, "enabled": dtype != torch.float32}


def device_name(device: torch.device) -> str:
    return str(device) if device.type == "cpu" else torch.cuda.get_device_name(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # timm's Mixup draws from numpy
    torch.manual_seed(seed)  # CPU and every CUDA device


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"  # ru_maxrss is in KiB
