"""A run dir: the one place its layout is written down. Our records are the source of truth for reports;
W&B only mirrors them.

config.yaml     the resolved config (written first: a dir with any of the files below holds a run)
metrics.jsonl   one JSON row per epoch
summary.json    final and best metrics, cost, provenance (written last: the run finished)
last.pt         the newest checkpoint; best.pt the one of the best val epoch
train.log       the run's log
viz/            end-of-run figures (trainer.visualize, scripts/visualize.py)
train.lock      while a process trains here: locked by it (flock), so that a second is refused; removed after
"""

import errno
import json
import logging
import math
import os
import re
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cbam.errors import ConfigError

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
WHAT_A_RUN_HOLDS = (
    "a run dir holds summary.json, metrics.jsonl and config.yaml (train.py writes them); "
    "a multirun dir holds such run dirs"
)


# The config keys (prefixes of flattened keys) that say which run a dir holds: its model, data and recipe.
RUN_IDENTITY = (
    "seed",
    "attention.",
    "model.",
    "data.",
    "optim.",
    "trainer.grad_clip",
    "trainer.ema_decay",
    "trainer.mixup.",
)
# ...but not where the data lies or how it is fed: the same run continues on another machine, also with
# another per-process batch (an epoch's end resumes with any). trainer.precision, channels_last and compile
# are recorded as chosen (not `auto`), and a resumed run keeps its checkpoint's choices anyway.
NOT_RUN_IDENTITY = ("data.source.root", "data.loader", "data.batch_size", "data.eval_batch_size", "data.num_workers")


def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    """{"optim.optimizer.lr": 0.1, ...}: a resolved config's leaves by dotted key; lists stay whole values."""
    flat = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{dotted}.")
        else:
            flat[dotted] = value
    return flat


def evaluation_name(checkpoint: Path, bn_batch_stats: bool = False) -> str:
    """What eval.py calls its record of `checkpoint` (`<name>.json` beside it): eval-last, eval-best, and
    eval-last-bn_batch_stats for the diagnostic, which never overwrites the plain evaluation."""
    return f"eval-{Path(checkpoint).stem}" + ("-bn_batch_stats" if bn_batch_stats else "")


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; null reads as "not measured"
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temp file beside `path`, fsync, rename over it: a crash leaves the old file or the new one,
    never a torn or empty one (the records are a run's history; a resume rewrites them)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(_json_safe(data), indent=2) + "\n")


def output_dir(path: str | Path, option: str) -> Path:
    """`path`, made with its parents, for a script to write its output into; a ConfigError naming `option`
    where it cannot be written (a file of that name, no permission, a read-only filesystem)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        reason = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
        raise ConfigError(f"cannot write to {path} ({reason}): pass {option}=DIR somewhere writable") from e
    return path


# train.lock's holder line, as RunRecords._lock writes it.
_HOLDER = re.compile(r"pid (?P<pid>\d+) on (?P<host>\S+) since .+")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only whether the process exists is checked
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


# The train.lock fds this process holds. A child forked without exec (a DataLoader worker) would share each
# lock and keep it after its parent is killed: it closes its copies at once (the parent's lock stays).
_HELD_LOCKS: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _HELD_LOCKS:
        os.close(fd)
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_close_inherited_locks)


class RunRecords:
    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self.config = self.dir / "config.yaml"
        self.metrics = self.dir / "metrics.jsonl"
        self.summary = self.dir / "summary.json"
        self.last = self.dir / "last.pt"
        self.best = self.dir / "best.pt"
        self.log = self.dir / "train.log"
        self.viz = self.dir / "viz"
        self.lock = self.dir / "train.lock"

    @contextmanager
    def claimed(self, enabled: bool = True) -> Iterator[str | None]:
        """Hold this dir for the one process that trains it: yields None while held, or who holds it (a
        second process on this machine, or on another sharing the filesystem, must then write nothing here).

        An flock on train.lock, which the kernel releases however the holder ends (a SIGKILL too); the holder
        removes the file when done, so a lock taken on a file that was removed meanwhile is taken again on
        the new one. A dir this creates is removed again if nothing else was written into it. On a filesystem
        without flock (some network mounts) the run goes on unguarded, after a warning."""
        if not enabled:
            yield None
            return
        created = not self.dir.exists()
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = None
        try:
            holder, fd = self._lock()
            yield holder
        finally:
            if fd is not None:
                self.lock.unlink(missing_ok=True)  # before the unlock: a waiting process then retries on a new file
                _HELD_LOCKS.discard(fd)
                os.close(fd)
            if created:
                try:
                    self.dir.rmdir()  # only when empty: a refused or finished-before-starting command leaves no dir
                except OSError:
                    pass

    def _lock(self) -> tuple[str | None, int | None]:
        """(None, the locked fd), or (who holds it, None), or (None, None) where the lock cannot be taken."""
        import fcntl  # POSIX only, as training is: reading runs (compare.py) works anywhere

        while True:
            try:
                fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # the dir, made by another command that was then refused, removed again
                self.dir.mkdir(parents=True, exist_ok=True)
                continue
            except OSError as e:  # a read-only checkout, another user's file
                return self._unguarded(e)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    made_here = os.fstat(fd).st_size == 0
                    os.close(fd)
                    if made_here:
                        self.lock.unlink(missing_ok=True)
                    return self._unguarded(e)
                locked = False
            try:
                current = os.stat(self.lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if not current:  # its holder finished and removed it after our open: take the next one
                os.close(fd)
                continue
            if not locked:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                os.close(fd)
                return holder or "another process", None
            try:
                os.ftruncate(fd, 0)  # a killed holder's line
                os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%F %T')}".encode())
            except BaseException:
                self.lock.unlink(missing_ok=True)
                os.close(fd)
                raise
            _HELD_LOCKS.add(fd)
            return None, fd

    def trainer(self) -> str | None:
        """Who trains this dir now, as far as can be told without taking its lock (a probe holding it for an
        instant would refuse a trainer starting then): train.lock's holder line, or None when there is no
        train.lock or its holder was a process of this machine that no longer exists (a SIGKILL leaves the
        file behind). A holder on another machine sharing the filesystem cannot be checked: it is named."""
        try:
            holder = self.lock.read_text(errors="replace").strip()
        except FileNotFoundError:
            return None
        except OSError:
            return "another process"
        named = _HOLDER.fullmatch(holder)
        if named and named["host"] == socket.gethostname() and not _alive(int(named["pid"])):
            return None
        return holder or "another process"

    def _unguarded(self, e: OSError) -> tuple[None, None]:
        """No lock to be had here: say so, and go on as if it were held (nobody holds it, nothing to close)."""
        log.warning(
            "cannot lock %s (%s): nothing keeps a second process from training this dir at the same time",
            self.lock, os.strerror(e.errno),
        )  # fmt: skip
        return None, None

    def holds_a_run(self) -> bool:
        """A run was started here (reports list it, finished or not)."""
        return self.config.exists() or self.has_trained()

    def has_trained(self) -> bool:
        """A run here got through an epoch or a checkpoint: what a new run must not overwrite."""
        return any(p.exists() for p in (self.metrics, self.last, self.summary))

    def finished(self, epochs: int) -> bool:
        """A run here wrote its summary after `epochs` epochs or more."""
        if not self.summary.exists():
            return False
        try:
            return self.read_summary().get("epochs", 0) >= epochs
        except ValueError:  # a torn or edited summary.json: not a finished run
            return False

    def checkpoint_to_resume(self, resume: str | None) -> Path | None:
        """What `resume` (null | auto | a checkpoint path) starts from; a new run is refused in a dir that
        already holds one, before anything is written there."""
        if resume is None:
            if self.has_trained():
                raise ConfigError(
                    f"{self.dir} already holds a run: pass resume=auto to continue it, or choose another hydra.run.dir"
                )
            return None
        if resume == "auto":
            return self.last if self.last.exists() else None  # none yet: a fresh start
        path = Path(resume)
        if not self.holds(path) and self.has_trained():
            raise ConfigError(
                f"{self.dir} already holds a run: resume={path} would start another from that checkpoint over it; "
                "choose another hydra.run.dir, or pass resume=auto to continue the run there"
            )
        return path

    def refuse_another_run(self, cfg: DictConfig) -> None:
        """resume=auto takes the run in this dir for the one asked for, continuing it or, finished, skipping
        it: refused when its config.yaml records another seed, attention, model, data or recipe (a value that
        only one side has, such as an option added since, does not count)."""
        if not self.config.exists():
            return
        recorded = flatten(self.read_config())
        asked = flatten(OmegaConf.to_container(cfg, resolve=True))
        differ = [
            f"{key}: {recorded[key]!r} there, {asked[key]!r} asked"
            for key in sorted(recorded.keys() & asked.keys())
            if key.startswith(RUN_IDENTITY) and not key.startswith(NOT_RUN_IDENTITY) and recorded[key] != asked[key]
        ]
        if differ:
            raise ConfigError(
                f"{self.dir} holds another run ({'; '.join(differ[:3])}{'; ...' if len(differ) > 3 else ''}): "
                "resume=auto would continue or skip it as this one; give this run its own hydra.sweep.dir or "
                "hydra.run.dir"
            )

    def holds(self, checkpoint: Path) -> bool:
        """`checkpoint` is this run's own (resuming it continues this run; any other starts a new one here)."""
        return checkpoint.resolve().parent == self.dir.resolve()

    @contextmanager
    def logging_to_file(self, enabled: bool = True):
        """Every log line of the run, while it lasts, also in train.log (appended to on resume). Opened only
        once the run may write here, so a refused command leaves another run's log as it was."""
        if not enabled:
            yield
            return
        root, ours = logging.getLogger(), logging.getLogger("cbam")
        handler = logging.FileHandler(self.log)
        if root.handlers and root.handlers[0].formatter is not None:
            handler.setFormatter(root.handlers[0].formatter)  # the console's format (conf/hydra/job_logging)
        level = ours.level
        if ours.getEffectiveLevel() > logging.INFO:  # called from Python without logging set up: keep our INFO lines
            ours.setLevel(logging.INFO)
        root.addHandler(handler)
        try:
            yield
        finally:
            root.removeHandler(handler)
            handler.close()
            ours.setLevel(level)

    def write_config(self, cfg: DictConfig | dict) -> None:
        write_text_atomic(self.config, OmegaConf.to_yaml(cfg, resolve=True))

    def read_config(self) -> dict:
        return OmegaConf.to_container(OmegaConf.load(self.config), resolve=True)

    def read_metrics(self) -> list[dict]:
        if not self.metrics.exists():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    def keep_epochs_before(self, epoch: int) -> None:
        """On resume: drop rows of epochs the checkpoint does not cover (they will be run again)."""
        rows = [r for r in self.read_metrics() if r["epoch"] < epoch]
        write_text_atomic(self.metrics, "".join(json.dumps(_json_safe(r)) + "\n" for r in rows))

    def append_metrics(self, row: dict) -> None:
        with self.metrics.open("a") as f:
            f.write(json.dumps(_json_safe(row)) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_summary(self, summary: dict) -> None:
        write_json_atomic(self.summary, summary)

    def read_summary(self) -> dict:
        return json.loads(self.summary.read_text())


def git_commit() -> str | None:
    """The commit the code ran at, with "-dirty" when the tree had uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.strip() + ("-dirty" if dirty.strip() else "")
