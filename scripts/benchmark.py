"""Speed on the current device, measured in one run and printed as Markdown tables:

1. per attention variant: train and inference img/s, their ratio to `none`, peak memory; eager and compiled;
2. our training step (`cbam.engine.loop.train_one_epoch`) against a bare PyTorch loop, same model and batch;
3. the in-memory loader against torchvision's DataLoader, each as a multiple of the model's train img/s;

then the README's targets, each with the measured value and whether it is met here.

    python scripts/benchmark.py                                  # CIFAR ResNet-20, 1x28x28, eager + compiled
    python scripts/benchmark.py variants=[none,cbam] compile=[false] steps=10 repeats=1   # a quick look
    python scripts/benchmark.py csv=bench/                       # also variants.csv, step.csv, loader.csv
    # GPU: ResNet-50 at 224 px with AMP and channels_last (the GPU target), ResNet-18 at 32 px
    python scripts/benchmark.py model=resnet50 data=imagenet precision=bf16 channels_last=true
    python scripts/benchmark.py model=resnet18 data=cifar10 precision=bf16 channels_last=true

Sections 1 and 2 feed random tensors of the data config's shape (in_chans, image_size, num_classes) that
live on the device, so data=imagenet needs no ImageNet. Section 3 reads the dataset's train split and is
skipped with a note when the dataset is not there (CIFAR is downloaded to ./data, as train.py would).
Rows are measured in turn, `repeats` times: rates are the medians, and each ratio is the median of the
ratios measured within one repeat. Markdown goes to stdout, progress to stderr. Exit status: 0 done,
2 bad input.
"""

import logging
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch import nn

from cbam.cli import entry_point, run_hydra
from cbam.data.build import load_source, make_loaders
from cbam.data.sources import DataError
from cbam.engine.device import PRECISIONS, autocast_kwargs, resolve_device
from cbam.engine.loop import StepParts, train_one_epoch
from cbam.engine.optim import build_optimizer
from cbam.engine.state import EpochMeter, TrainState
from cbam.errors import ConfigError, instantiate_config
from cbam.models import build_model
from cbam.report.render import markdown_table, write_csv

log = logging.getLogger("benchmark")

# The targets (README): our step vs the bare loop; the in-memory loader vs the model on a CPU; CBAM's
# train throughput vs none's for ResNet-20 on a CPU and ResNet-50 (224 px, AMP, channels_last) on a GPU.
STEP_TARGET, LOADER_TARGET, CBAM_TARGET = 0.97, 20.0, 0.85
MODES = {False: "eager", True: "compiled"}
VARIANT_COLUMNS = ["attention", "mode", "train img/s", "train vs none", "infer img/s", "infer vs none"]
VARIANT_COLUMNS += ["train peak MiB", "infer peak MiB"]
STEP_COLUMNS = ["mode", "our step img/s", "bare loop img/s", "ours / bare"]
LOADER_COLUMNS = ["loader", "workers", "batches", "img/s", "x model train img/s"]
CPU_MEMORY_NOTE = (
    "¹ Peak memory is measured on CUDA only (the caching allocator's peak per measurement); a CPU has no "
    "such counter, and the process's max RSS would mix every variant's."
)


@dataclass
class Bench:
    """What every measurement shares: the device, the numerics and one fixed batch on the device."""

    device: torch.device
    autocast: dict  # kwargs of torch.autocast
    fp16: bool  # fp16 needs a GradScaler
    channels_last: bool
    x: torch.Tensor  # (B, C, H, W) standard normal, like normalised images
    y: torch.Tensor  # (B,) random labels
    steps: int
    warmup: int

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def batch_bytes(self) -> int:
        return tensor_bytes([self.x, self.y])


class RepeatedBatch:
    """The Loader interface (`len`, `epoch(epoch, skip)`) over one batch already on the device, `n` times:
    our training step with no data loading in it."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, n: int):
        self.x, self.y, self.n = x, y, n
        self.batch_size, self.num_samples, self.classes = len(y), n * len(y), []

    def __len__(self) -> int:
        return self.n

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(skip, self.n):
            yield self.x, self.y


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def median(values: list[float | None]) -> float | None:
    return None if None in values else statistics.median(values)


def repeat_ratios(values: list[float], bases: list[float]) -> list[float]:
    """value / base for each repeat, both measured in that repeat."""
    return [v / b for v, b in zip(values, bases, strict=True)]


def paired_ratio(values: list[float], bases: list[float]) -> float:
    """The median of the per-repeat ratios: a slow drift of the machine (this project's shared CPU moves
    10-20% over minutes) hits both sides of each pair alike and cancels."""
    return statistics.median(repeat_ratios(values, bases))


# ---------------------------------------------------------------------------------------------- measuring


def timed(
    bench: Bench, run: Callable[[int], None], resident: Callable[[], int] = lambda: 0
) -> tuple[float, float | None]:
    """(img/s, peak MiB) of `run(bench.steps)`, after `run(bench.warmup)` outside the timed region
    (compilation, cudnn's algorithm search, the allocator's first blocks).

    Peak memory, CUDA only (None elsewhere): the allocator's peak during the timed steps above what was
    allocated when they began, plus `resident()`, the bytes of what the steps use that were allocated
    before (weights, optimizer state, the batch), so the other variants' models resident beside this one
    do not count.
    """
    run(bench.warmup)
    bench.sync()
    cuda = bench.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(bench.device)
        start_bytes = torch.cuda.memory_allocated(bench.device)
    start = time.perf_counter()
    run(bench.steps)
    bench.sync()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(bench.device) - start_bytes + resident()) / 2**20 if cuda else None
    return bench.steps * bench.batch / seconds, peak


def bare_steps(model: nn.Module, trainee: TrainState, bench: Bench, n: int) -> None:
    """The minimal PyTorch training loop: forward, loss, backward, optimizer and LR scheduler step."""
    for _ in range(n):
        with torch.autocast(**bench.autocast):
            loss = F.cross_entropy(model(bench.x), bench.y)
        trainee.optimizer.zero_grad(set_to_none=True)
        trainee.scaler.scale(loss).backward()  # a disabled scaler (fp32, bf16) passes the loss through
        trainee.scaler.step(trainee.optimizer)
        trainee.scaler.update()
        trainee.scheduler.step()


def train_bytes(trainee: TrainState, bench: Bench) -> int:
    """What a train step needs that stays allocated between measurements: weights, buffers, optimizer
    state, the batch."""
    opt_state = [t for s in trainee.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return tensor_bytes([*trainee.model.parameters(), *trainee.model.buffers(), *opt_state]) + bench.batch_bytes()


def infer_bytes(trainee: TrainState, bench: Bench) -> int:
    """What inference needs that stays allocated: weights, buffers, the batch (no optimizer state)."""
    return tensor_bytes([*trainee.model.parameters(), *trainee.model.buffers()]) + bench.batch_bytes()


def train_steps(model: nn.Module, trainee: TrainState, bench: Bench, n: int) -> None:
    model.train()
    bare_steps(model, trainee, bench, n)
    trainee.optimizer.zero_grad(set_to_none=True)  # no grads resident between measurements


@torch.no_grad()
def infer_steps(model: nn.Module, bench: Bench, n: int) -> None:
    model.eval()
    for _ in range(n):
        with torch.autocast(**bench.autocast):
            model(bench.x)


def build_trainee(cfg: DictConfig, bench: Bench, total_steps: int) -> TrainState:
    model = build_model(cfg).to(bench.device)
    if bench.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg.optim, model)
    # One "epoch" spanning every step this optimizer takes here, so that any schedule lasts the whole
    # benchmark (onecycle refuses to step past its end).
    scheduler = instantiate_config(cfg.optim.scheduler, "optim.scheduler")(
        optimizer, steps_per_epoch=total_steps, epochs=1
    )
    scaler = torch.amp.GradScaler(bench.device.type, enabled=bench.fp16)
    return TrainState(model, optimizer, scheduler, scaler, ema=None, config={})


def maybe_compile(model: nn.Module, compiled: bool) -> nn.Module:
    return torch.compile(model) if compiled else model


def allow_recompiles(models: int) -> None:
    """Room in dynamo's cache for every compiled model in train and in eval mode.

    All our models run the same `ResNet.forward` code, and dynamo keeps 8 compiled entries per function
    by default: past them it quietly runs the function eager, which would make later "compiled" rows
    eager ones. Where this torch can, running out is made an error instead.
    """
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # the older name
    setattr(config, limit, max(getattr(config, limit), 4 * models))  # 2 needed (train, eval); room for graph breaks
    if hasattr(config, "fail_on_recompile_limit_hit"):
        config.fail_on_recompile_limit_hit = True


# ---------------------------------------------------------------------------------------------- sections


def variant_section(cfg: DictConfig, bench: Bench, names: list[str], modes: list[bool]) -> list[dict]:
    """Train and inference img/s and peak memory of each variant, eager and compiled, in turn `repeats` times."""
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith(("attention=", "variants="))]
    total_steps = cfg.repeats * len(modes) * (cfg.warmup + cfg.steps)
    trainees, runners = {}, {}
    for name in names:
        trainee = build_trainee(compose("benchmark", overrides=[*overrides, f"attention={name}"]), bench, total_steps)
        trainees[name] = trainee
        for compiled in modes:
            runners[name, compiled] = maybe_compile(trainee.model, compiled)
    samples = {key: {"train": [], "infer": [], "train_mib": [], "infer_mib": []} for key in runners}
    for r in range(cfg.repeats):
        for compiled in modes:
            for name in names:
                trainee, model, s = trainees[name], runners[name, compiled], samples[name, compiled]
                if compiled and r == 0:
                    log.info("compiling %s for train and eval (in the warm-up; a minute or so on a CPU)", name)
                rate, mib = timed(
                    bench, partial(train_steps, model, trainee, bench), partial(train_bytes, trainee, bench)
                )
                s["train"].append(rate)
                s["train_mib"].append(mib)
                rate, mib = timed(bench, partial(infer_steps, model, bench), partial(infer_bytes, trainee, bench))
                s["infer"].append(rate)
                s["infer_mib"].append(mib)
                log.info(
                    "[%d/%d] %s %s: train %.0f img/s, infer %.0f img/s",
                    r + 1, cfg.repeats, MODES[compiled], name, s["train"][-1], s["infer"][-1],
                )  # fmt: skip
    rows = []
    for compiled in modes:
        base = samples["none", compiled]
        for name in names:
            own = samples[name, compiled]
            m = {k: median(v) for k, v in own.items()}
            log.info(
                "%s %s: train vs none per repeat %s", MODES[compiled], name,
                " ".join(f"{r:.3f}" for r in repeat_ratios(own["train"], base["train"])),
            )  # fmt: skip
            rows.append(
                {
                    "attention": name,
                    "mode": MODES[compiled],
                    "train img/s": m["train"],
                    "train vs none": paired_ratio(own["train"], base["train"]),
                    "infer img/s": m["infer"],
                    "infer vs none": paired_ratio(own["infer"], base["infer"]),
                    "train peak MiB": m["train_mib"],
                    "infer peak MiB": m["infer_mib"],
                }
            )
    return rows


def step_section(cfg: DictConfig, bench: Bench, modes: list[bool]) -> list[dict]:
    """Our step (train_one_epoch with real StepParts) against the bare loop: one model, optimizer and
    batch, alternating (ours first in even repeats, bare first in odd ones) `repeats` times."""
    # grad_clip, log_every_n_steps and max_nonfinite_steps as train.py uses them by default
    trainer = compose("trainer/default").trainer
    trainee = build_trainee(cfg, bench, total_steps=cfg.repeats * len(modes) * 2 * (cfg.warmup + cfg.steps))

    def ours(parts: StepParts, n: int) -> None:
        # The global step carries over, so the loss is logged (a host sync) every log_every steps as in training.
        trainee.meter = EpochMeter()
        train_one_epoch(
            parts,
            trainee,
            RepeatedBatch(bench.x, bench.y, n),
            device=bench.device,
            on_step_log=lambda metrics, step: None,
            should_stop=lambda: False,
            warmup_steps=0,  # its own img/s window is not used: the whole call is timed from outside
        )

    def bare(model: nn.Module, n: int) -> None:
        model.train()
        bare_steps(model, trainee, bench, n)

    rows = []
    for compiled in modes:
        model = maybe_compile(trainee.model, compiled)
        parts = StepParts(
            model=model,
            criterion=nn.CrossEntropyLoss(),
            autocast=bench.autocast,
            channels_last=bench.channels_last,
            grad_clip=trainer.grad_clip,
            mixup=None,
            log_every=trainer.log_every_n_steps,
            max_nonfinite=trainer.max_nonfinite_steps,
        )
        if compiled:
            log.info("compiling the step section's model (in the warm-up)")
        rates = {"ours": [], "bare": []}
        runs = {"ours": partial(ours, parts), "bare": partial(bare, model)}
        for r in range(cfg.repeats):
            for which in ("ours", "bare") if r % 2 == 0 else ("bare", "ours"):
                rates[which].append(timed(bench, runs[which])[0])
            log.info(
                "[%d/%d] %s step: ours %.0f img/s, bare %.0f img/s",
                r + 1, cfg.repeats, MODES[compiled], rates["ours"][-1], rates["bare"][-1],
            )  # fmt: skip
        rows.append(
            {
                "mode": MODES[compiled],
                "our step img/s": median(rates["ours"]),
                "bare loop img/s": median(rates["bare"]),
                "ours / bare": paired_ratio(rates["ours"], rates["bare"]),
            }
        )
    return rows


def loader_section(cfg: DictConfig, bench: Bench, model_rate: float) -> tuple[list[dict], list[str]]:
    """img/s of the train loaders over `loader_batches` batches of an epoch, in turn `repeats` times, and
    each as a multiple of the model's train img/s. Returns the rows and notes (what was skipped)."""
    try:
        data = load_source(cfg.data)
    except DataError as e:
        return [], [f"Loader section skipped: {e}"]
    setups = [("memory", 0), ("torch", cfg.data.num_workers)] + [("torch", 0)] * (cfg.data.num_workers > 0)
    loaders, notes = {}, []
    for kind, workers in setups:
        data_cfg = OmegaConf.merge(cfg.data, {"loader": kind, "num_workers": workers, "batch_size": cfg.batch_size})
        try:
            loaders[kind, workers] = make_loaders(data, data_cfg, device=bench.device, seed=0)[0]
        except DataError as e:  # e.g. ImageNet does not fit in memory
            notes.append(f"data.loader={kind} skipped: {e}")
    n = {key: min(len(loader), cfg.loader_batches or len(loader)) for key, loader in loaders.items()}

    def run(key: tuple[str, int], epoch: int, batches: int) -> None:
        for _ in zip(range(batches), loaders[key].epoch(epoch), strict=False):  # range first: no extra batch drawn
            pass
        bench.sync()

    rates = {key: [] for key in loaders}
    for key in loaders:
        run(key, epoch=0, batches=bench.warmup)  # worker start-up and first touches, untimed
    for r in range(cfg.repeats):
        for key in loaders:
            start = time.perf_counter()
            run(key, epoch=r + 1, batches=n[key])  # a fresh epoch: its shuffle and augmentation draws count
            rates[key].append(n[key] * cfg.batch_size / (time.perf_counter() - start))
        done = ", ".join(f"{kind}/{workers} workers {v[-1]:.0f} img/s" for (kind, workers), v in rates.items())
        log.info("[%d/%d] loaders: %s", r + 1, cfg.repeats, done)
    rows = []
    for (kind, workers), values in rates.items():
        rate = median(values)
        rows.append(
            {
                "loader": f"{kind} ({'on the device' if kind == 'memory' else 'torchvision DataLoader'})",
                "workers": workers if kind == "torch" else "n/a",
                "batches": n[kind, workers],
                "img/s": rate,
                "x model train img/s": rate / model_rate,
            }
        )
    return rows, notes


def targets(
    cfg: DictConfig, device: torch.device, variants: list[dict], steps: list[dict], loaders: list[dict]
) -> list[str]:
    """Each target with the measured value and ✓/✗, or "n/a here" where it is about another device or model."""
    model = HydraConfig.get().runtime.choices["model"]

    def check(value: float, target: float, digits: int = 3, unit: str = "") -> str:
        return f"{value:.{digits}f}{unit} {'✓' if value >= target else '✗'}"

    lines = [
        f"our step / bare loop ≥ {STEP_TARGET} ({row['mode']}): {check(row['ours / bare'], STEP_TARGET)}"
        for row in steps
    ]
    what = f"in-memory loader ≥ {LOADER_TARGET:g}x the model's train img/s (CPU)"
    memory = next((row["x model train img/s"] for row in loaders if row["loader"].startswith("memory")), None)
    if memory is None:
        lines.append(f"{what}: n/a here (loader section skipped)")
    elif device.type != "cpu":
        lines.append(f"{what}: n/a here (not a CPU; measured {memory:.1f}x)")
    else:
        lines.append(f"{what}: {check(memory, LOADER_TARGET, 1, 'x')}")

    what = f"CBAM / none train throughput ≥ {CBAM_TARGET}"
    cbam = {row["mode"]: row["train vs none"] for row in variants if row["attention"] == "cbam"}
    amp = cfg.precision != "fp32" and cfg.channels_last and cfg.data.image_size == 224
    for scope, applies, needs in [
        ("ResNet-20, CPU", device.type == "cpu" and model == "resnet20", "model=resnet20 on a CPU"),
        (
            "ResNet-50, GPU, AMP, channels_last",
            device.type == "cuda" and model == "resnet50" and amp,
            "model=resnet50 at 224 px on a GPU with precision=bf16 or fp16 and channels_last=true",
        ),
    ]:
        if not applies:
            lines.append(f"{what} ({scope}): n/a here (needs {needs})")
        elif not cbam:
            lines.append(f"{what} ({scope}): n/a here (cbam is not among the variants)")
        else:
            lines += [f"{what} ({scope}, {mode}): {check(v, CBAM_TARGET)}" for mode, v in cbam.items()]
    return lines


# ---------------------------------------------------------------------------------------------- output


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def formatted(rows: list[dict]) -> list[dict]:
    """Rates as whole img/s, ratios to 3 decimals, MiB whole; None (not measured) as n/a."""

    def fmt(column: str, value) -> str:
        if value is None:
            return "n/a¹" if "MiB" in column else "n/a"
        if not isinstance(value, float):
            return str(value)
        if "x model" in column:
            return f"{value:.1f}x"
        if " vs " in column or " / " in column:
            return f"{value:.3f}"
        return f"{value:,.0f}"

    return [{c: fmt(c, v) for c, v in row.items()} for row in rows]


def variant_names(cfg: DictConfig) -> list[str]:
    if cfg.variants is None:  # every preset, as model_stats.py
        return sorted(GlobalHydra.instance().config_loader().get_group_options("attention"))
    return cfg.variants.split(",") if isinstance(cfg.variants, str) else list(cfg.variants)


def validate(cfg: DictConfig, names: list[str]) -> list[bool]:
    """The compile modes to run; ConfigError on bad input."""
    for key in ("batch_size", "steps", "repeats"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]} must be a positive integer")
    if not isinstance(cfg.warmup, int) or cfg.warmup < 0:
        raise ConfigError(f"warmup={cfg.warmup} must be an integer >= 0")
    if cfg.loader_batches is not None and (not isinstance(cfg.loader_batches, int) or cfg.loader_batches < 1):
        raise ConfigError(f"loader_batches={cfg.loader_batches} must be a positive integer or null (one epoch)")
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"precision={cfg.precision!r} is unknown: use one of {', '.join(PRECISIONS)}")
    modes = [cfg.compile] if isinstance(cfg.compile, bool) else list(cfg.compile)
    if not modes or not all(isinstance(m, bool) for m in modes):
        raise ConfigError(f"compile={cfg.compile} must list false (eager) and/or true (compiled): e.g. compile=[false]")
    if True in modes and cfg.warmup < 1:
        raise ConfigError("compile=[...true] needs warmup >= 1, so that compilation happens outside the timed steps")
    known = GlobalHydra.instance().config_loader().get_group_options("attention")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"variants: {', '.join(unknown)} not in conf/attention/ (there: {', '.join(sorted(known))})")
    return list(dict.fromkeys(modes))


@hydra.main(version_base="1.3", config_path="../conf", config_name="benchmark")
@entry_point
def main(cfg: DictConfig) -> None:
    names = list(dict.fromkeys(["none", *variant_names(cfg)]))  # the baseline first: every ratio needs it
    modes = validate(cfg, names)
    try:
        device = resolve_device(cfg.device)
    except ConfigError:
        raise ConfigError(f"device={cfg.device} is unknown or not available here: use auto, cpu or cuda") from None
    torch.manual_seed(0)
    x = torch.randn(cfg.batch_size, cfg.data.in_chans, cfg.data.image_size, cfg.data.image_size, device=device)
    bench = Bench(
        device=device,
        autocast=autocast_kwargs(device, cfg.precision),
        fp16=cfg.precision == "fp16",
        channels_last=cfg.channels_last,
        x=x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x,
        y=torch.randint(cfg.data.num_classes, (cfg.batch_size,), device=device),
        steps=cfg.steps,
        warmup=cfg.warmup,
    )
    if True in modes:
        allow_recompiles(len(names) + 1)  # the variants' models and the step section's
    choices = HydraConfig.get().runtime.choices
    model_name, attention = choices["model"], choices["attention"]

    log.info("section 1/3: %d variants x %s, %d repeats", len(names), "+".join(MODES[m] for m in modes), cfg.repeats)
    variant_rows = variant_section(cfg, bench, names, modes)
    log.info("section 2/3: our step vs the bare loop (%s + %s)", model_name, attention)
    step_rows = step_section(cfg, bench, modes)
    model_rate = step_rows[0]["bare loop img/s"]
    loader_rows, loader_notes = [], ["Loader section skipped (loader=false)."]
    if cfg.loader:
        log.info("section 3/3: loaders on %s's train split", cfg.data.name)
        loader_rows, loader_notes = loader_section(cfg, bench, model_rate)

    size = f"{cfg.data.in_chans}x{cfg.data.image_size}x{cfg.data.image_size}"
    print(
        f"Device: {device_name(device)}; torch {torch.__version__}; model {model_name} ({cfg.model.block} blocks "
        f"{list(cfg.model.layers)}, {cfg.model.stem} stem); input {size} random tensors, {cfg.data.num_classes} "
        f"classes (data={cfg.data.name}'s shape); batch {cfg.batch_size}; precision {cfg.precision}; "
        f"channels_last {str(cfg.channels_last).lower()}; {cfg.steps} timed steps after {cfg.warmup} warm-up, "
        f"median of {cfg.repeats} interleaved repeats (ratios: median of the per-repeat ratios); "
        f"optimizer {cfg.optim.optimizer._target_.rsplit('.', 1)[-1]}."
    )
    print(
        "\nPer variant. Train: forward, backward, optimizer and LR-scheduler step on one batch; infer: eval mode, "
        "no_grad. Ratios to `none` in the same mode.\n"
    )
    print(markdown_table(formatted(variant_rows), VARIANT_COLUMNS))
    if device.type != "cuda":
        print(f"\n{CPU_MEMORY_NOTE}")
    print(
        f"\nOur training step (cbam.engine.loop.train_one_epoch, StepParts as train.py builds them) against a "
        f"bare PyTorch loop: {model_name} + {attention}, the same batch, optimizer and LR scheduler.\n"
    )
    print(markdown_table(formatted(step_rows), STEP_COLUMNS))
    if loader_rows:
        print(
            f"\nLoaders: {cfg.data.name}'s train split, augmented, batch {cfg.batch_size}; multiples of the model's "
            f"train img/s ({model_rate:,.0f}: {model_name} + {attention}, {MODES[modes[0]]}, the bare loop above).\n"
        )
        print(markdown_table(formatted(loader_rows), LOADER_COLUMNS))
    for note in loader_notes:
        print(f"\n{note}")
    print("\nTargets:\n")
    print("\n".join(f"- {line}" for line in targets(cfg, device, variant_rows, step_rows, loader_rows)))

    if cfg.csv:
        out = Path(cfg.csv)
        write_csv(out / "variants.csv", variant_rows, VARIANT_COLUMNS)
        write_csv(out / "step.csv", step_rows, STEP_COLUMNS)
        if loader_rows:
            write_csv(out / "loader.csv", loader_rows, LOADER_COLUMNS)
        log.info("CSV written to %s", out)


if __name__ == "__main__":
    run_hydra(main)
