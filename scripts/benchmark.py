"""Speed on the current device, measured in one run and printed as Markdown tables:

1. per attention variant and mode: train and inference img/s, their ratio to `none` in that mode;
2. our training step (`cbam.engine.loop.train_one_epoch`) against a bare PyTorch loop, in each mode;
3. the in-memory loader against torchvision's DataLoader, each as a multiple of the model's train img/s;
4. the attention op alone, per input shape the model gives it: forward and backward of the fused CPU kernel
   and of the composite PyTorch path, in ms and in memory passes over the input (`op=false` skips it);

then the README's targets, each with the measured value, the spread of its per-repeat values and whether
it is met here.

    python scripts/benchmark.py                                   # CIFAR ResNet-20, 1x28x28: fp32, auto, auto+compile
    python scripts/benchmark.py variants=[none,cbam] modes=[fp32,auto] repeats=3   # a quick look
    python scripts/benchmark.py csv=bench/                        # also variants.csv, step.csv, loader.csv, op.csv
    # GPU: ResNet-50 at 224 px and CIFAR ResNet-18 at 32 px, bf16 + channels_last, eager and compiled
    python scripts/benchmark.py model=resnet50 data=imagenet modes=[bf16+cl,bf16+cl+compile]
    python scripts/benchmark.py model=resnet18 data=cifar10 modes=[bf16+cl,bf16+cl+compile]

A mode is `<precision>[+cl][+compile]`: fp32 | bf16 | fp16, `cl` for channels_last, `compile` for
torch.compile; `auto` is what train.py's trainer.precision/channels_last=auto choose on this device (the
fast path), `auto+compile` the same compiled. Sections 1 and 2 feed random tensors of the data config's
shape (in_chans, image_size, num_classes) that live on the device, so data=imagenet needs no ImageNet.
Section 3 reads the dataset's train split and is skipped with a note when the dataset is not there.

Rows are measured in turn, `repeats` times: rates are the medians, each ratio the median of the ratios
measured within one repeat, printed with the range of those per-repeat ratios. Rates come from wall time
and from the process's CPU time (per thread): on a shared machine other processes lower the first, not the
second. Markdown goes to stdout, progress to stderr. Exit status: 0 done, 2 bad input.
"""

import logging
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import hydra
import torch
import torch.nn.functional as F
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch import nn

from cbam.attention import ChannelSpatialAttention
from cbam.cli import attention_presets, entry_point, run_hydra
from cbam.data.build import load_source, make_loaders
from cbam.data.sources import DataError
from cbam.engine.device import PRECISIONS, autocast_kwargs, choose_fast_path, cpu_name, resolve_device
from cbam.engine.loop import StepParts, train_one_epoch
from cbam.engine.optim import build_optimizer
from cbam.engine.records import output_dir
from cbam.engine.state import EpochMeter, TrainState
from cbam.errors import ConfigError, instantiate_config
from cbam.models import build_model
from cbam.models.resnet import BLOCKS
from cbam.report.render import markdown_table, write_csv

log = logging.getLogger("benchmark")

# The targets (README): CBAM's train throughput vs none's, eager fp32 and in the fastest mode; the fastest
# mode's CBAM vs eager fp32's; our step vs the bare loop; the in-memory loader vs the model on a CPU.
CBAM_EAGER_TARGET, CBAM_FASTEST_TARGET, FASTEST_GAIN_TARGET = 0.85, 0.90, 2.0
STEP_TARGET, LOADER_TARGET = 0.98, 20.0
VARIANT_COLUMNS = ["attention", "mode", "train img/s", "train img/s (CPU time)", "train vs none", "infer img/s"]
VARIANT_COLUMNS += ["infer vs none", "train peak MiB"]
STEP_COLUMNS = ["mode", "our step img/s", "bare loop img/s", "ours / bare"]
LOADER_COLUMNS = ["loader", "workers", "batches", "img/s", "x model train img/s"]
OP_COLUMNS = ["mode", "input", "blocks", "path", "forward ms", "backward ms", "fwd + bwd in passes", "ms per step"]
OP_COLUMNS += ["time vs kernel"]
CPU_MEMORY_NOTE = (
    "¹ Peak memory is measured on CUDA only (the caching allocator's peak per measurement); a CPU has no "
    "such counter, and the process's max RSS would mix every variant's."
)


@dataclass(frozen=True)
class Mode:
    name: str  # as given: "fp32", "auto+compile", "bf16+cl"
    precision: str
    channels_last: bool
    compile: bool

    @property
    def layout(self) -> tuple[str, bool]:
        """What a model is built for: modes that differ only in compile share their models."""
        return self.precision, self.channels_last

    def describe(self) -> str:
        layout = "NHWC" if self.channels_last else "NCHW"
        return f"{self.precision}, {layout}, {'compiled' if self.compile else 'eager'}"


def parse_mode(text: str, device: torch.device) -> Mode:
    precision, *flags = str(text).split("+")
    unknown = [f for f in flags if f not in ("cl", "compile")]
    if unknown or (precision not in PRECISIONS and precision != "auto"):
        raise ConfigError(
            f"modes: {text!r} is not a mode: use <fp32|bf16|fp16|auto>[+cl][+compile], e.g. modes=[fp32,auto+compile]"
        )
    if precision == "auto":  # train.py's fast path for this device
        auto = OmegaConf.create({"precision": "auto", "channels_last": "auto", "compile": False})
        fast = choose_fast_path(auto, device)
        return Mode(str(text), fast.precision, fast.channels_last or "cl" in flags, "compile" in flags)
    return Mode(str(text), precision, "cl" in flags, "compile" in flags)


@dataclass
class Bench:
    """What every measurement in one mode shares: the device, the numerics and one fixed batch on the device."""

    mode: Mode
    device: torch.device
    x: torch.Tensor  # (B, C, H, W) standard normal, like normalised images, in the mode's layout
    y: torch.Tensor  # (B,) random labels
    steps: int
    warmup: int

    @property
    def autocast(self) -> dict:
        return autocast_kwargs(self.device, self.mode.precision)

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def batch_bytes(self) -> int:
        return tensor_bytes([self.x, self.y])


@dataclass
class Sample:
    """One timed measurement."""

    wall: float  # img/s by the clock
    cpu: float  # img/s by the process's CPU time, per thread
    peak_mib: float | None


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
    return None if not values or None in values else statistics.median(values)


def repeat_ratios(values: list[float], bases: list[float]) -> list[float]:
    """value / base for each repeat, both measured in that repeat."""
    return [v / b for v, b in zip(values, bases, strict=True)]


@dataclass(frozen=True)
class Ratio:
    """The median of per-repeat ratios, and their range: a slow drift of the machine (this project's shared
    CPU moves 10-20% over minutes) hits both sides of each pair alike and cancels; the range shows what is left."""

    median: float
    low: float
    high: float
    per_repeat: tuple[float, ...]
    digits: int = 3  # ratios near the targets to 0.001; the loader's multiple of the model (~300x) to 0.1

    @classmethod
    def of(cls, values: list[float], bases: list[float], digits: int = 3) -> "Ratio":
        r = repeat_ratios(values, bases)
        return cls(statistics.median(r), min(r), max(r), tuple(r), digits)

    def __str__(self) -> str:
        d = self.digits
        return f"{self.median:.{d}f} [{self.low:.{d}f}–{self.high:.{d}f}]"

    def verdict(self, target: float) -> str:
        met = sum(r >= target for r in self.per_repeat)
        mark = "✓" if self.median >= target else "✗"
        return f"{self} {mark} ({met} of {len(self.per_repeat)} repeats at or above {target:g})"


# ---------------------------------------------------------------------------------------------- measuring


def timed(bench: Bench, run: Callable[[int], None], resident: Callable[[], int] = lambda: 0) -> Sample:
    """img/s of `run(bench.steps)`, after `run(bench.warmup)` outside the timed region (compilation,
    cudnn's algorithm search, the allocator's first blocks).

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
    start, start_cpu = time.perf_counter(), time.process_time()
    run(bench.steps)
    bench.sync()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    peak = (torch.cuda.max_memory_allocated(bench.device) - start_bytes + resident()) / 2**20 if cuda else None
    images = bench.steps * bench.batch
    threads = torch.get_num_threads() if bench.device.type == "cpu" else 1
    return Sample(images / seconds, images / (cpu_seconds / threads), peak)


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
    if bench.mode.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg.optim, model)
    # One "epoch" spanning every step this optimizer takes here, so that any schedule lasts the whole
    # benchmark (onecycle refuses to step past its end).
    scheduler = instantiate_config(cfg.optim.scheduler, "optim.scheduler")(
        optimizer, steps_per_epoch=total_steps, epochs=1
    )
    scaler = torch.amp.GradScaler(bench.device.type, enabled=bench.mode.precision == "fp16")
    return TrainState(model, optimizer, scheduler, scaler, ema=None, config={}, steps_per_epoch=total_steps)


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


def make_bench(cfg: DictConfig, mode: Mode, device: torch.device) -> Bench:
    g = torch.Generator().manual_seed(0)  # the same batch in every mode
    x = torch.randn(cfg.batch_size, cfg.data.in_chans, cfg.data.image_size, cfg.data.image_size, generator=g)
    y = torch.randint(cfg.data.num_classes, (cfg.batch_size,), generator=g)
    x = x.to(device).contiguous(memory_format=torch.channels_last if mode.channels_last else torch.contiguous_format)
    return Bench(mode, device, x, y.to(device), cfg.steps, cfg.warmup)


def variant_section(cfg: DictConfig, benches: list[Bench], names: list[str]) -> tuple[list[dict], dict]:
    """Train and inference img/s of each variant in each mode, in turn `repeats` times. Returns the rows and
    the per-repeat train rates {(name, mode name): [img/s, ...]} the targets are computed from."""
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith(("attention=", "variants="))]
    total_steps = cfg.repeats * len(benches) * (cfg.warmup + cfg.steps)
    trainees, runners = {}, {}
    for name in names:
        variant_cfg = compose("benchmark", overrides=[*overrides, f"attention={name}"])
        for bench in benches:
            key = (name, bench.mode.layout)
            if key not in trainees:  # modes that differ only in compile share a model
                trainees[key] = build_trainee(variant_cfg, bench, total_steps)
            runners[name, bench.mode.name] = maybe_compile(trainees[key].model, bench.mode.compile)
    samples = {key: {"train": [], "infer": []} for key in runners}
    for r in range(cfg.repeats):
        for bench in benches:
            for name in names:
                trainee, model = trainees[name, bench.mode.layout], runners[name, bench.mode.name]
                s = samples[name, bench.mode.name]
                if bench.mode.compile and r == 0:
                    log.info("compiling %s for train and eval (in the warm-up; a minute or so on a CPU)", name)
                s["train"].append(
                    timed(bench, partial(train_steps, model, trainee, bench), partial(train_bytes, trainee, bench))
                )
                s["infer"].append(timed(bench, partial(infer_steps, model, bench)))
                log.info(
                    "[%d/%d] %s %s: train %.0f img/s, infer %.0f img/s", r + 1, cfg.repeats, bench.mode.name, name,
                    s["train"][-1].wall, s["infer"][-1].wall,
                )  # fmt: skip
    rows, train_rates = [], {}
    for bench in benches:
        base = samples["none", bench.mode.name]
        for name in names:
            own = samples[name, bench.mode.name]
            train = [x.wall for x in own["train"]]
            train_rates[name, bench.mode.name] = train
            rows.append(
                {
                    "attention": name,
                    "mode": bench.mode.name,
                    "train img/s": median(train),
                    "train img/s (CPU time)": median([x.cpu for x in own["train"]]),
                    "train vs none": Ratio.of(train, [x.wall for x in base["train"]]),
                    "infer img/s": median([x.wall for x in own["infer"]]),
                    "infer vs none": Ratio.of([x.wall for x in own["infer"]], [x.wall for x in base["infer"]]),
                    "train peak MiB": median([x.peak_mib for x in own["train"]]),
                }
            )
    return rows, train_rates


def step_section(cfg: DictConfig, benches: list[Bench]) -> tuple[list[dict], dict[str, list[float]]]:
    """Our step (train_one_epoch with real StepParts) against the bare loop, in each mode: one model,
    optimizer and batch, alternating (ours first in even repeats, bare first in odd ones) `repeats` times.
    Returns the rows and each mode's bare-loop img/s per repeat."""
    # grad_clip, log_every_n_steps and max_nonfinite_steps as train.py uses them by default
    trainer = compose("trainer/default").trainer
    rows, bare_rates = [], {}
    for bench in benches:
        trainee = build_trainee(cfg, bench, total_steps=cfg.repeats * 2 * (cfg.warmup + cfg.steps))
        model = maybe_compile(trainee.model, bench.mode.compile)
        parts = StepParts(
            model=model, criterion=nn.CrossEntropyLoss(), autocast=bench.autocast,
            channels_last=bench.mode.channels_last, grad_clip=trainer.grad_clip, mixup=None,
            log_every=trainer.log_every_n_steps, max_nonfinite=trainer.max_nonfinite_steps,
        )  # fmt: skip

        def ours(n: int, parts=parts, trainee=trainee, bench=bench) -> None:
            # The global step carries over, so the loss is logged every log_every steps as in training.
            trainee.meter = EpochMeter()
            train_one_epoch(
                parts, trainee, RepeatedBatch(bench.x, bench.y, n), device=bench.device,
                on_step_log=lambda metrics, step: None, should_stop=lambda: False,
                warmup_steps=0,  # its own img/s window is not used: the whole call is timed from outside
            )  # fmt: skip

        def bare(n: int, model=model, trainee=trainee, bench=bench) -> None:
            model.train()
            bare_steps(model, trainee, bench, n)

        if bench.mode.compile:
            log.info("compiling the step section's model (in the warm-up)")
        rates = {"ours": [], "bare": []}
        for r in range(cfg.repeats):
            for which in ("ours", "bare") if r % 2 == 0 else ("bare", "ours"):
                rates[which].append(timed(bench, ours if which == "ours" else bare).wall)
            log.info(
                "[%d/%d] %s step: ours %.0f img/s, bare %.0f img/s",
                r + 1, cfg.repeats, bench.mode.name, rates["ours"][-1], rates["bare"][-1],
            )  # fmt: skip
        rows.append(
            {
                "mode": bench.mode.name,
                "our step img/s": median(rates["ours"]),
                "bare loop img/s": median(rates["bare"]),
                "ours / bare": Ratio.of(rates["ours"], rates["bare"]),
            }
        )
        bare_rates[bench.mode.name] = rates["bare"]
    return rows, bare_rates


def loader_section(cfg: DictConfig, bench: Bench, model_rates: list[float]) -> tuple[list[dict], list[str]]:
    """img/s of the train loaders over `loader_batches` batches of an epoch, in turn `repeats` times, and
    each as a multiple of the model's train img/s (repeat r's loader over the model's repeat r: the two are
    not interleaved, so the range holds the drift between the sections too). Returns the rows and notes (what
    was skipped)."""
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
                "x model train img/s": Ratio.of(values, model_rates, digits=1),
            }
        )
    return rows, notes


def attention_inputs(model: nn.Module, bench: Bench) -> dict[tuple, tuple[nn.Module, int]]:
    """Each distinct input (shape, dtype, whether it ends a residual block) of the model's attention modules
    on the bench's batch: one module that sees it, and how many do. A block's attention is passed the block's
    shortcut (cbam.models.resnet.residual_end), except while a hook watches it, as these do."""
    found: dict[tuple, tuple[nn.Module, int]] = {}
    ends_block = {id(block.attn) for block in model.modules() if isinstance(block, tuple(BLOCKS.values()))}

    def record(module, args):
        key = (tuple(args[0].shape), args[0].dtype, id(module) in ends_block)
        first, count = found.get(key, (module, 0))
        found[key] = (first, count + 1)

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, ChannelSpatialAttention)]
    with torch.no_grad(), torch.autocast(**bench.autocast):
        model(bench.x)
    for hook in hooks:
        hook.remove()
    return found


def op_seconds(run: Callable, x: torch.Tensor, bench: Bench) -> tuple[float, float]:
    """Seconds per forward and per backward of `run(x)` (as training calls it: under the mode's autocast,
    building the graph), each the mean over bench.steps calls after bench.warmup untimed ones."""
    x = x.detach().requires_grad_()
    with torch.autocast(**bench.autocast):
        grad = torch.randn_like(run(x))
    forward = backward = 0.0
    for i in range(bench.warmup + bench.steps):
        bench.sync()
        start = time.perf_counter()
        with torch.autocast(**bench.autocast):
            out = run(x)
        bench.sync()
        middle = time.perf_counter()
        out.backward(grad)
        bench.sync()
        if i >= bench.warmup:
            forward, backward = forward + middle - start, backward + time.perf_counter() - middle
    return forward / bench.steps, backward / bench.steps


def pass_seconds(x: torch.Tensor, bench: Bench) -> float:
    """One memory pass over x: a copy (a read and a write of it), per call."""
    for _ in range(bench.warmup):
        x.clone()
    bench.sync()
    start = time.perf_counter()
    for _ in range(bench.steps):
        x.clone()
    bench.sync()
    return (time.perf_counter() - start) / bench.steps


@dataclass(frozen=True)
class OpCase:
    """One input of the attention op: a module of the model that sees it, and how many blocks do; with the
    block's shortcut where the block passes it (the op then ends the block: relu(gated + shortcut))."""

    bench: Bench
    x: torch.Tensor
    shortcut: torch.Tensor | None
    module: nn.Module
    blocks: int

    def paths(self) -> dict[str, Callable]:
        """The fused kernel where it serves this input, and the composite path (op by op; with a shortcut,
        followed by the sum and the relu as ops), as training calls them."""
        module, shortcut = self.module, self.shortcut
        found = {"composite": lambda x: module.composite(x, shortcut)}
        if module.kernel_args(self.x, shortcut) is not None:
            found = {"kernel": lambda x: module(x, shortcut), **found}
        return found


def op_section(cfg: DictConfig, benches: list[Bench]) -> tuple[list[dict], list[str]]:
    """The attention's op per input shape, eager (a compiled graph calls the same op), in each layout: the
    fused kernel where it serves the input, and the composite path, in turn `repeats` times."""
    layouts = list({b.mode.layout: b for b in benches if not b.mode.compile}.values())
    if not layouts:
        return [], ["Attention op section skipped: it times eager modes, and every mode here is compiled."]
    cases = []
    for bench in layouts:
        model = build_model(cfg).to(bench.device).train()
        if bench.mode.channels_last:
            model = model.to(memory_format=torch.channels_last)
        for (shape, dtype, with_shortcut), (module, blocks) in attention_inputs(model, bench).items():
            g = torch.Generator().manual_seed(0)
            fmt = torch.channels_last if bench.mode.channels_last else torch.contiguous_format
            x, shortcut = (
                torch.randn(shape, generator=g).to(bench.device, dtype).contiguous(memory_format=fmt) for _ in range(2)
            )
            cases.append(OpCase(bench, x, shortcut if with_shortcut else None, module, blocks))
    if not cases:
        return [], ["Attention op section skipped: this attention puts no ChannelSpatialAttention in the model."]
    times = {}  # (case index, path) -> [(forward s, backward s), ...]; (case index, "pass") -> [s, ...]
    for r in range(cfg.repeats):
        for i, case in enumerate(cases):
            for path, run in case.paths().items():
                times.setdefault((i, path), []).append(op_seconds(run, case.x, case.bench))
            times.setdefault((i, "pass"), []).append(pass_seconds(case.x, case.bench))
        log.info("[%d/%d] attention op: %d input shapes", r + 1, cfg.repeats, len(cases))
    rows = []
    for i, case in enumerate(cases):
        one_pass = median(times[i, "pass"])
        kernel = [f + b for f, b in times.get((i, "kernel"), [])]
        for path in ("kernel", "composite"):
            if (i, path) not in times:
                continue
            measured = times[i, path]
            total = [f + b for f, b in measured]
            rows.append(
                {
                    "mode": case.bench.mode.name,
                    "input": f"{' x '.join(map(str, case.x.shape))} {str(case.x.dtype).removeprefix('torch.')}"
                    + (" + shortcut" if case.shortcut is not None else ""),
                    "blocks": case.blocks,
                    "path": path,
                    "forward ms": 1e3 * median([f for f, _ in measured]),
                    "backward ms": 1e3 * median([b for _, b in measured]),
                    "fwd + bwd in passes": median(total) / one_pass,
                    "ms per step": 1e3 * case.blocks * median(total),
                    "time vs kernel": Ratio.of(total, kernel) if kernel else None,
                }
            )
    return rows, []


def targets(benches: list[Bench], train_rates: dict, steps: list[dict], loaders: list[dict]) -> list[str]:
    """Each target with the measured value, its per-repeat range and ✓/✗, or "n/a here"."""
    lines = []
    device = benches[0].device
    model = HydraConfig.get().runtime.choices["model"]
    eager_fp32 = next((b.mode.name for b in benches if b.mode.layout == ("fp32", False) and not b.mode.compile), None)
    have_cbam = ("cbam", benches[0].mode.name) in train_rates
    if have_cbam:
        fastest = max(benches, key=lambda b: median(train_rates["cbam", b.mode.name])).mode.name
        if eager_fp32 is None:
            lines.append(f"CBAM / none train ≥ {CBAM_EAGER_TARGET} (eager fp32): n/a here (no fp32 eager mode)")
        else:
            ratio = Ratio.of(train_rates["cbam", eager_fp32], train_rates["none", eager_fp32])
            lines.append(
                f"CBAM / none train ≥ {CBAM_EAGER_TARGET} ({model}, eager fp32): {ratio.verdict(CBAM_EAGER_TARGET)}"
            )
        ratio = Ratio.of(train_rates["cbam", fastest], train_rates["none", fastest])
        lines.append(
            f"CBAM / none train ≥ {CBAM_FASTEST_TARGET} ({model}, fastest mode for cbam: {fastest}): "
            f"{ratio.verdict(CBAM_FASTEST_TARGET)}"
        )
        if eager_fp32 is not None and fastest != eager_fp32:
            gain = Ratio.of(train_rates["cbam", fastest], train_rates["cbam", eager_fp32])
            lines.append(
                f"fastest mode's CBAM train img/s ≥ {FASTEST_GAIN_TARGET}x eager fp32's ({fastest} / {eager_fp32}): "
                f"{gain.verdict(FASTEST_GAIN_TARGET)}"
            )
    else:
        lines.append("CBAM targets: n/a here (cbam is not among the variants)")
    for row in steps:
        lines.append(f"our step / bare loop ≥ {STEP_TARGET} ({row['mode']}): {row['ours / bare'].verdict(STEP_TARGET)}")
    what = f"in-memory loader ≥ {LOADER_TARGET:g}x the model's train img/s (CPU)"
    memory = next((row["x model train img/s"] for row in loaders if row["loader"].startswith("memory")), None)
    if memory is None:
        lines.append(f"{what}: n/a here (loader section skipped)")
    elif device.type != "cpu":
        lines.append(f"{what}: n/a here (not a CPU; measured {memory})")
    else:
        lines.append(f"{what}: {memory.verdict(LOADER_TARGET)}")
    return lines


# ---------------------------------------------------------------------------------------------- output


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def formatted(rows: list[dict]) -> list[dict]:
    """Rates as whole img/s, ratios with their per-repeat range, MiB whole; None (not measured) as n/a."""

    def fmt(column: str, value) -> str:
        if value is None:
            return "n/a¹" if "MiB" in column else "n/a"
        if isinstance(value, Ratio):
            return str(value)
        if not isinstance(value, float):
            return str(value)
        if "passes" in column:
            return f"{value:.1f}x"
        if "ms" in column.split():
            return f"{value:.3f}" if value < 10 else f"{value:,.1f}"
        return f"{value:,.0f}"

    return [{c: fmt(c, v) for c, v in row.items()} for row in rows]


def csv_rows(rows: list[dict]) -> list[dict]:
    return [{c: (v.median if isinstance(v, Ratio) else v) for c, v in row.items()} for row in rows]


def validate(cfg: DictConfig, device: torch.device) -> list[Mode]:
    """The modes to run; ConfigError on bad input."""
    for key in ("batch_size", "steps", "repeats"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]} must be a positive integer")
    if not isinstance(cfg.warmup, int) or cfg.warmup < 0:
        raise ConfigError(f"warmup={cfg.warmup} must be an integer >= 0")
    if cfg.loader_batches is not None and (not isinstance(cfg.loader_batches, int) or cfg.loader_batches < 1):
        raise ConfigError(f"loader_batches={cfg.loader_batches} must be a positive integer or null (one epoch)")
    texts = [cfg.modes] if isinstance(cfg.modes, str) else list(cfg.modes)
    if not texts:
        raise ConfigError("modes=[] measures nothing: e.g. modes=[fp32,auto]")
    modes = list({m.name: m for m in (parse_mode(t, device) for t in texts)}.values())
    if any(m.compile for m in modes) and cfg.warmup < 1:
        raise ConfigError("a +compile mode needs warmup >= 1, so that compilation happens outside the timed steps")
    return modes


@hydra.main(version_base="1.3", config_path="../conf", config_name="benchmark")
@entry_point
def main(cfg: DictConfig) -> None:
    names = attention_presets(cfg.variants)
    try:
        device = resolve_device(cfg.device)
    except ConfigError:
        raise ConfigError(f"device={cfg.device} is unknown or not available here: use auto, cpu or cuda") from None
    modes = validate(cfg, device)
    out = output_dir(cfg.csv, "csv") if cfg.csv else None  # before the minutes of measuring
    benches = [make_bench(cfg, mode, device) for mode in modes]
    if any(m.compile for m in modes):
        allow_recompiles(len(names) * len(modes) + len(modes))  # the variants' models and the step section's
    model_name, attention = HydraConfig.get().runtime.choices["model"], HydraConfig.get().runtime.choices["attention"]

    log.info("section 1/4: %d variants x %d modes, %d repeats", len(names), len(modes), cfg.repeats)
    variant_rows, train_rates = variant_section(cfg, benches, names)
    log.info("section 2/4: our step vs the bare loop (%s + %s)", model_name, attention)
    step_rows, bare_rates = step_section(cfg, benches)
    model_rate = step_rows[0]["bare loop img/s"]
    loader_rows, loader_notes = [], ["Loader section skipped (loader=false)."]
    if cfg.loader:
        log.info("section 3/4: loaders on %s's train split", cfg.data.name)
        loader_rows, loader_notes = loader_section(cfg, benches[0], bare_rates[modes[0].name])
    op_rows, op_notes = [], ["Attention op section skipped (op=false)."]
    if cfg.op:
        log.info("section 4/4: the attention op (%s) per input shape", attention)
        op_rows, op_notes = op_section(cfg, benches)

    size = f"{cfg.data.in_chans}x{cfg.data.image_size}x{cfg.data.image_size}"
    print(
        f"Device: {device_name(device)}; torch {torch.__version__}; model {model_name} ({cfg.model.block} blocks "
        f"{list(cfg.model.layers)}, {cfg.model.stem} stem); input {size} random tensors, {cfg.data.num_classes} "
        f"classes (data={cfg.data.name}'s shape); batch {cfg.batch_size}; {cfg.steps} timed steps after "
        f"{cfg.warmup} warm-up, median of {cfg.repeats} interleaved repeats (ratios: median of the per-repeat "
        f"ratios [their range]); optimizer {cfg.optim.optimizer._target_.rsplit('.', 1)[-1]}."
    )
    print("\nModes: " + "; ".join(f"`{m.name}` = {m.describe()}" for m in modes) + ".")
    print(
        "\nPer variant. Train: forward, backward, optimizer and LR-scheduler step on one batch; infer: eval mode, "
        "no_grad. Ratios to `none` in the same mode. CPU time: images per second of the process's CPU time per "
        "thread.\n"
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
            f"train img/s ({model_rate:,.0f}: {model_name} + {attention}, {modes[0].name}, the bare loop above), "
            "repeat by repeat: median [range].\n"
        )
        print(markdown_table(formatted(loader_rows), LOADER_COLUMNS))
    for note in loader_notes:
        print(f"\n{note}")
    if op_rows:
        print(
            f"\nThe attention op ({attention}) alone, per input shape {model_name} gives it (N x C x H x W, the "
            "train batch), eager, in each layout: forward under the mode's autocast and backward, as training "
            "runs them (+ shortcut: the op ends the residual block, relu(gated + shortcut), the sum and relu "
            "fused into the kernel's pass, and after the composite path as two ops); the fused CPU kernel where "
            "it serves the input, and the composite PyTorch path. Passes: "
            "forward + backward in units of one copy of the input (a read and a write of it). Per step: times "
            "the blocks that see this shape. Time vs kernel: the median of the per-repeat ratios.\n"
        )
        print(markdown_table(formatted(op_rows), OP_COLUMNS))
    for note in op_notes:
        print(f"\n{note}")
    print("\nTargets:\n")
    print("\n".join(f"- {line}" for line in targets(benches, train_rates, step_rows, loader_rows)))

    if out is not None:
        write_csv(out / "variants.csv", csv_rows(variant_rows), VARIANT_COLUMNS)
        write_csv(out / "step.csv", csv_rows(step_rows), STEP_COLUMNS)
        if loader_rows:
            write_csv(out / "loader.csv", csv_rows(loader_rows), LOADER_COLUMNS)
        if op_rows:
            write_csv(out / "op.csv", csv_rows(op_rows), OP_COLUMNS)
        log.info("CSV written to %s", out)


if __name__ == "__main__":
    run_hydra(main)
