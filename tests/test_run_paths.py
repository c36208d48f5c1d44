"""The paths through a run that a user takes besides the straight one: each way of resuming, relaunching a
finished run, best versus final epoch, the DataLoader, the file datasets, logger.mode=auto. In-process
(train() from a composed config), tiny, each failing when its path is silently ignored."""

import json
import os
import re
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config
from test_data import cifar_images, write_image_folder, write_pickle
from test_recipes import TINY
from test_train import METRICS, rows, tree_digest

from cbam import tracking
from cbam.engine import distributed
from cbam.engine.checkpoint import load_checkpoint
from cbam.engine.eval_checkpoint import evaluate_checkpoint
from cbam.engine.restore import restore_run
from cbam.engine.run import RunContext, train
from cbam.errors import ConfigError, Preempted
from cbam.report.report import README_END, build, readme_marker, update_readme
from cbam.report.runs import BatchStatsEval
from cbam.report.table import csv_row

# The LR stays 0.1 for the first epochs whatever trainer.epochs is, so a run resumed with more epochs
# than it started with must match one that had them from the start.
CONSTANT_LR = ["optim/scheduler=multistep", "optim.scheduler.milestones=[10]"]


def train_in(run_dir, *overrides: str, attention: str = "cbam", data: str = "synthetic", context: dict | None = None):
    # A file dataset keeps its own source and sizes.
    tiny = [o for o in TINY if data == "synthetic" or not o.startswith(("data=", "data.source."))]
    cfg = compose_config("train", *tiny, f"attention={attention}", *overrides)
    choices = {"attention": attention, "model": "resnet20", "data": data}
    return train(cfg, RunContext(run_dir=run_dir, choices=choices, **(context or {})))


def metrics(run_dir) -> list[dict]:
    return [{k: r[k] for k in ("epoch", *METRICS)} for r in rows(run_dir)]


def evaluated(checkpoint) -> dict:
    cfg = compose_config("eval", f"checkpoint={checkpoint}", "device=cpu", "wandb=false",
                         f"output={checkpoint.parent / f'eval-{checkpoint.stem}.json'}")  # fmt: skip
    return evaluate_checkpoint(cfg)


@pytest.mark.parametrize("native", [False, True], ids=["emulated", "native"])
def test_bf16_on_a_cpu_that_emulates_it_is_warned_about_in_the_log(tmp_path, monkeypatch, native):
    """A pinned trainer.precision=bf16 (the published ablation pins it) on a CPU without AVX512-BF16 or AMX runs,
    several times slower: train.log says so, and says nothing where the CPU runs bf16 natively."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
    summary = train_in(tmp_path / "run", "trainer.precision=bf16")
    assert summary["fast_path"]["precision"] == "bf16"
    log = (tmp_path / "run" / "train.log").read_text()
    assert ("trainer.precision=bf16 on a cpu without native bf16 is emulated" in log) != native


def test_best_and_final_epochs_are_told_apart(tmp_path):
    # From epoch 2 the LR is -0.1: gradient ascent, so the last epoch is worse than the best one.
    summary = train_in(tmp_path / "run", "trainer.epochs=3", "optim/scheduler=multistep",
                       "optim.scheduler.milestones=[2]", "optim.scheduler.gamma=-1")  # fmt: skip
    history = rows(tmp_path / "run")
    top1 = [r["val/top1"] for r in history]
    best = max(range(3), key=top1.__getitem__)
    assert best != 2 and top1[2] < top1[best], top1
    assert (summary["best_epoch"], summary["best_val_top1"]) == (best, top1[best])
    assert summary["final"] == {k: history[-1][k] for k in summary["final"]}
    # best.pt holds the best epoch's weights, last.pt the final ones; each re-evaluates to its epoch's top-1.
    assert load_checkpoint(tmp_path / "run" / "best.pt")["epoch"] == best + 1
    assert evaluated(tmp_path / "run" / "best.pt")["val/top1"] == top1[best]
    assert evaluated(tmp_path / "run" / "last.pt")["val/top1"] == top1[2]
    # The comparison uses the final epoch, never the best (which would pick an epoch on the test split).
    [variant] = build([tmp_path / "run"], baseline="cbam").variants
    assert variant.top1 == [top1[2]]


def test_eval_can_normalise_chosen_batchnorms_with_each_batchs_statistics(tmp_path):
    """eval.py bn_batch_stats=GLOB (the train/eval gap diagnostic): the BatchNorm layers it matches normalise
    with each val batch's own statistics, by default batches of the run's training size, and every other
    layer as in eval mode; the checkpoint and its own evaluation are left as they were."""
    run_dir = tmp_path / "run"
    train_in(run_dir, attention="cbam_improved")  # a shared MLP with BN over pooled descriptors
    checkpoint = run_dir / "last.pt"
    plain = evaluated(checkpoint)
    untouched = checkpoint.read_bytes(), (run_dir / "eval-last.json").read_bytes()
    diagnostic = ["device=cpu", "wandb=false", "bn_batch_stats=*.channel.mlp.*"]
    result = evaluate_checkpoint(compose_config("eval", f"checkpoint={checkpoint}", *diagnostic))

    # The reference: those layers in train mode with momentum 0 (batch statistics, running ones kept), in
    # batches of data.batch_size=32 (TINY).
    run = restore_run(checkpoint, device=torch.device("cpu"), eval_batch_size=32)
    run.model.eval()
    chosen = [n for n, m in run.model.named_modules() if isinstance(m, torch.nn.BatchNorm2d) and ".channel.mlp." in n]
    for name in chosen:
        run.model.get_submodule(name).train().momentum = 0.0
    loss, hits, images = 0.0, 0, 0
    layout = torch.channels_last if run.config.trainer.channels_last else torch.contiguous_format
    with torch.no_grad():
        for x, y in run.val_loader.epoch(0):
            logits = run.model(x.contiguous(memory_format=layout))
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            hits += (logits.argmax(1) == y).sum().item()
            images += len(y)
    assert len(chosen) == 6
    assert result["bn_batch_stats"] == {"pattern": "*.channel.mlp.*", "layers": chosen, "batch_size": 32}
    assert result["val/loss"] == pytest.approx(loss / images, rel=1e-5)
    assert result["val/top1"] == pytest.approx(100 * hits / images)
    assert result["val/loss"] != plain["val/loss"]
    assert json.loads((run_dir / "eval-last-bn_batch_stats.json").read_text()) == result
    assert (checkpoint.read_bytes(), (run_dir / "eval-last.json").read_bytes()) == untouched

    # output=PATH: its dir is made; a path that cannot be a file is one clear error.
    elsewhere = tmp_path / "reports" / "diagnostic.json"
    evaluate_checkpoint(compose_config("eval", f"checkpoint={checkpoint}", *diagnostic, f"output={elsewhere}"))
    assert json.loads(elsewhere.read_text())["val/top1"] == result["val/top1"]
    for overrides, message in [
        ([f"output={elsewhere}/x.json"], re.escape(f"cannot write {elsewhere}/x.json (File exists: {elsewhere})")),
        (["bn_batch_stats=*.no_such_layer"], "matches none of the model's 21 BatchNorm layers"),
        (["bn_batch_stats=*", "batch_size=3"], "leaves a batch of one of the 64 val images"),  # 64 = 21 * 3 + 1
    ]:
        bad = compose_config("eval", f"checkpoint={checkpoint}", "device=cpu", "wandb=false", *overrides)
        with pytest.raises(ConfigError, match=message):
            evaluate_checkpoint(bad)


def test_compare_bn_batch_stats_compares_what_eval_measured_and_refuses_what_it_lacks(tmp_path):
    """compare.py --bn-batch-stats: a run with BatchNorm layers matching the records' glob is compared at the
    top-1 that eval.py bn_batch_stats measured on its last.pt, a run without such layers at its own final
    top-1; a run that has such layers but no record, or a record of other weights, is refused, naming the
    eval.py command that makes it."""
    sweep = tmp_path / "sweep"
    for attention in ("cbam", "cbam_improved"):
        for seed in (0, 1):
            train_in(sweep / f"{attention}-s{seed}", f"seed={seed}", attention=attention)
    diagnostic = ["device=cpu", "wandb=false", "bn_batch_stats=*.channel.mlp.*"]
    checkpoints = {seed: sweep / f"cbam_improved-s{seed}" / "last.pt" for seed in (0, 1)}
    measured = {
        s: evaluate_checkpoint(compose_config("eval", f"checkpoint={c}", *diagnostic)) for s, c in checkpoints.items()
    }
    final = {(a, s): json.loads((sweep / f"{a}-s{s}" / "summary.json").read_text())["final"]["val/top1"]
             for a in ("cbam", "cbam_improved") for s in (0, 1)}  # fmt: skip

    c = build([sweep], baseline="cbam", bn_batch_stats=True)
    variants = {v.name: v for v in c.variants}
    assert variants["cbam_improved"].top1 == [measured[0]["val/top1"], measured[1]["val/top1"]]
    assert variants["cbam"].top1 == [final["cbam", 0], final["cbam", 1]]
    differences = [measured[s]["val/top1"] - final["cbam", s] for s in (0, 1)]
    assert variants["cbam_improved"].paired.diff == pytest.approx(np.mean(differences))
    assert c.bn == BatchStatsEval("*.channel.mlp.*", 32)  # the runs' training batch size (TINY), eval.py's default
    assert c.config()["bn_batch_stats"] == {"pattern": "*.channel.mlp.*", "batch_size": 32}
    assert c.described().endswith(
        "Accuracy: the final weights' val top-1 with the BatchNorm layers matching '*.channel.mlp.*' on the "
        "statistics of each val batch of 32 (eval.py bn_batch_stats); without such layers, cbam keep their "
        "final-epoch top-1."
    )
    assert [csv_row(v)["accuracy"] for v in c.variants] == ["final_epoch", "bn_batch_stats"]
    shown = {row["variant"]: row for row in c.seed_rows()}
    assert shown["cbam_improved"]["seed 1"] == f"{final['cbam_improved', 1]:.2f} → {measured[1]['val/top1']:.2f}"
    assert shown["cbam"]["seed 0"] == f"{final['cbam', 0]:.2f}"
    # A README keeps it under a marker of its own, with each run's two accuracies by seed below the table.
    readme = tmp_path / "README.md"
    marker = readme_marker([sweep], baseline="cbam", bn_batch_stats=True)
    assert marker == f"<!-- compare.py {sweep} --baseline cbam --bn-batch-stats -->"
    readme.write_text(f"{marker}\nold\n{README_END}\n")
    update_readme(readme, [sweep], c)
    block = readme.read_text()
    assert "| variant | seed 0 | seed 1 |" in block and "old" not in block
    assert f"| cbam_improved | {shown['cbam_improved']['seed 0']} | {shown['cbam_improved']['seed 1']} |" in block
    # Without the option, the same runs are compared as they evaluated themselves.
    plain = {v.name: v for v in build([sweep], baseline="cbam").variants}
    assert plain["cbam_improved"].top1 == [final["cbam_improved", 0], final["cbam_improved", 1]]

    # Refused, each with the eval.py command that makes the record: one of other weights, of another run,
    # measured another way, unreadable; a run with such layers and none; no record at all.
    records = {seed: sweep / f"cbam_improved-s{seed}" / "eval-last-bn_batch_stats.json" for seed in (0, 1)}
    written = records[1].read_text()
    # eval.py run inside the run dir (checkpoint=last.pt) records the path as given: still this run's record
    records[1].write_text(json.dumps(json.loads(written) | {"checkpoint": "last.pt"}))
    inside = {v.name: v for v in build([sweep], baseline="cbam", bn_batch_stats=True).variants}
    assert inside["cbam_improved"].top1 == variants["cbam_improved"].top1
    remake = f"python eval.py checkpoint={sweep / 'cbam_improved-s1'}/last.pt 'bn_batch_stats="
    for change, refusal in [
        ({"epoch": 0}, "evaluated the weights of epoch 0, but the run ended at epoch 1: evaluate its last.pt again ("
                       f"{remake}*.channel.mlp.*')"),
        ({"checkpoint": measured[0]["checkpoint"]}, f"is the record of {checkpoints[0]}, not of this run's last.pt: "
                                                    f"{remake}<glob of BN layers>'"),
        ({"bn_batch_stats": measured[1]["bn_batch_stats"] | {"batch_size": 16}},
         "measured in different ways ('*.channel.mlp.*' in batches of 32: cbam_improved-s0; '*.channel.mlp.*' in "
         "batches of 16: cbam_improved-s1): evaluate them all alike"),
        ({"val/top1": None}, f"(TypeError(\"float() argument must be a string or a real number, not 'NoneType'\")): "
                             f"make it again with {remake}<glob of BN layers>'"),
    ]:  # fmt: skip
        records[1].write_text(json.dumps(json.loads(written) | change))
        with pytest.raises(ConfigError, match=re.escape(refusal)):
            build([sweep], baseline="cbam", bn_batch_stats=True)
    records[1].unlink()
    refusal = (
        "1 run(s) have BatchNorm layers matching '*.channel.mlp.*' but no eval-last-bn_batch_stats.json "
        f"({sweep / 'cbam_improved-s1'}): make it in each with "
        "python eval.py checkpoint=<run dir>/last.pt 'bn_batch_stats=*.channel.mlp.*'"
    )
    with pytest.raises(ConfigError, match=re.escape(refusal)):
        build([sweep], baseline="cbam", bn_batch_stats=True)
    records[0].unlink()
    with pytest.raises(ConfigError, match="none of the runs has eval-last-bn_batch_stats.json"):
        build([sweep], baseline="cbam", bn_batch_stats=True)


def test_resume_auto_in_an_empty_dir_starts_from_scratch(tmp_path):
    train_in(tmp_path / "plain")
    train_in(tmp_path / "auto", "resume=auto")
    assert metrics(tmp_path / "auto") == metrics(tmp_path / "plain")
    assert "resume=auto: no last.pt" in (tmp_path / "auto" / "train.log").read_text()


def test_resume_from_a_checkpoint_into_a_new_dir_continues_it_there(tmp_path):
    train_in(tmp_path / "straight", "trainer.epochs=2", *CONSTANT_LR)
    train_in(tmp_path / "first", "trainer.epochs=1", *CONSTANT_LR)
    before = tree_digest(tmp_path / "first")
    train_in(tmp_path / "second", f"resume={tmp_path / 'first' / 'last.pt'}", "trainer.epochs=2", *CONSTANT_LR)
    assert metrics(tmp_path / "second") == metrics(tmp_path / "straight")[1:]  # epoch 1, as the straight run's
    assert tree_digest(tmp_path / "first") == before  # the run resumed from is only read
    log = (tmp_path / "second" / "train.log").read_text()
    assert f"resumed from {tmp_path / 'first' / 'last.pt'} at epoch 1" in log


def test_a_run_resumed_with_other_steps_per_epoch_continues_its_schedule_in_its_own_steps(tmp_path):
    """An epoch's end resumes with any number of processes or batch size, which changes the steps in an epoch:
    the LR schedule continues at the resumed run's own step (a cosine over three epochs of two steps), not
    at the old run's step count. Mid-epoch, the steps must match."""
    train_in(tmp_path / "first", "data.batch_size=32")  # one epoch of 4 steps
    first = tmp_path / "first" / "last.pt"
    train_in(tmp_path / "resumed", f"resume={first}", "trainer.epochs=3", "data.batch_size=64")  # 2 steps an epoch
    train_in(tmp_path / "straight", "trainer.epochs=3", "data.batch_size=64")
    lr = {name: [r["lr"] for r in rows(tmp_path / name)] for name in ("resumed", "straight")}
    assert lr["resumed"] == lr["straight"][1:] and lr["resumed"][0] > 0  # at step 4 of 6; the old count gave 0

    state = load_checkpoint(first)
    state["meter"]["steps"] = 1  # as if written one step into epoch 1
    torch.save(state, tmp_path / "mid.pt")
    mid = f"resume={tmp_path / 'mid.pt'}"
    for batch_size, steps in ((64, 2), (31, 4)):  # 128 images: in 4 batches of 31 too, at other positions
        with pytest.raises(
            ConfigError, match=f"mid-epoch with batches of 32, 4 steps an epoch, and this run has batches of "
            f"{batch_size}, {steps} steps: resume it with the data.batch_size it trained with",
        ):  # fmt: skip
            train_in(tmp_path / "mid", mid, "trainer.epochs=3", f"data.batch_size={batch_size}")
        assert not (tmp_path / "mid").exists()


@pytest.mark.parametrize("first, then", [("fp32", "fp16"), ("fp16", "fp32")])
def test_a_run_resumed_in_another_precision_trains_on(tmp_path, first, then):
    """trainer.precision is not part of what a run is: fp16's loss scale starts afresh, or is dropped."""
    train_in(tmp_path / "run", f"trainer.precision={first}")
    summary = train_in(tmp_path / "run", "resume=auto", "trainer.epochs=2", f"trainer.precision={then}")
    assert summary["epochs"] == 2 and summary["fast_path"]["precision"] == then


def test_another_runs_checkpoint_starts_a_run_of_its_own_and_never_over_one(tmp_path):
    """resume=<another run's checkpoint>: a new run in this dir with its own W&B run (the original's is left
    alone); refused over a dir that holds a run, and for a checkpoint with nothing left to train."""
    train_in(tmp_path / "first", "logger=wandb")
    checkpoint = tmp_path / "first" / "last.pt"
    original = load_checkpoint(checkpoint)["wandb_id"]
    # At an LR that makes its epoch worse than the one it started from, which must not count as its best.
    forked = train_in(
        tmp_path / "fork", f"resume={checkpoint}", "trainer.epochs=2", "logger=wandb", "optim.optimizer.lr=1.0"
    )
    assert original and forked["wandb_run_id"] not in (None, original)
    assert forked["best_epoch"] == 1  # the best of its own epochs, not of the run it started from
    # Its own hyperparameters, not the checkpoint's (which the optimizer's state_dict carries).
    train_in(tmp_path / "decayed", f"resume={checkpoint}", "trainer.epochs=2", "optim.optimizer.weight_decay=0.01")
    groups = load_checkpoint(tmp_path / "decayed" / "last.pt")["optimizer"]["param_groups"]
    assert {g["weight_decay"] for g in groups} == {0.01}

    before = tree_digest(tmp_path / "fork")
    with pytest.raises(ConfigError, match=f"{tmp_path / 'fork'} already holds a run: resume={checkpoint} would"):
        train_in(tmp_path / "fork", f"resume={checkpoint}", "trainer.epochs=2")
    finished = tmp_path / "fork" / "last.pt"
    with pytest.raises(ConfigError, match=f"{finished} has finished all 2 epochs: nothing is left to train in "):
        train_in(tmp_path / "another", f"resume={finished}", "trainer.epochs=2")
    assert tree_digest(tmp_path / "fork") == before and not (tmp_path / "another").exists()


def test_relaunching_a_finished_run_does_nothing(tmp_path):
    run_dir = tmp_path / "run"
    summary = train_in(run_dir)
    before = tree_digest(run_dir)
    assert train_in(run_dir, "resume=auto") == summary
    assert train_in(run_dir, f"resume={run_dir / 'last.pt'}") == summary
    # Its records alone (as committed under results/, no checkpoints) are a finished run too.
    for name in ("last.pt", "best.pt"):
        (run_dir / name).unlink()
    before = {k: v for k, v in before.items() if not k.endswith(".pt")}
    assert train_in(run_dir, "resume=auto") == summary
    assert tree_digest(run_dir) == before
    # ...which cannot train on: resume=auto would start it again over its records.
    with pytest.raises(ConfigError, match="holds a finished run's records without its last.pt"):
        train_in(run_dir, "resume=auto", "trainer.epochs=2")
    assert tree_digest(run_dir) == before


def test_a_stop_signal_after_the_last_step_still_stops_what_would_follow(tmp_path, monkeypatch):
    """SIGTERM during the final evaluation or the end-of-run figures: the run is finished, and the stop
    still applies (Preempted, exit 75), so that a multirun does not start its next job to be killed. No
    barrier follows: under torchrun the other ranks, past their last collective, may have returned already."""
    events = []
    monkeypatch.setattr(distributed, "barrier", lambda: events.append("barrier"))

    def signalled_at_the_end(finished):
        events.append("signal")
        os.kill(os.getpid(), signal.SIGTERM)

    cfg = compose_config("train", *TINY, "attention=cbam")
    choices = {"attention": "cbam", "model": "resnet20", "data": "synthetic"}
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted, match="after the last step of .*, which is finished"):
        train(cfg, RunContext(run_dir=tmp_path / "run", choices=choices), end_of_run=[signalled_at_the_end])
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["epochs"] == cfg.trainer.epochs
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is the caller's again
    assert "barrier" in events and events[-1] == "signal"


def test_a_resumed_run_whose_last_epoch_was_its_best_rewrites_best_pt(tmp_path):
    """last.pt is written before best.pt: a kill between the two leaves best.pt behind (here: none at all).
    Resumed, the run writes best.pt from the checkpoint, which then is the best epoch's state."""
    run_dir = tmp_path / "run"
    train_in(run_dir, "trainer.epochs=1", *CONSTANT_LR)
    (run_dir / "best.pt").unlink()
    # Trained on (from its own checkpoint, named) at an LR that makes epoch 1 worse, so that only the
    # rewrite can give best.pt.
    last = run_dir / "last.pt"
    summary = train_in(run_dir, f"resume={last}", "trainer.epochs=2", "optim.optimizer.lr=1.0", *CONSTANT_LR)
    assert summary["best_epoch"] == 0 and load_checkpoint(run_dir / "best.pt")["epoch"] == 1


def test_resume_auto_refuses_a_dir_that_holds_another_run(tmp_path):
    """A dir is found by its name; resume=auto must not continue, or skip as finished, a run of another
    attention config or seed as if it were the one asked for."""
    run_dir = tmp_path / "run"
    train_in(run_dir)
    before = tree_digest(run_dir)
    with pytest.raises(ConfigError, match=r"holds another run \(attention.reduction: 16 there, 8 asked\)"):
        train_in(run_dir, "resume=auto", "attention.reduction=8")
    with pytest.raises(ConfigError, match=r"holds another run \(seed: 0 there, 1 asked\)"):
        train_in(run_dir, "resume=auto", "seed=1")
    with pytest.raises(ConfigError, match=r"holds another run \(optim.optimizer.lr: 0.1 there, 0.05 asked\)"):
        train_in(run_dir, "resume=auto", "optim.optimizer.lr=0.05")  # a sweep over lr, relaunched reordered
    assert tree_digest(run_dir) == before
    assert train_in(run_dir, "resume=auto", "tags=[again]")["seed"] == 0  # the same run: left alone


@pytest.mark.parametrize("workers", [0, 2])
def test_the_dataloader_trains_to_the_memory_loaders_metrics(tmp_path, workers):
    # Without cropping both loaders give the same batches in the same order (with it, they draw the crops
    # alike but not identically: tests/test_data.py), so a run must not tell them apart.
    train_in(tmp_path / "memory", "data.loader=memory", "data.pad=0")
    train_in(tmp_path / "torch", "data.loader=torch", "data.pad=0", f"data.num_workers={workers}")
    assert metrics(tmp_path / "torch") == metrics(tmp_path / "memory")


def test_cifar_trains_from_its_python_pickles(tmp_path):
    rng = np.random.default_rng(0)
    base = tmp_path / "cifar-10-batches-py"
    for i in range(1, 6):
        batch = {"data": cifar_images(16, rng), "labels": rng.integers(0, 10, 16).tolist()}
        write_pickle(base / f"data_batch_{i}", batch)
    write_pickle(base / "test_batch", {"data": cifar_images(20, rng), "labels": rng.integers(0, 10, 20).tolist()})
    write_pickle(base / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    summary = train_in(tmp_path / "run", "data=cifar10", f"data.source.root={tmp_path}", "data.image_size=32",
                       "data.eval_batch_size=8", data="cifar10")  # fmt: skip
    [row] = rows(tmp_path / "run")
    assert row["step"] == 80 // 32 and summary["data"] == "cifar10"
    assert summary["final"]["val/top1"] in {100 * k / 20 for k in range(21)}  # over the 20 test images
    assert len(summary["val_per_class_top1"]) == 10


def test_imagenet_trains_from_an_image_folder(tmp_path):
    write_image_folder(tmp_path, classes=("cat", "dog"), per_class=4)
    summary = train_in(tmp_path / "run", "data=imagenet", f"data.source.root={tmp_path}", "data.num_classes=2",
                       "data.image_size=16", "data.batch_size=4", "data.eval_batch_size=4", "data.num_workers=0",
                       data="imagenet")  # fmt: skip
    [row] = rows(tmp_path / "run")
    assert row["step"] == 8 // 4 and summary["data"] == "imagenet" and summary["model"] == "resnet20"
    assert summary["final"]["val/top1"] in {100 * k / 8 for k in range(9)}  # over the 8 val images
    assert len(summary["val_per_class_top1"]) == 2


def test_compare_groups_runs_by_preset_and_attention_overrides(tmp_path):
    sweep = tmp_path / "sweep"
    for seed in (0, 1):
        train_in(sweep / f"cbam-s{seed}", f"seed={seed}")
        train_in(sweep / f"k3-s{seed}", f"seed={seed}", "attention.spatial_kernel=3",
                 context={"overrides": ["attention.spatial_kernel=3"]})  # fmt: skip
    comparison = build([sweep], baseline="cbam")
    assert {v.name: sorted(v.seeds) for v in comparison.variants} == {"cbam": [0, 1], "cbam+spatial_kernel=3": [0, 1]}
    kernels = {json.loads((d / "summary.json").read_text())["variant"]: load_checkpoint(d / "last.pt")["config"]
               ["attention"]["spatial_kernel"] for d in sweep.iterdir()}  # fmt: skip
    assert kernels == {"cbam": 7, "cbam+spatial_kernel=3": 3}


@pytest.mark.parametrize(
    ("env", "netrc", "expected"),
    [
        ({"WANDB_MODE": "disabled"}, False, "disabled"),  # W&B's own setting wins
        ({}, False, "offline"),  # no key anywhere
        ({"WANDB_API_KEY": "k" * 40}, False, "online"),
        ({}, True, "online"),  # the key `wandb login` writes to ~/.netrc
    ],
)
def test_logger_mode_auto_goes_online_only_with_a_key(monkeypatch, tmp_path, env, netrc, expected):
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("HOME", str(tmp_path))
    if netrc:
        (tmp_path / ".netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {'k' * 40}\n")
        (tmp_path / ".netrc").chmod(0o600)
    assert tracking.resolve_mode("auto") == expected
    assert tracking.resolve_mode("offline") == "offline"  # a mode given is kept
