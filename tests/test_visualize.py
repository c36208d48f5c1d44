"""Attention maps, Grad-CAM and their figures (cbam.viz, scripts/visualize.py)."""

import importlib.util
import inspect
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, compose_config
from omegaconf import OmegaConf
from PIL import Image

from cbam.data import build_loaders
from cbam.data.sources import synthetic_patch
from cbam.errors import ConfigError
from cbam.models import build_model
from cbam.viz import capture_attention, grad_cam, log_end_of_run, visualize_checkpoints
from cbam.viz.panel import choose_images, model_panel, take_images

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ONE_THREAD = os.environ | {"OMP_NUM_THREADS": "1"}  # for the subprocesses, as the one_thread fixture for this one
TINY = ["data=synthetic", "model.layers=[1,1,1]"]  # CIFAR ResNet widths 16/32/64, one block per stage, 32 px
# train.py as tests/test_train.py runs it, with one block per stage and no W&B: only the checkpoints matter here.
TRAIN = [
    "data=synthetic", "data.source.train_size=256", "data.source.val_size=128", "data.batch_size=32",
    "trainer.epochs=1", "trainer.device=cpu", "logger=none", "model.layers=[1,1,1]",
]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small convs on a shared 2-core machine: one thread is ~10x faster than two fighting over the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_png(path: Path) -> None:
    assert path.is_file() and path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as img:
        img.verify()
        assert min(img.size) > 100


def no_hooks(model: torch.nn.Module) -> bool:
    return all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


# ---- attention maps ----


def rebuilt(attention: str, x, mc, ms):
    """A block's attention output from its input and its two maps, as the post composes the gates."""
    if attention == "cbam":
        return x * mc * ms  # the spatial gate sees x * Mc, and its map multiplies that
    if attention == "cbam_parallel":
        return x + x * mc + x * ms
    return x * (mc if mc is not None else 1) * (ms if ms is not None else 1)


@pytest.mark.parametrize(
    "attention, spatial, channel",
    [("cbam", True, True), ("cbam_parallel", True, True), ("spatial_only", True, False),
     ("channel_only", False, True), ("none", False, False)],
)  # fmt: skip
def test_captured_maps_are_the_gates_that_multiply_the_features(attention, spatial, channel):
    model = build_model(compose_config("train", *TINY, f"attention={attention}")).eval()
    x = torch.randn(3, 3, 32, 32)
    blocks = ["layer1.0", "layer2.0", "layer3.0"]
    seen = {}
    handles = [
        model.get_submodule(b).attn.register_forward_hook(lambda m, i, o, b=b: seen.update({b: (i[0], o)}))
        for b in blocks
    ]
    with torch.no_grad():
        plain = model(x)
        with capture_attention(model) as maps:
            hooked = model(x)
    for h in handles:
        h.remove()
    # Reading the maps changes nothing: with hooks on its gates the attention runs its composite path (the
    # gates as modules, which the hooks see), which its fused CPU op matches to float32 rounding.
    torch.testing.assert_close(hooked, plain, rtol=1e-5, atol=1e-6)
    assert no_hooks(model)
    assert sorted(maps.spatial) == (blocks if spatial else [])
    assert sorted(maps.channel) == (blocks if channel else [])
    for block, size, width in zip(blocks, [32, 16, 8], [16, 32, 64], strict=True):
        ms, mc = maps.spatial.get(block), maps.channel.get(block)
        if spatial:
            assert ms.shape == (3, 1, size, size)
        if channel:
            assert mc.shape == (3, width, 1, 1)
        # Each block's attention output, rebuilt from its input and the captured maps alone, as the post's
        # arithmetic composes them: the maps are that block's gates, not some other tensor of the right shape.
        inp, out = seen[block]
        torch.testing.assert_close(out, rebuilt(attention, inp, mc, ms))


def test_hooks_are_removed_when_the_forward_pass_fails():
    model = build_model(compose_config("train", *TINY)).eval()
    with pytest.raises(RuntimeError), capture_attention(model):
        model(torch.randn(1, 5, 32, 32))  # wrong channel count
    assert no_hooks(model)


def test_unknown_block_names_the_valid_ones():
    model = build_model(compose_config("train", *TINY))
    with pytest.raises(ConfigError, match=r"layer9\.0.*layer1\.0, layer2\.0, layer3\.0"):
        with capture_attention(model, ["layer9.0"]):
            pass


# ---- Grad-CAM ----


def test_grad_cam_of_a_gap_linear_head_is_the_class_activation_map():
    """With global average pooling and a linear head, dy_c/dA_k = w_ck / (h w) everywhere, so Grad-CAM
    is ReLU(sum_k w_ck A_k) (Selvaraju et al., sec. 3.1): an independent float64 reference."""
    torch.manual_seed(1)
    model = build_model(compose_config("train", *TINY)).double().eval()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    target = torch.tensor([0, 3, 7, 9])
    cam, logits = grad_cam(model, x, target)
    with torch.no_grad():
        acts = model.forward_features(x)  # (4, 64, 8, 8)
        ref = F.relu(torch.einsum("nk,nkhw->nhw", model.fc.weight[target], acts))[:, None]
        ref = F.interpolate(ref, size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
        peak = ref.amax((1, 2), keepdim=True)
        ref = torch.where(peak > 0, ref / peak, 0.0)  # no positive evidence for the class: an all-zero map
        torch.testing.assert_close(logits, model(x).float())
    torch.testing.assert_close(cam, ref.float())
    assert cam.shape == (4, 32, 32) and cam.min() >= 0 and set(cam.amax((1, 2)).tolist()) <= {0.0, 1.0}
    assert no_hooks(model) and all(p.grad is None for p in model.parameters())


@pytest.fixture(scope="module")
def trained():
    """A tiny ResNet (no attention) trained for a few seconds on a synthetic task whose label is where
    a bright patch is: 9 classes, each its own 8x8 cell of a 3x3 grid on 24x24 noise."""
    cfg = compose_config(
        "train", *TINY, "attention=none", "model.widths=[8,16,16]", "data.num_classes=9", "data.in_chans=1",
        "data.image_size=24", "data.source.train_size=512", "data.source.val_size=64", "data.batch_size=32",
        "data.pad=0",
    )  # fmt: skip
    torch.manual_seed(0)
    train_loader, val_loader = build_loaders(cfg.data, device=torch.device("cpu"), seed=0)
    model = build_model(cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for epoch in range(4):
        for x, y in train_loader.epoch(epoch):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return cfg, model.eval(), val_loader


def test_grad_cam_peaks_at_the_patch_that_decides_the_label(trained):
    cfg, model, val_loader = trained
    x, y = take_images(val_loader, range(64))
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() >= 0.9  # the task is learnt
    cam, _ = grad_cam(model, x, y)
    hits = 0
    for c, label in zip(cam, y.tolist(), strict=True):
        top, left, size = synthetic_patch(label, cfg.data.num_classes, cfg.data.image_size)
        row, col = divmod(int(c.argmax()), cfg.data.image_size)
        margin = 2  # px: the last stage's map is 6x6, 4 px per cell
        hits += top - margin <= row < top + size + margin and left - margin <= col < left + size + margin
    assert hits / len(cam) >= 0.9  # chance: about 1 in 4 (a 12x12 square of 24x24)


def test_fixed_images_are_the_first_of_each_class(trained):
    _, _, val_loader = trained
    positions = choose_images(val_loader, 6)
    _, labels = take_images(val_loader, positions)
    assert labels.tolist() == [0, 1, 2, 3, 4, 5]
    all_labels = take_images(val_loader, range(64))[1].tolist()
    assert positions == [all_labels.index(c) for c in range(6)]
    assert len(choose_images(val_loader, 12)) == 12  # more rows than classes: filled with the first images


def test_panel_maps_are_the_models_own():
    model = build_model(compose_config("train", *TINY, "attention=cbam"))
    x, channels = torch.randn(2, 3, 32, 32), torch.randn(5, 3, 32, 32)
    panel = model_panel(model, x, torch.tensor([1, 2]), channels, title="cbam", blocks=["layer3.0"])
    assert model.training  # put back as found
    assert list(panel.spatial) == ["layer3.0"] and panel.spatial["layer3.0"].shape == (2, 32, 32)
    assert {s: v.shape for s, v in panel.channel.items()} == {"layer1": (5 * 16,), "layer2": (5 * 32,),
                                                             "layer3": (5 * 64,)}  # fmt: skip
    # The panel's maps are the model's own, captured here independently: the spatial map upsampled to the
    # image, the channel maps of every block of a stage, Grad-CAM of the predicted class.
    model.eval()
    with torch.no_grad(), capture_attention(model) as maps:
        model(x)
    up = F.interpolate(maps.spatial["layer3.0"], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(torch.from_numpy(panel.spatial["layer3.0"]), up)
    with torch.no_grad(), capture_attention(model) as maps:
        model(channels)
    torch.testing.assert_close(torch.from_numpy(panel.channel["layer2"]), maps.channel["layer2.0"].flatten())
    cam, _ = grad_cam(model, x)
    torch.testing.assert_close(torch.from_numpy(panel.cam), cam)
    with pytest.raises(ConfigError, match="target="):
        model_panel(model, x, torch.tensor([1, 2]), x, title="cbam", target="best")


# ---- end of a training run ----


class RecordingTracker:
    def __init__(self):
        self.calls = []

    def log_images(self, images: dict, step: int | None) -> None:
        self.calls.append((images, step))


def test_log_end_of_run_writes_the_pngs_and_hands_them_to_the_tracker(trained, tmp_path):
    _, model, val_loader = trained
    model.train()
    tracker = RecordingTracker()
    paths = log_end_of_run(model, val_loader, tmp_path, title="none", tracker=tracker, step=7, channel_images=32)
    assert paths == {name: tmp_path / "viz" / f"{name}.png" for name in ("attention_grid", "channel_weights")}
    for path in paths.values():
        assert_png(path)
    assert tracker.calls == [(paths, 7)]
    assert model.training and no_hooks(model) and all(p.grad is None for p in model.parameters())
    model.eval()


def test_end_of_run_defaults_are_the_scripts():
    cfg = compose_config("visualize")
    defaults = inspect.signature(log_end_of_run).parameters
    for key in ("num_images", "blocks", "target", "channel_images"):
        assert defaults[key].default == cfg[key], key


# ---- scripts/visualize.py on checkpoints of real training runs ----


def run_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts/visualize.py"), *args],
        cwd=cwd,
        env=ONE_THREAD,
        capture_output=True,
        text=True,
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """best.pt of two one-epoch train.py runs, attention=none and attention=cbam, trained side by side."""
    root = tmp_path_factory.mktemp("runs")
    jobs = {
        a: subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *TRAIN, f"attention={a}", f"hydra.run.dir={root / a}"],
            cwd=root,
            env=ONE_THREAD,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for a in ("none", "cbam")
    }
    for attention, job in jobs.items():
        _, err = job.communicate()
        assert job.returncode == 0, f"train.py attention={attention} failed:\n{err[-3000:]}"
    return {a: root / a / "best.pt" for a in jobs}


def test_script_shows_checkpoints_side_by_side(checkpoints, tmp_path):
    out = tmp_path / "viz"
    # The form, checkpoint= repeated; the script turns it into Hydra's list checkpoint=[a,b].
    result = run_script(
        f"checkpoint={checkpoints['none']}", f"checkpoint={checkpoints['cbam']}", f"output={out}",
        "device=cpu", "channel_images=32", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [str(out / "attention_grid.png"), str(out / "channel_weights.png")]
    for name in ("attention_grid.png", "channel_weights.png"):
        assert_png(out / name)


def test_repeated_checkpoints_become_one_list():
    spec = importlib.util.spec_from_file_location("visualize_script", ROOT / "scripts/visualize.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.merge_repeated(["checkpoint=a.pt", "device=cpu", "checkpoint=it's/b.pt"]) == [
        "checkpoint=['a.pt','it\\'s/b.pt']",
        "device=cpu",
    ]
    assert script.merge_repeated(["checkpoint=[a.pt,b.pt]", "checkpoint=c.pt"]) == ["checkpoint=[a.pt,b.pt,'c.pt']"]
    assert script.merge_repeated(["checkpoint=a.pt", "target=label"]) == ["checkpoint=a.pt", "target=label"]


def test_checkpoints_of_different_data_are_refused(checkpoints, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(checkpoints["cbam"].parent, other)
    config = OmegaConf.load(other / "config.yaml")
    config.data.source.val_size = 64
    OmegaConf.save(config, other / "config.yaml")
    cfg = compose_config("visualize", f"checkpoint=[{checkpoints['none']},{other / 'best.pt'}]", f"output={tmp_path}")
    with pytest.raises(ConfigError, match=r"different data .*data\.source=.*val_size.*one dataset at a time"):
        visualize_checkpoints(cfg)


def test_an_output_that_cannot_be_written_is_one_clear_error(checkpoints, tmp_path):
    taken = tmp_path / "figures"
    taken.write_text("a file, not a dir")
    cfg = compose_config("visualize", f"checkpoint={checkpoints['cbam']}", f"output={taken}")
    with pytest.raises(ConfigError, match=f"cannot write to {taken} \\(File exists: .*pass output=DIR somewhere"):
        visualize_checkpoints(cfg)
    assert taken.read_text() == "a file, not a dir"


def test_missing_checkpoint_is_one_line_and_exit_2(tmp_path):
    result = run_script(f"checkpoint={tmp_path / 'nope.pt'}", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope.pt does not exist" in lines[0], result.stderr


def test_a_training_run_with_visualize_writes_and_logs_the_figures(tmp_path):
    from test_train import FAST, run
    from wandb_records import read_run

    run_dir = tmp_path / "run"
    run("train.py", *FAST, "trainer.visualize=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    for name in ("attention_grid.png", "channel_weights.png"):
        assert (run_dir / "viz" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    logged = {key: value for row in read_run(run_dir)["history"] for key, value in row.items()}
    assert logged["viz/attention_grid/_type"] == logged["viz/channel_weights/_type"] == "image-file"
