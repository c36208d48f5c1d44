"""train.py and eval.py as a user runs them: real subprocesses, real Hydra, real offline W&B runs."""

import hashlib
import json
import subprocess
import sys
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import CONF, ROOT, compose_config
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import OmegaConf
from wandb_records import read_run

from cbam import cli
from cbam.engine.optim import build_optimizer
from cbam.engine.records import RunRecords
from cbam.engine.run import RunContext, train, variant_label
from cbam.errors import Diverged
from cbam.models import build_model

# Tiny and fast: synthetic data, CIFAR ResNet-20, CPU, one epoch.
BASE = ["trainer.epochs=1", "trainer.device=cpu", "logger.mode=offline"]
FAST = ["data=synthetic", "data.source.train_size=256", "data.source.val_size=128", "data.batch_size=32", *BASE]
EPOCH_KEYS = {
    "epoch", "step", "lr", "train/loss", "train/top1", "train/img_per_s", "train/data_wait_share",
    "train/epoch_time_s", "val/loss", "val/top1", "val/top5", "val/img_per_s",
}  # fmt: skip
METRICS = ("train/loss", "train/top1", "val/loss", "val/top1", "val/top5")


def run(script: str, *args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tree_digest(path: Path) -> dict:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """One finished one-epoch run, shared by the tests that only read it."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run("train.py", *FAST, f"hydra.run.dir={run_dir}", cwd=run_dir.parent)
    return run_dir


# ---- composition ----


def test_default_config_is_the_documented_job():
    cfg = compose_config("train")
    assert cfg.attention.arrangement == "channel_spatial" and cfg.attention.spatial_kernel == 7  # the paper's CBAM
    assert cfg.model.layers == [3, 3, 3] and cfg.model.widths == [16, 32, 64]  # CIFAR ResNet-20
    assert cfg.data.name == "fashion_mnist" and cfg.model.in_chans == 1 and cfg.model.num_classes == 10
    assert cfg.trainer.device == "auto" and cfg.logger.mode == "auto"


@pytest.mark.parametrize("model", sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
def test_every_model_preset_builds_for_its_data(model):
    cfg = compose_config("train", f"model={model}", "data=cifar100")
    net = build_model(cfg).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 100)


@pytest.mark.parametrize("optim", sorted(p.stem for p in (CONF / "optim").glob("*.yaml")))
@pytest.mark.parametrize("scheduler", sorted(p.stem for p in (CONF / "optim" / "scheduler").glob("*.yaml")))
def test_every_optimizer_and_schedule_instantiates_and_steps(optim, scheduler):
    short = ["optim.scheduler.milestones=[2,3]"] if scheduler == "multistep" else []  # the default ones are at 30+
    cfg = compose_config("train", f"optim={optim}", f"optim/scheduler={scheduler}", "trainer.epochs=4", *short)
    net = torch.nn.Linear(4, 2)
    optimizer = build_optimizer(cfg.optim, net)
    schedule = instantiate(cfg.optim.scheduler)(optimizer, steps_per_epoch=10, epochs=4)
    lrs = []
    for _ in range(40):
        net(torch.randn(3, 4)).sum().backward()
        optimizer.step()
        schedule.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert all(lr >= 0 for lr in lrs) and lrs[-1] < max(lrs)  # every schedule decays by the end


def lr_trace(*overrides: str, steps: int) -> list[float]:
    """The LR before the first step and after each of `steps` steps, 10 steps an epoch, 3 epochs."""
    cfg = compose_config("train", *overrides)
    optimizer = build_optimizer(cfg.optim, torch.nn.Linear(1, 1))
    schedule = instantiate(cfg.optim.scheduler)(optimizer, steps_per_epoch=10, epochs=3)
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(steps):
        optimizer.step()
        schedule.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def test_cosine_warmup_and_multistep_shapes():
    lrs = lr_trace("optim.scheduler.warmup_epochs=1", steps=30)
    assert lrs[0] == pytest.approx(0.01) and lrs[9] == pytest.approx(0.1)  # linear warmup over 10 steps
    assert lrs[30] == pytest.approx(0.0, abs=1e-12)  # cosine reaches min_lr_ratio * lr at the end
    lrs = lr_trace("optim/scheduler=multistep", "optim.scheduler.milestones=[1,2]", steps=25)
    assert lrs[9] == pytest.approx(0.1) and lrs[10] == pytest.approx(0.01) and lrs[20] == pytest.approx(0.001)


def test_weight_decay_can_exclude_norm_and_bias():
    cfg = compose_config("train", "optim.no_decay_norm_and_bias=true")
    net = build_model(cfg)
    groups = build_optimizer(cfg.optim, net).param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in net.named_parameters():
        assert (id(p) in decayed) == (p.ndim > 1), name


# ---- one real run ----


def test_one_epoch_run_writes_every_record_and_an_offline_wandb_run(finished_run):
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "last.pt", "best.pt", "train.log"):
        assert (finished_run / name).is_file(), name
    [row] = rows(finished_run)
    assert EPOCH_KEYS <= set(row)
    assert 0 <= row["val/top1"] <= row["val/top5"] <= 100 and row["train/img_per_s"] > 0
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["variant"] == "cbam" and summary["seed"] == 0 and summary["data"] == "synthetic"
    assert summary["best_val_top1"] == row["val/top1"] and summary["final"]["val/top1"] == row["val/top1"]
    assert summary["params"] > 0 and summary["flops"] > 0 and summary["train_img_per_s"] > 0
    assert len(summary["val_per_class_top1"]) == 10 and summary["peak_memory_mb"] > 0
    assert summary["git_commit"] is None or len(summary["git_commit"]) >= 40
    checkpoint = torch.load(finished_run / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["config"]["attention"]["arrangement"] == "channel_spatial"
    # trainer.precision/channels_last/compile=auto: the values chosen, everywhere the run records its config
    config = OmegaConf.load(finished_run / "config.yaml").trainer
    in_force = {k: config[k] for k in ("precision", "channels_last", "compile")}
    assert in_force["precision"] in ("fp32", "bf16") and in_force["compile"] is False
    assert {k: summary["fast_path"][k] for k in in_force} == in_force
    assert set(summary["fast_path"]["auto"]) == set(in_force)
    assert {k: checkpoint["config"]["trainer"][k] for k in in_force} == in_force

    wandb_run = read_run(finished_run)
    assert wandb_run["id"] == summary["wandb_run_id"] and wandb_run["name"] == "cbam-s0"
    assert {"cbam", "resnet20", "synthetic"} <= set(wandb_run["tags"])
    assert wandb_run["config"]["model"]["layers"] == [3, 3, 3]
    assert wandb_run["config"]["trainer"]["precision"] == summary["fast_path"]["precision"]
    [epoch_row] = [h for h in wandb_run["history"] if "val/top1" in h]
    for key in EPOCH_KEYS:
        assert epoch_row[key] == pytest.approx(row[key]), key
    assert wandb_run["summary"]["best_val_top1"] == pytest.approx(summary["best_val_top1"])
    assert wandb_run["exit_code"] == 0


def test_eval_reproduces_the_final_val_top1(finished_run, tmp_path):
    out = tmp_path / "eval.json"
    result = run("eval.py", f"checkpoint={finished_run / 'last.pt'}", "device=cpu", f"output={out}", cwd=tmp_path)
    printed = json.loads(result.stdout)
    written = json.loads(out.read_text())
    [row] = rows(finished_run)
    assert written == printed
    assert written["val/top1"] == pytest.approx(row["val/top1"]) and written["val/loss"] == pytest.approx(
        row["val/loss"]
    )
    assert len(written["val/per_class_top1"]) == 10 and written["val/img_per_s"] > 0


def test_same_seed_and_config_give_identical_metrics(finished_run, tmp_path):
    run("train.py", *FAST, f"hydra.run.dir={tmp_path / 'again'}", cwd=tmp_path)
    [first], [second] = rows(finished_run), rows(tmp_path / "again")
    assert {k: first[k] for k in METRICS} == {k: second[k] for k in METRICS}


def test_multirun_makes_one_dir_one_wandb_run_and_one_summary_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    run("train.py", "-m", *FAST, "attention=none,cbam", "seed=0,1", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    dirs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [d.name for d in dirs] == [
        "0-resnet20-none-s0",
        "1-resnet20-none-s1",
        "2-resnet20-cbam-s0",
        "3-resnet20-cbam-s1",
    ]
    summaries = [json.loads((d / "summary.json").read_text()) for d in dirs]
    assert [(s["variant"], s["seed"]) for s in summaries] == [("none", 0), ("none", 1), ("cbam", 0), ("cbam", 1)]
    wandb_runs = [read_run(d) for d in dirs]
    assert len({r["id"] for r in wandb_runs}) == 4
    assert [r["id"] for r in wandb_runs] == [s["wandb_run_id"] for s in summaries]
    assert {r["group"] for r in wandb_runs} == {"sweep"} and all(r["exit_code"] == 0 for r in wandb_runs)
    assert [(r["config"]["variant"], r["config"]["attention_preset"]) for r in wandb_runs[1:3]] == [
        ("none", "none"), ("cbam", "cbam")
    ]  # fmt: skip
    # eval.py's run of a checkpoint joins its training run: same group, variant and preset, job_type eval
    run("eval.py", f"checkpoint={dirs[2] / 'best.pt'}", "device=cpu", cwd=tmp_path)
    evaluated = read_run(dirs[2] / "eval-best")
    assert (evaluated["name"], evaluated["group"], evaluated["job_type"]) == ("eval-cbam-s0", "sweep", "eval")
    assert (evaluated["config"]["variant"], evaluated["config"]["attention_preset"]) == ("cbam", "cbam")
    assert evaluated["summary"]["val/top1"] == pytest.approx(summaries[2]["best_val_top1"])


def test_variants_of_one_preset_get_dirs_of_their_own_also_from_a_later_command(tmp_path):
    """Each command numbers its jobs from 0: with the variant in the dir's name, a later command for
    `attention.reduction=8` into the same sweep dir trains its own run instead of taking cbam's as finished."""
    sweep = tmp_path / "sweep"
    for variant in (["attention=cbam"], ["attention=cbam", "attention.reduction=8"]):
        run("train.py", "-m", *FAST, *variant, f"hydra.sweep.dir={sweep}", "resume=auto", cwd=tmp_path)
    dirs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert dirs == ["0-resnet20-cbam+reduction=8-s0", "0-resnet20-cbam-s0"]
    summaries = [json.loads((sweep / d / "summary.json").read_text()) for d in dirs]
    assert [(s["variant"], s["params"] > 0) for s in summaries] == [("cbam+reduction=8", True), ("cbam", True)]
    assert summaries[0]["params"] != summaries[1]["params"]


def test_the_variant_is_the_preset_and_its_attention_overrides_in_every_override_form():
    overrides = ["attention=cbam", "++attention.reduction=8", "+attention.extra=1", "~attention.mlp_bias", "seed=1"]
    assert variant_label("cbam", overrides) == "cbam+extra=1+reduction=8+~mlp_bias"
    assert variant_label("cbam", ["optim.optimizer.lr=0.05", "data.attention_like=1"]) == "cbam"


def test_a_diverging_job_ends_only_itself_and_the_multirun_exits_with_its_status(tmp_path):
    sweep = tmp_path / "sweep"
    result = run(
        "train.py", "-m", *FAST, "optim.optimizer.lr=1e12,0.1", f"hydra.sweep.dir={sweep}", cwd=tmp_path, check=False
    )  # fmt: skip
    assert result.returncode == 3, result.stderr[-2000:]
    diverged, trained = sweep / "0-resnet20-cbam-s0", sweep / "1-resnet20-cbam-s0"
    assert not (diverged / "summary.json").exists() and "non-finite loss" in (diverged / "train.log").read_text()
    assert json.loads((trained / "summary.json").read_text())["epochs"] == 1  # it ran after the failure
    assert [read_run(d)["exit_code"] for d in (diverged, trained)] == [3, 0]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: a job of this multirun failed (the others ran): non-finite loss at epoch 0")
    assert "Traceback" not in result.stderr


def test_a_run_another_process_holds_is_left_to_it_and_the_multirun_goes_on(tmp_path):
    """The same sweep continued by two commands at once (two machines on one filesystem): each job's dir is
    held by the process training it, and the other command skips it, writing nothing there, and exits 75."""
    sweep = tmp_path / "sweep"
    held = sweep / "0-resnet20-cbam-s0"
    with RunRecords(held).claimed() as holder:
        assert holder is None
        result = run(
            "train.py", "-m", *FAST, "seed=0,1", f"hydra.sweep.dir={sweep}", "resume=auto", cwd=tmp_path, check=False
        )  # fmt: skip
        assert sorted(p.name for p in held.iterdir()) == ["train.lock"]
    assert result.returncode == 75, result.stderr[-2000:]
    assert json.loads((sweep / "1-resnet20-cbam-s1" / "summary.json").read_text())["epochs"] == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(
        f"error: a job of this multirun failed (the others ran): {held} is being trained by another process (pid "
    ), last_line
    assert not held.exists() and not (sweep / "1-resnet20-cbam-s1" / "train.lock").exists()


@pytest.mark.parametrize(
    "error",
    [Diverged("non-finite loss at epoch 0"), torch.OutOfMemoryError("CUDA out of memory")],
    ids=["diverged", "crash"],
)
def test_a_failed_multirun_job_frees_what_its_frames_held(monkeypatch, caplog, error):
    """Hydra keeps each failed job's exception until the multirun ends; the job's model must not live on in
    it (the next job would start with its memory taken). A crash's traceback is logged when it happens."""

    class Model:
        pass

    held = []

    @cli.entry_point
    def job():
        model = Model()
        held.append(weakref.ref(model))
        raise error

    multirun = SimpleNamespace(get=lambda: SimpleNamespace(mode=RunMode.MULTIRUN))
    monkeypatch.setattr(cli, "HydraConfig", multirun)
    with pytest.raises(type(error)):  # raised for Hydra to record, not an exit
        job()
    assert held[0]() is None
    if not isinstance(error, Diverged):
        assert "the job crashed" in caplog.text and "Traceback" in caplog.text and "raise error" in caplog.text


# ---- bad input ----


def slow(*case):
    return pytest.param(*case, marks=pytest.mark.slow)


# One case of each mechanism in `make test` (a preset Hydra cannot find, our own check, a checkpoint of
# another variant, a file that is not a checkpoint, a constructor's rejection, an option pair refused);
# the other cases of the same mechanisms in `make nightly`: each is a process start (~5 s).
@pytest.mark.parametrize(
    "script, args, message",
    [
        ("train.py", ["attention=nope"], "Could not find 'attention/nope'"),
        slow("train.py", ["model=resnet19"], "Could not find 'model/resnet19'"),
        slow("train.py", ["data=mnist3d"], "Could not find 'data/mnist3d'"),
        slow("train.py", ["data=fashion_mnist", "data.source.root=/no/such/dir"], "/no/such/dir"),
        ("train.py", ["trainer.epochs=0"], "trainer.epochs=0 must be a positive integer"),
        slow("train.py", ["data.batch_size=-8"], "data.batch_size=-8 must be a positive integer"),
        slow("train.py", ["resume=/no/such/last.pt"], "/no/such/last.pt does not exist"),
        (
            "train.py",
            ["resume=FINISHED/last.pt", "trainer.epochs=2", "attention=cbam_deep_spatial"],
            "different model or attention",
        ),
        slow("eval.py", ["checkpoint=FINISHED/last.pt", "batch_size=0"], "must be a positive integer"),
        slow("eval.py", ["checkpoint=/no/such/best.pt"], "/no/such/best.pt does not exist"),
        ("eval.py", ["checkpoint=NOT_A_CHECKPOINT"], "is not a readable checkpoint"),
        slow("eval.py", [], "pass the checkpoint to evaluate"),
        # what a library constructor rejects, named by the config key it came from
        ("train.py", ["optim.optimizer.lr=-1"], "optim.optimizer: SGD rejected the config (Invalid learning rate: -1"),
        slow("train.py", ["+attention.bogus=1"], "attention: ChannelSpatialAttention rejected the config"),
        slow("train.py", ["data.source.train_size=-5"], "data.source: cbam.data.sources.synthetic rejected the config"),
        slow("train.py", ["model.widths=[16,32,-64]"], "model: cbam.models.ResNet rejected the config"),
        ("train.py", ["trainer.sync_bn=true", "trainer.compile=true"], "breaks its graph at every SyncBatchNorm"),
    ],
)
def test_bad_input_is_one_clear_line_and_touches_no_run(finished_run, tmp_path, script, args, message):
    """Exit 2, one line saying what to do; nothing written into the run dir the command points at, and the
    finished run its checkpoint arguments point into left byte for byte as it was."""
    before = tree_digest(finished_run)
    junk = tmp_path / "notes.txt"
    junk.write_text("not a checkpoint\n")
    args = [a.replace("NOT_A_CHECKPOINT", str(junk)).replace("FINISHED", str(finished_run)) for a in args]
    own_data = any(a.startswith("data=") for a in args)
    new = tmp_path / "new"
    extra = [*(BASE if own_data else FAST), f"hydra.run.dir={new}"] if script == "train.py" else []
    result = run(script, *extra, *args, cwd=tmp_path, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-2000:]
    errors = [line for line in output.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and message in errors[0], output[-2000:]
    assert "Traceback" not in output
    assert not (new.exists() and any(new.iterdir()))  # Hydra makes the dir; the run writes nothing into it
    assert tree_digest(finished_run) == before


def test_a_new_run_never_writes_into_another_runs_dir(finished_run, tmp_path):
    before = tree_digest(finished_run)
    result = run("train.py", *FAST, f"hydra.run.dir={finished_run}", cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert "already holds a run: pass resume=auto" in result.stderr + result.stdout
    assert tree_digest(finished_run) == before  # train.log included: the refusal is not appended to it


def test_train_runs_in_process_from_a_composed_config(tmp_path):
    """The engine needs no Hydra job: a config composed in Python and a RunContext are all it takes."""
    cfg = compose_config("train", *FAST, "attention=cbam", "attention.spatial_kernel=3")
    context = RunContext(
        run_dir=tmp_path / "run",
        choices={"attention": "cbam", "model": "resnet20", "data": "synthetic"},
        overrides=["attention.spatial_kernel=3"],
    )
    summary = train(cfg, context)
    assert summary["variant"] == "cbam+spatial_kernel=3" and summary["overrides"] == ["attention.spatial_kernel=3"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary
    [row] = rows(tmp_path / "run")
    assert summary["final"]["val/top1"] == row["val/top1"]
    assert "epoch 1/1" in (tmp_path / "run" / "train.log").read_text()
    with pytest.raises(ValueError, match="already holds a run"):
        train(cfg, context)


def test_eval_refuses_a_checkpoint_of_another_variant(finished_run, tmp_path):
    other = tmp_path / "other"
    sizes = ["data.source.train_size=32", "data.source.val_size=32"]
    tiny = [*(o for o in FAST if not o.startswith("data.source.")), *sizes]
    run("train.py", *tiny, "attention=cbam_deep_spatial", f"hydra.run.dir={other}", cwd=tmp_path)
    (finished_run.parent / "mixed").mkdir(exist_ok=True)
    mixed = finished_run.parent / "mixed"
    (mixed / "config.yaml").write_text((finished_run / "config.yaml").read_text())
    (mixed / "last.pt").write_bytes((other / "last.pt").read_bytes())
    result = run("eval.py", f"checkpoint={mixed / 'last.pt'}", "device=cpu", cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert "different model or attention variant" in result.stderr + result.stdout
    assert "spatial.conv.3.weight" in result.stderr + result.stdout
    assert "The config.yaml beside it is another run's" in result.stderr


class HostSyncs(torch.overrides.TorchFunctionMode):
    """Counts what makes the host wait for (or copy from) the device: a tensor read into Python, and a
    tensor built from Python data."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__bool__,
             torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__}  # fmt: skip
    BUILDS = {torch.tensor, torch.as_tensor}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += func in self.READS or func in self.BUILDS
        return func(*args, **(kwargs or {}))


def host_syncs(tmp_path, train_size: int, *overrides: str) -> int:
    cfg = compose_config("train", "logger=none", *FAST[:-1], f"data.source.train_size={train_size}",
                         "data.source.val_size=32", "trainer.log_every_n_steps=1000", *overrides)  # fmt: skip
    context = RunContext(run_dir=tmp_path / f"run-{train_size}", choices={"attention": "cbam", "model": "resnet20",
                                                                          "data": "synthetic"})  # fmt: skip
    with HostSyncs() as mode:
        train(cfg, context)
    return mode.count


@pytest.mark.parametrize(
    "overrides", [(), ("trainer.grad_clip=1.0", "trainer.ema_decay=0.99")], ids=["default", "clip+ema"]
)
def test_a_training_step_waits_for_the_device_only_at_the_log_cadence(tmp_path, overrides):
    """2 and 4 steps between two checks: the same number of host syncs, so none comes from a step."""
    assert host_syncs(tmp_path, 64, *overrides) == host_syncs(tmp_path, 128, *overrides)


def test_every_run_starts_from_a_clean_compile_state(tmp_path, monkeypatch):
    """The jobs of a multirun share a process: each resets dynamo, whose recompile budget (8 entries) later
    jobs would otherwise find spent, and run eager without a word."""
    resets = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    cfg = compose_config("train", "logger=none", *FAST[:-1], "data.source.train_size=64", "data.source.val_size=32")
    for job in (0, 1):
        context = RunContext(run_dir=tmp_path / f"job{job}", choices={"attention": "cbam", "model": "resnet20",
                                                                      "data": "synthetic"}, job=job)  # fmt: skip
        train(cfg, context)
    assert resets == [1, 1]
