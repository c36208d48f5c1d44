"""Where and in which numerics a model runs: the device, autocast, seeding and RNG state, peak memory."""

import platform
import random
import resource
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from cbam.errors import ConfigError

from . import distributed as dist

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
AUTO = "auto"


def resolve_device(name: str, job: int | None = None) -> torch.device:
    """`auto` and `cuda` mean a GPU of this node: under torchrun this process's own, cuda:LOCAL_RANK; for
    job number `job` of a multirun, cuda:(job mod GPUs), so that parallel jobs (hydra/launcher=joblib)
    spread over the GPUs; else cuda:0."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name} but CUDA is not available here: use trainer.device=auto or cpu")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ConfigError(f"trainer.device={name!r} is unknown: use auto, cpu or cuda")
    if name.startswith("cuda:"):
        index, count = name.removeprefix("cuda:"), torch.cuda.device_count()
        if not index.isdigit() or int(index) >= count:
            raise ConfigError(
                f"trainer.device={name!r}: this node has GPUs cuda:0 to cuda:{count - 1}; use one of them or cuda"
            )
    if name == "cuda" and dist.launched_by_torchrun():
        return torch.device("cuda", dist.local_rank())
    if name == "cuda" and job is not None:
        return torch.device("cuda", job % torch.cuda.device_count())
    return torch.device(name)


def configure_cuda() -> None:
    """What a CUDA run wants and nothing sets by default: cuDNN picks its fastest convolution per shape
    (our shapes are fixed within a run), and float32 matmuls may use TF32 tensor cores."""
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("high")


def check_precision(precision: str, key: str = "trainer.precision") -> torch.dtype:
    if precision not in PRECISIONS:
        raise ConfigError(f"{key}={precision!r} is unknown: use one of {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def native_bf16(device: torch.device) -> bool:
    """bf16 matmuls and convolutions in hardware: CUDA from Ampere on, x86 CPUs with AVX512-BF16 (oneDNN
    then uses it, and AMX where there is one)."""
    if device.type == "cuda":  # not is_bf16_supported(): by default it also says yes where bf16 is emulated
        return bool(torch.version.hip) or torch.cuda.get_device_capability(device)[0] >= 8
    return device.type == "cpu" and bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


@dataclass(frozen=True)
class FastPath:
    """What trainer.precision, trainer.channels_last and trainer.compile are for this run."""

    precision: str
    channels_last: bool
    compile: bool
    chosen: dict  # option -> why, for each option that was `auto`

    def record(self) -> dict:
        """As summary.json keeps it."""
        return {"precision": self.precision, "channels_last": self.channels_last, "compile": self.compile,
                "auto": self.chosen}  # fmt: skip


def choose_fast_path(trainer: DictConfig, device: torch.device, recorded: dict | None = None) -> FastPath:
    """Each of the three options that is `auto`, chosen for `device` (README, "Speed"); a value given is kept.

    precision: bf16 where the device runs it natively (a CPU without it keeps fp32, today's numerics).
    channels_last: on with bf16 or fp16 (oneDNN's bf16 convolutions and CUDA's tensor cores are NHWC-native;
        measured 2x for the CPU backbone), and with fp32 on a CPU (oneDNN's fp32 convolutions too: measured
        faster on both CPUs this project has run on, AVX2 and AVX-512); off with fp32 on CUDA (unmeasured).
    compile: off. Measured on the CPU it does not pay back within the default job (README); on CUDA it
        is unmeasured here (scripts/gpu_check.sh measures it), so it is asked for, not assumed.
    recorded: the trainer config of the checkpoint a run resumes from: its choices stand, so a resumed
        run keeps its numerics on any machine.
    """
    chosen = {}

    def pick(key: str, value, why: str):
        if trainer[key] != AUTO:
            return trainer[key]
        if recorded is not None and recorded.get(key, AUTO) != AUTO:
            chosen[key] = "as the checkpoint resumed from"
            return recorded[key]
        chosen[key] = why
        return value

    bf16 = native_bf16(device)
    precision = pick("precision", "bf16" if bf16 else "fp32",
                     f"{'native' if bf16 else 'no native'} bf16 on {device.type}")  # fmt: skip
    check_precision(precision)
    channels_last = pick("channels_last", precision != "fp32" or device.type == "cpu",
                         f"{precision} convolutions on {device.type}")  # fmt: skip
    compile_ = pick("compile", False, "does not pay back its compile time here (README, Speed)")
    for key, value in (("channels_last", channels_last), ("compile", compile_)):
        if not isinstance(value, bool):
            raise ConfigError(f"trainer.{key}={value!r} is unknown: use true, false or auto")
    return FastPath(precision, channels_last, compile_, chosen)


def with_fast_path(cfg: DictConfig, fast: FastPath) -> DictConfig:
    """`cfg` with the chosen values in place of `auto`: what the run records (config.yaml, W&B, checkpoints)."""
    cfg = cfg.copy()
    OmegaConf.update(cfg, "trainer", {"precision": fast.precision, "channels_last": fast.channels_last,
                                      "compile": fast.compile}, merge=True)  # fmt: skip
    return cfg


def autocast_kwargs(device: torch.device, precision: str) -> dict:
    """The keyword arguments of torch.autocast for a precision name: fp32 is autocast disabled."""
    dtype = check_precision(precision)
    return {"device_type": device.type, "dtype": dtype, "enabled": dtype != torch.float32}


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux): results and rates differ between CPU models (oneDNN
    picks its kernels per instruction set), so the records name it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_name(device: torch.device) -> str:
    return f"cpu ({cpu_name()})" if device.type == "cpu" else torch.cuda.get_device_name(device)


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
        # this process's own GPU only: a checkpoint resumes on a machine with fewer GPUs (or none)
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if isinstance(state["cuda"], torch.Tensor) and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """The run's peak memory in MiB and what it measures: on CUDA the allocator's peak since the run began
    (train() resets it); elsewhere the process's peak RSS, which in a multirun covers the jobs before it too."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"  # ru_maxrss is in KiB
