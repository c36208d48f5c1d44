"""`torchrun --nproc_per_node=2 train.py` on CPU (gloo): one run dir, one W&B run, and the numbers of one
process with the same global batch."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
from conftest import ROOT, compose_config
from test_train import tree_digest
from torch import nn
from wandb_records import read_run

from cbam.attention.channel import DescriptorBatchNorm
from cbam.cli import torchrun_argv
from cbam.engine import distributed as dist
from cbam.engine.eval_checkpoint import evaluate_checkpoint
from cbam.engine.loop import StepChecks, StepParts
from cbam.engine.records import RunRecords
from cbam.engine.state import EpochMeter
from cbam.errors import ConfigError, Diverged

# 256 images, 8 steps an epoch: 2 processes x 16 against 1 x 32. A gentle lr: at the default 0.1 these
# nets, still at chance, blow float32 rounding up to 1e-4 in 16 steps and hide what is compared.
ARGS = [
    "data=synthetic", "data.source.train_size=256", "data.source.val_size=128", "trainer.epochs=2",
    "trainer.device=cpu", "logger.mode=offline", "optim.optimizer.lr=0.02", "trainer.log_every_n_steps=1",
    "trainer.precision=fp32",  # the comparison is at float32's rounding; bf16 (auto on CPUs that have it) is coarser
]  # fmt: skip
DDP = [*ARGS, "data.batch_size=16", "trainer.sync_bn=true"]
SINGLE = [*ARGS, "data.batch_size=32"]
LOSSES = ("train/loss", "val/loss")
ACCURACIES = ("train/top1", "val/top1", "val/top5")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def env(tmp: Path) -> dict:
    # One thread per process in both runs (torchrun's default for its workers), and a temp dir of our
    # own, to check that the ranks > 0 leave nothing behind.
    tmp.mkdir(exist_ok=True)
    return {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp)}


def train(*args: str, cwd: Path, launcher: list[str]) -> subprocess.CompletedProcess:
    cmd = [*launcher, str(ROOT / "train.py"), *args]
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env(cwd / "tmp"))
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tree(path: Path) -> set[str]:
    """Every path under `path`, less W&B's and the temp dir's (torchrun keeps its logs there)."""
    return {str(p.relative_to(path)) for p in path.rglob("*") if not {"wandb", "tmp"} & set(p.relative_to(path).parts)}


def leftover_rank_dirs(path: Path) -> list[Path]:
    return list((path / "tmp").glob("cbam-rank*"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Under one cwd: torchrun with 2 processes into the default run dir (`outputs/.../<time>`, which each
    process resolves on its own), and one process into `single/`."""
    cwd = tmp_path_factory.mktemp("runs")
    train(*DDP, cwd=cwd, launcher=TORCHRUN)
    train(*SINGLE, f"hydra.run.dir={cwd / 'single'}", cwd=cwd, launcher=[sys.executable])
    return cwd


def ddp_dir(runs: Path) -> Path:
    [run_dir] = (runs / "outputs" / "synthetic" / "resnet20" / "cbam-s0").iterdir()
    return run_dir


def test_two_processes_make_one_run_dir_and_one_wandb_run(runs):
    files = {"config.yaml", "metrics.jsonl", "summary.json", "last.pt", "best.pt", "train.log"}
    ddp = str(ddp_dir(runs).relative_to(runs))
    parents = {str(p) for p in Path(ddp).parents if str(p) != "."}
    assert tree(runs) == {ddp, *parents, "single", *(f"{d}/{f}" for d in (ddp, "single") for f in files)}
    assert not leftover_rank_dirs(runs)
    summary = json.loads((runs / ddp / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["run_dir"] == str(runs / ddp)
    wandb_run = read_run(runs / ddp)  # asserts there is exactly one
    assert wandb_run["id"] == summary["wandb_run_id"] and wandb_run["exit_code"] == 0
    assert [h["epoch"] for h in wandb_run["history"] if "val/top1" in h] == [0, 1]
    log = (runs / ddp / "train.log").read_text()
    assert "rank 0 of 2 on cpu (gloo)" in log and log.count("epoch 1/2") == 1  # rank 0's lines only


def test_two_processes_match_one_process_with_the_same_global_batch(runs):
    ddp, single = rows(ddp_dir(runs)), rows(runs / "single")
    assert [r["step"] for r in ddp] == [r["step"] for r in single] == [8, 16]
    for a, b in zip(ddp, single, strict=True):
        # Measured: 1e-7 apart; per-process BatchNorm (trainer.sync_bn=false) is 1e-4 apart in train loss.
        assert {k: a[k] for k in LOSSES} == pytest.approx({k: b[k] for k in LOSSES}, rel=1e-5)
        assert {k: a[k] for k in ACCURACIES} == {k: b[k] for k in ACCURACIES}
        assert a["train/img_per_s"] > 0 and a["val/img_per_s"] > 0


@pytest.mark.slow  # ~16 s: one more torchrun job
def test_without_sync_bn_each_process_keeps_its_own_batch_statistics(runs, tmp_path):
    train(*ARGS, "data.batch_size=16", "trainer.sync_bn=false", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
          launcher=TORCHRUN)  # fmt: skip
    local, synced = rows(tmp_path / "run"), rows(ddp_dir(runs))
    assert [r["step"] for r in local] == [r["step"] for r in synced]
    # Statistics over 16 images instead of 32 move the losses off the synced run's (measured: 1e-4 apart,
    # against 1e-7 between the synced run and one process), and the BatchNorm buffers with them.
    assert local[0]["train/loss"] != pytest.approx(synced[0]["train/loss"], rel=1e-5)
    assert local[-1]["train/loss"] == pytest.approx(synced[-1]["train/loss"], rel=0.05)
    ours = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    theirs = torch.load(ddp_dir(runs) / "last.pt", weights_only=True)["model"]
    assert not torch.allclose(ours["bn1.running_mean"], theirs["bn1.running_mean"], rtol=1e-5, atol=0)


@pytest.mark.slow  # ~30 s: one more torchrun job
def test_a_torchrun_run_without_sync_bn_evaluates_what_it_saves(tmp_path):
    """Each rank evaluates its share of val with rank 0's BatchNorm statistics, which last.pt holds (after a
    step each rank's own differ by its batch): eval.py of last.pt gives the run's val numbers."""
    learned = [a for a in ARGS if not a.startswith(("optim.optimizer.lr=", "data.source.train_size="))]
    run_dir = tmp_path / "run"
    train(*learned, "data.source.train_size=1024", "data.batch_size=16", "trainer.sync_bn=false",
          f"hydra.run.dir={run_dir}", cwd=tmp_path, launcher=TORCHRUN)  # fmt: skip
    last = rows(run_dir)[-1]
    assert last["val/top1"] > 50  # learned: the statistics matter (at chance the loss is ln 10 whatever they are)
    evaluated = evaluate_checkpoint(
        compose_config("eval", f"checkpoint={run_dir / 'last.pt'}", "device=cpu", "wandb=false")
    )
    assert evaluated["val/loss"] == pytest.approx(last["val/loss"], rel=1e-5)
    assert evaluated["val/top1"] == last["val/top1"]


def test_a_stopped_torchrun_job_resumes_to_the_uninterrupted_metrics(runs, tmp_path):
    stopped = tmp_path / "stopped"
    log = tmp_path / "torchrun.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*TORCHRUN, str(ROOT / "train.py"), *DDP, f"hydra.run.dir={stopped}"],
            cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, env=env(tmp_path / "tmp"),
        )  # fmt: skip
        deadline = time.time() + 120
        while "step 10:" not in log.read_text():  # the second of 8 steps in epoch 2
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # to torchrun, which passes it on to both workers
        proc.wait(timeout=120)
    output = log.read_text()
    # torchrun re-raises the signal as its SignalException (exit 1) once the workers are done; they
    # finished the step, rank 0 wrote last.pt and finished its W&B run as preempted (exit 75).
    assert proc.returncode == 1 and "SignalException" in output, output[-3000:]
    assert "resume with resume=auto" in output and read_run(stopped)["exit_code"] == 75
    assert not (stopped / "summary.json").exists()
    checkpoint = torch.load(stopped / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 1 and 0 < checkpoint["meter"]["steps"] < 8 and checkpoint["world_size"] == 2

    # Each process's share of an epoch depends on their number: one process may not resume it mid-epoch.
    before = tree_digest(stopped)
    single = subprocess.run([sys.executable, str(ROOT / "train.py"), *DDP, f"hydra.run.dir={stopped}", "resume=auto"],
                            cwd=tmp_path, capture_output=True, text=True, env=env(tmp_path / "tmp"))  # fmt: skip
    errors = [line for line in single.stderr.splitlines() if "error" in line.lower()]
    assert single.returncode == 2 and len(errors) == 1, single.stderr[-3000:]
    assert "written mid-epoch by 2 process(es)" in errors[0] and "resume it with as many, not 1" in errors[0]
    assert tree_digest(stopped) == before

    train(*DDP, f"hydra.run.dir={stopped}", "resume=auto", cwd=tmp_path, launcher=TORCHRUN)
    metrics = (*LOSSES, *ACCURACIES)
    resumed, straight = rows(stopped), rows(ddp_dir(runs))
    assert [{k: r[k] for k in metrics} for r in resumed] == [{k: r[k] for k in metrics} for r in straight]
    summary = json.loads((stopped / "summary.json").read_text())
    wandb_ids = {p.stem.removeprefix("run-") for p in stopped.glob("wandb/offline-run-*/run-*.wandb")}
    assert wandb_ids == {summary["wandb_run_id"]}  # the resumed job continues the same W&B run
    assert {p.name for p in tmp_path.iterdir()} == {"stopped", "tmp", "torchrun.log"}
    assert not leftover_rank_dirs(tmp_path)


@pytest.mark.slow  # ~15 s: one more torchrun job
def test_a_torchrun_job_whose_dir_another_process_holds_ends_on_every_rank_and_writes_nothing(tmp_path):
    """Rank 0 alone takes the run dir's lock; every rank must hear it was refused, or the others would wait
    in the first collective until torchrun's timeout."""
    held = tmp_path / "held"
    with RunRecords(held).claimed() as holder:
        assert holder is None
        result = subprocess.run(
            [*TORCHRUN, str(ROOT / "train.py"), *DDP, f"hydra.run.dir={held}", "resume=auto"],
            cwd=tmp_path, capture_output=True, text=True, env=env(tmp_path / "tmp"), timeout=300,
        )  # fmt: skip
        assert sorted(p.name for p in held.iterdir()) == ["train.lock"]
    output = result.stdout + result.stderr
    refused = f"{held} is being trained by another process (pid "
    assert result.returncode != 0 and f"[rank 1] ERROR: error: {refused}" in output, output[-3000:]
    assert "failed (exitcode: 75) local_rank: 0" in output  # rank 0 too, at once: nothing waited for a timeout
    assert not leftover_rank_dirs(tmp_path)


# ---- pieces ----


def test_ranks_above_zero_get_a_throwaway_hydra_dir_and_stderr_logging(monkeypatch):
    argv = ["train.py", "data=synthetic", "hydra.run.dir=runs/x", "seed=1", "-m"]
    monkeypatch.delenv("RANK", raising=False)
    assert torchrun_argv(argv) == argv
    monkeypatch.setenv("RANK", "1")
    worker = torchrun_argv(argv)
    assert worker[0] == "train.py" and worker[-1] == "-m"  # the overrides stay one block, as argparse needs
    own_dir = worker[1].removeprefix("hydra.run.dir=")
    assert Path(own_dir).is_dir() and "hydra.run.dir=runs/x" not in worker
    assert worker[-3:-1] == ["data=synthetic", "seed=1"] and "hydra/job_logging=stderr" in worker
    Path(own_dir).rmdir()  # at exit in a real run


def _sync_bn_worker(rank: int, port: int, out: str) -> None:
    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = _bn_model()
        model = dist.convert_sync_batchnorm(model, torch.device("cpu"))
        x, w = _bn_batch()
        y = model(x[rank::2])
        (y * w[rank::2]).sum().backward()
        grads = [dist.all_reduce_sum(p.grad) for p in model.parameters()]  # as DDP does, without its 1/2
        if rank == 0:
            torch.save({"y": y.detach(), "state": model.state_dict(), "grads": grads}, out)
    finally:
        torch_dist.destroy_process_group()


def _bn_model() -> nn.Module:
    # A conv BN and the attention's BN over pooled (N, C, 1, 1) descriptors, in float64.
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), DescriptorBatchNorm(4)
    ).double()


def _bn_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64)  # (N, C, H, W), 3 images per rank
    w = torch.randn(6, 4, 1, 1, generator=g, dtype=torch.float64)  # weights of a loss over the outputs
    return x, w


@pytest.mark.slow  # ~10 s: two spawned processes import this module
def test_cpu_sync_batchnorm_over_two_ranks_is_batchnorm_over_their_union(tmp_path):
    torch.multiprocessing.spawn(_sync_bn_worker, args=(_free_port(), str(tmp_path / "rank0.pt")), nprocs=2)
    got = torch.load(tmp_path / "rank0.pt", weights_only=True)

    torch.manual_seed(0)
    model = _bn_model()
    x, w = _bn_batch()
    # The two ranks' losses add up to this one, and so do their gradients.
    y = model(x)
    (y * w).sum().backward()
    torch.testing.assert_close(got["y"], y.detach()[0::2])
    torch.testing.assert_close(got["state"], model.state_dict())  # running mean, unbiased var, count
    torch.testing.assert_close(got["grads"], [p.grad for p in model.parameters()])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _checks_worker(rank: int, port: int, out: str) -> None:
    """Rank 1 alone has a non-finite fp16 loss, at step 2 of 4; one skip is over the allowance of none."""
    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        parts = StepParts(None, None, {}, False, None, None, log_every=4, max_nonfinite=0)
        checks = StepChecks(parts, EpochMeter(), torch.device("cpu"), epoch=0, steps=8, per_rank_loss=True)
        for step in range(4):
            checks.record(torch.tensor(rank == 1 and step == 2))
        try:
            checks.check()
            outcome = "went on"
        except Diverged as e:
            outcome = str(e)
        Path(f"{out}.{rank}").write_text(outcome)
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.slow  # ~10 s: two spawned processes import this module
def test_ranks_agree_to_stop_when_one_ranks_fp16_loss_was_not_finite(tmp_path):
    """With fp16 each rank judges its own loss (GradScaler handles overflowing gradients), so the check
    takes the count over the ranks: both stop at the same check, naming the same step, and none waits
    in a collective the other left."""
    torch.multiprocessing.spawn(_checks_worker, args=(_free_port(), str(tmp_path / "outcome")), nprocs=2)
    outcomes = [(tmp_path / f"outcome.{rank}").read_text() for rank in (0, 1)]
    assert outcomes[0] == outcomes[1] and outcomes[0].startswith("non-finite loss at epoch 0, step 3 of 8")


def test_one_process_under_torchrun_still_joins_a_process_group(tmp_path):
    """--nproc_per_node=1 runs DDP over a group of one (NCCL on a GPU), so one GPU exercises that path."""
    one = [*TORCHRUN[:-1], "--nproc_per_node=1"]
    train(*SINGLE, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, launcher=one)
    assert "rank 0 of 1 on cpu (gloo)" in (tmp_path / "run" / "train.log").read_text()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["world_size"] == 1


def test_parallel_jobs_of_a_multirun_spread_over_the_gpus(monkeypatch):
    from cbam.engine.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert [resolve_device("auto", job=j) for j in range(6)] == [torch.device("cuda", j % 4) for j in range(6)]
    assert resolve_device("cuda", job=None) == torch.device("cuda")  # a single run: the current GPU
    assert resolve_device("cuda:2", job=5) == torch.device("cuda", 2)  # a device given is kept
    for missing in ("cuda:4", "cuda:x", "cuda:-1"):  # one line, not a failure at the first tensor moved there
        with pytest.raises(ConfigError, match=f"trainer.device='{missing}': this node has GPUs cuda:0 to cuda:3"):
            resolve_device(missing)
    monkeypatch.setenv("RANK", "0"), monkeypatch.setenv("WORLD_SIZE", "2"), monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "localhost"), monkeypatch.setenv("MASTER_PORT", "29500")
    assert resolve_device("auto", job=3) == torch.device("cuda", 1)  # under torchrun: the process's own GPU
