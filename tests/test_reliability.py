"""Keep running: preemption, SIGKILL, divergence, a full disk, an unreachable W&B server."""

import copy
import errno
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT
from test_run_paths import train_in
from test_train import FAST, METRICS, rows, run, tree_digest
from torch import nn
from wandb_records import read_run

from cbam.engine import loop
from cbam.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from cbam.engine.loop import optimizer_step
from cbam.engine.records import RunRecords
from cbam.errors import Diverged, RunInProgress
from cbam.tracking import WandbTracker

LONGER = [*FAST, "data.source.train_size=512", "trainer.epochs=3"]  # 16 steps an epoch: time to interrupt


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    """The uninterrupted run that interrupted-and-resumed runs must reproduce exactly."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    run("train.py", *LONGER, f"hydra.run.dir={run_dir}", cwd=run_dir.parent)
    return run_dir


def start(run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *LONGER, f"hydra.run.dir={run_dir}", *extra],
        cwd=run_dir.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(proc: subprocess.Popen, ready, what: str) -> None:
    deadline = time.time() + 120
    while not ready():
        assert proc.poll() is None, f"the run ended before {what}: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def own_records(run_dir: Path) -> dict:
    """The run dir's files but W&B's: its service, a process of its own, writes on while the run is stopped."""
    return {name: digest for name, digest in tree_digest(run_dir).items() if not name.startswith("wandb/")}


def first_epoch_recorded(run_dir: Path):
    metrics = run_dir / "metrics.jsonl"
    return lambda: metrics.exists() and metrics.read_text().strip() != ""


def assert_resume_reproduces(straight: Path, stopped: Path) -> None:
    run("train.py", *LONGER, f"hydra.run.dir={stopped}", "resume=auto", cwd=stopped.parent)
    resumed = rows(stopped)
    assert [r["epoch"] for r in resumed] == [0, 1, 2]
    for a, b in zip(rows(straight), resumed, strict=True):
        assert {k: a[k] for k in METRICS} == {k: b[k] for k in METRICS}


@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)], ids=["SIGTERM", "SIGINT"]
)
def test_a_stop_signal_writes_last_pt_exits_75_and_resume_matches(straight_run, tmp_path, sig):
    stopped = tmp_path / "stopped"
    proc = start(stopped)
    wait_for(proc, first_epoch_recorded(stopped), "its first epoch was recorded")
    # A second command for the same dir while it trains (held still, in its second of three epochs) leaves
    # the run to it and writes nothing.
    proc.send_signal(signal.SIGSTOP)
    try:
        before = own_records(stopped)
        with pytest.raises(RunInProgress, match=rf"{stopped} is being trained by another process \(pid {proc.pid} on"):
            train_in(stopped, "resume=auto")
        assert own_records(stopped) == before
        assert RunRecords(stopped).trainer().startswith(f"pid {proc.pid} on ")  # what compare.py names
    finally:
        proc.send_signal(signal.SIGCONT)
    proc.send_signal(sig)  # lands in the second of three epochs
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr[-2000:]
    assert "resume with resume=auto" in stderr and "Traceback" not in stderr
    assert not (stopped / "summary.json").exists()
    checkpoint = torch.load(stopped / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 1  # stopped inside epoch 1, `meter.steps` steps into it
    assert read_run(stopped)["exit_code"] == 75  # the W&B run is finished, as preempted
    assert not (stopped / "train.lock").exists()
    assert_resume_reproduces(straight_run, stopped)


def test_sigkill_leaves_the_newest_complete_checkpoint_and_resume_continues(straight_run, tmp_path):
    killed = tmp_path / "killed"
    proc = start(killed)
    wait_for(proc, (killed / "last.pt").exists, "last.pt was written")
    time.sleep(0.3)  # somewhere in the next epoch, or in a checkpoint write
    proc.kill()
    proc.communicate(timeout=60)
    (killed / ".last.pt.torn.tmp").write_bytes(b"half a checkpoint")  # as a kill during a write leaves one
    checkpoint = torch.load(killed / "last.pt", weights_only=True)  # complete, whatever the moment
    assert checkpoint["epoch"] >= 1
    assert (killed / "train.lock").read_text().startswith(f"pid {proc.pid} on ")  # left behind, but not locked
    assert RunRecords(killed).trainer() is None  # its holder is gone: a stopped run, not one training
    assert_resume_reproduces(straight_run, killed)
    assert not list(killed.glob(".*.tmp"))  # the next checkpoint write cleared it
    assert not (killed / "train.lock").exists()


# ---- the run dir's lock (RunRecords.claimed): one process trains a run dir at a time ----


@pytest.mark.parametrize("old_holder_still_locks", [False, True], ids=["old-released", "old-still-locked"])
def test_a_lock_file_removed_by_its_finishing_holder_is_taken_again_on_the_new_one(
    tmp_path, monkeypatch, old_holder_still_locks
):
    """Opened just before its holder removed it (the holder is done): locking that file would guard nothing,
    and refusing on it would refuse a free dir. The claim goes on to a new train.lock, which it then holds."""
    import fcntl

    records = RunRecords(tmp_path)
    records.lock.write_text("pid 1 on elsewhere since then")
    stale = os.open(records.lock, os.O_RDWR)
    old_holder = os.open(records.lock, os.O_RDWR)
    if old_holder_still_locks:
        fcntl.flock(old_holder, fcntl.LOCK_EX)
    records.lock.unlink()
    real_open, calls = os.open, []

    def open_stale_first(path, *args, **kwargs):
        calls.append(path)
        return stale if len(calls) == 1 else real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_stale_first)
    try:
        with records.claimed() as holder:
            monkeypatch.setattr(os, "open", real_open)
            assert holder is None and len(calls) == 2
            assert records.lock.read_text().startswith(f"pid {os.getpid()} on ")
            with RunRecords(tmp_path).claimed() as second:  # the new file is the one held
                assert second.startswith(f"pid {os.getpid()} on ")
        assert not records.lock.exists()
    finally:
        os.close(old_holder)


def test_without_flock_the_run_goes_on_unguarded_after_a_warning(tmp_path, monkeypatch, caplog):
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with RunRecords(tmp_path / "run").claimed() as holder:
        assert holder is None
    assert "nothing keeps a second process from training this dir" in caplog.text
    assert not (tmp_path / "run").exists()  # neither the lock file nor the dir it made is left


def test_a_killed_holders_forked_child_does_not_keep_the_lock(tmp_path):
    """A DataLoader worker is forked: were the lock's fd its own too, the dir would stay held after its
    parent is killed, for as long as the worker lives."""
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import os, signal, sys, time\n"
            "from cbam.engine.records import RunRecords\n"
            f"with RunRecords({str(tmp_path)!r}).claimed():\n"
            "    if os.fork() == 0:\n"
            "        time.sleep(60)\n"
            "        os._exit(0)\n"
            "    print('held', flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
        )],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        holder.wait(timeout=60)
        assert holder.returncode == -signal.SIGKILL and (tmp_path / "train.lock").exists()
        with RunRecords(tmp_path).claimed() as second:
            assert second is None  # free, while the child still runs
    finally:
        os.killpg(holder.pid, signal.SIGKILL)


def test_a_diverging_run_stops_with_a_clear_message_and_writes_no_checkpoint(tmp_path):
    result = run(
        "train.py", *FAST, "optim.optimizer.lr=1e12", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, check=False
    )
    assert result.returncode == 3, result.stderr[-2000:]
    assert "non-finite loss" in result.stderr and "at epoch 0, step" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "last.pt").exists()


def test_skipped_non_finite_steps_are_counted_then_the_run_stops(tmp_path):
    result = run(
        "train.py", *FAST, "optim.optimizer.lr=1e12", "trainer.max_nonfinite_steps=3",
        f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, check=False,
    )  # fmt: skip
    assert result.returncode == 3
    assert result.stderr.count("step skipped") == 3
    assert "trainer.max_nonfinite_steps (now 3)" in result.stderr


def test_a_skipped_step_leaves_the_batchnorm_statistics_as_they_were(tmp_path, monkeypatch, caplog):
    """Its forward already moved them: a batch with a NaN pixel would leave them NaN, the next checkpoint
    non-finite, and the run stopped (exit 3) although it was allowed to skip that step."""
    prepared = []
    real_prepare = loop._prepare

    def a_nan_in_the_second_batch(x, channels_last):
        prepared.append(x)
        if len(prepared) == 2:
            x = x.clone()
            x[0, 0, 0, 0] = math.nan
        return real_prepare(x, channels_last)

    monkeypatch.setattr(loop, "_prepare", a_nan_in_the_second_batch)
    summary = train_in(tmp_path / "run", "trainer.max_nonfinite_steps=1")
    assert summary["epochs"] == 1 and caplog.text.count("step skipped") == 1
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    norms = {k: v for k, v in state["model"].items() if k.endswith(("running_mean", "running_var"))}
    assert norms and all(torch.isfinite(v).all() for v in norms.values())
    tracked = [v for k, v in state["model"].items() if k.endswith("num_batches_tracked")]
    assert {int(v) for v in tracked} == {3}  # the skipped batch is not counted either


@pytest.mark.parametrize("fp16_scaler", [False, True], ids=["found_inf", "grad-scaler"])
def test_a_skipped_first_step_leaves_no_optimizer_state_behind(fp16_scaler):
    """torch's fused SGD allocates its momentum buffers uninitialised on its first step; skipped, that step
    must not leave them for the next one to read. The steps after it match SGD that never saw it."""
    torch.manual_seed(0)
    model = nn.Linear(16, 4)
    reference = copy.deepcopy(model)
    sgd = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    state = SimpleNamespace(
        optimizer=torch.optim.SGD(model.parameters(), **sgd, fused=True),  # the engine's (build_optimizer)
        scaler=torch.amp.GradScaler("cpu", enabled=fp16_scaler),
    )
    reference_sgd = torch.optim.SGD(reference.parameters(), **sgd, foreach=False)
    x = torch.randn(32, 16)
    garbage = [torch.full((64,), 3e30) for _ in range(64)]  # freed memory full of huge values
    del garbage
    for step, nonfinite in enumerate([True, False, False, False]):
        model.zero_grad(set_to_none=True)
        loss = model(x).square().mean()
        state.scaler.scale(loss).backward()
        if nonfinite:
            model.weight.grad[0, 0] = math.inf
        assert bool(optimizer_step(state, model, loss, None)) == (nonfinite and not fp16_scaler), step
        assert bool(state.optimizer.state) != nonfinite  # skipped, the first step leaves no state at all
        if not nonfinite:
            reference.zero_grad(set_to_none=True)
            reference(x).square().mean().backward()
            reference_sgd.step()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q)
        torch.testing.assert_close(
            state.optimizer.state[p]["momentum_buffer"], reference_sgd.state[q]["momentum_buffer"]
        )


def test_non_finite_weights_never_replace_a_good_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "config": {}}, path)
    good = path.read_bytes()
    with pytest.raises(Diverged, match="not finite.*previous checkpoint is kept"):
        save_checkpoint({"model": {"w": torch.tensor([1.0, float("nan"), 2.0])}, "config": {}}, path)
    assert path.read_bytes() == good


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "config": {}}, path)
    good = path.read_bytes()

    class FullDisk(io.RawIOBase):
        """The checkpoint's file on a disk with 1 kB left: the real torch.save writes into it, and raises
        what it raises on a full disk (a RuntimeError of its zip writer, raised while handling the OSError)."""

        def __init__(self, file, room=1000):
            self.file, self.room = file, room

        def writable(self):
            return True

        def write(self, data):
            if len(data) > self.room:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.room -= len(data)
            return self.file.write(data)

        def fileno(self):
            return self.file.fileno()

        def close(self):
            self.file.close()
            super().close()

    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    with pytest.raises(
        CheckpointError, match="No space left on device.*free some space.*previous checkpoint is intact"
    ):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "config": {}}, path)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left behind


def test_a_resume_rewrites_the_records_whole_or_not_at_all(tmp_path, monkeypatch):
    """A resume rewrites config.yaml and cuts metrics.jsonl back to the checkpoint's epoch: a process killed
    in the middle (here: its rename fails) leaves the records as they were, never torn or empty."""
    records = RunRecords(tmp_path)
    records.write_config({"seed": 0})
    for epoch in range(3):
        records.append_metrics({"epoch": epoch, "val/top1": 50.0 + epoch})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def killed(src, dst):
        raise OSError(errno.EIO, "killed mid-write")

    monkeypatch.setattr(os, "replace", killed)
    for rewrite in (lambda: records.keep_epochs_before(1), lambda: records.write_config({"seed": 1})):
        with pytest.raises(OSError, match="killed mid-write"):
            rewrite()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # and no temp file left behind
    monkeypatch.undo()
    records.keep_epochs_before(1)
    assert records.read_metrics() == [{"epoch": 0, "val/top1": 50.0}]


def test_a_full_disk_during_training_is_one_clear_error(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    # A real full disk: a 3 MiB tmpfs holds last.pt (2.3 MB) but not best.pt beside it.
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root and a system that allows it")
    try:
        result = run("train.py", *FAST, f"hydra.run.dir={disk / 'run'}", cwd=tmp_path, check=False)
        assert result.returncode == 2, result.stderr[-2000:]
        assert "No space left on device" in result.stderr and "Traceback" not in result.stderr
        assert torch.load(disk / "run" / "last.pt", weights_only=True)["epoch"] == 1  # the one that fit
        assert not list((disk / "run").glob(".*.tmp"))
    finally:
        # Lazy: W&B's service process of the run may still hold the mount for a moment after train.py exits.
        subprocess.run(["umount", "--lazy", str(disk)], check=True)


def test_a_checkpoint_that_cannot_be_read_is_one_clear_error(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path} is not a file"):
        load_checkpoint(tmp_path)
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "config": {}}, path)

    def no_permission(file, **kwargs):  # what a file of another user gives (root reads any, so it is simulated)
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))

    monkeypatch.setattr(torch, "load", no_permission)
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {path} \\(Permission denied\\)"):
        load_checkpoint(path)


def test_a_failed_wandb_call_ends_the_wandb_run_as_failed_and_stops_calling_it(tmp_path, caplog):
    """Left open, the run would be finished by the next job's init or by wandb's exit hook, as a success."""
    tracker = WandbTracker(
        project="cbam-ablate", entity=None, mode="offline", init_timeout=60, run_dir=tmp_path, name="run",
        group=None, tags=[], config={},
    )  # fmt: skip
    calls = []

    def lost(*args, **kwargs):
        calls.append(args)
        raise ConnectionError("connection lost")

    tracker.run.log = lost
    with tracker:
        tracker.log({"train/step_loss": 1.0}, step=1)
        tracker.log({"train/step_loss": 0.5}, step=2)
    assert len(calls) == 1 and "W&B call failed (connection lost)" in caplog.text
    assert read_run(tmp_path)["exit_code"] == 1


def test_an_unreachable_wandb_server_falls_back_to_offline(tmp_path):
    env = {
        **os.environ,
        "WANDB_MODE": "",
        "WANDB_API_KEY": "x" * 40,
        "WANDB_BASE_URL": "http://127.0.0.1:9",  # nothing listens on the discard port
    }
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *FAST, "logger.mode=online", "logger.init_timeout=3",
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "W&B online init failed" in result.stderr and "logging offline instead" in result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert read_run(tmp_path / "run")["id"] == summary["wandb_run_id"]
