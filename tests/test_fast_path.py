"""trainer.precision/channels_last/compile=auto: what is chosen for a device, that a value given is kept, and
that the run records the choice. The CPU's capability is mocked; the measurements behind the rule are in the
README (Speed)."""

import pytest
import torch
from conftest import ROOT, compose_config
from omegaconf import OmegaConf

from cbam.engine import device as device_module
from cbam.engine.device import choose_fast_path, with_fast_path
from cbam.errors import ConfigError

CPU = torch.device("cpu")


def trainer(**values):
    return OmegaConf.create({"precision": "auto", "channels_last": "auto", "compile": "auto"} | values)


@pytest.fixture
def cpu_with_bf16(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)


@pytest.fixture
def cpu_without_bf16(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)


def test_a_cpu_with_native_bf16_gets_bf16_and_channels_last(cpu_with_bf16):
    fast = choose_fast_path(trainer(), CPU)
    assert (fast.precision, fast.channels_last, fast.compile) == ("bf16", True, False)
    assert set(fast.chosen) == {"precision", "channels_last", "compile"}
    assert fast.chosen["precision"] == "native bf16 on cpu"


def test_a_cpu_without_native_bf16_keeps_fp32_and_gets_channels_last(cpu_without_bf16):
    fast = choose_fast_path(trainer(), CPU)
    assert (fast.precision, fast.channels_last, fast.compile) == ("fp32", True, False)
    assert fast.chosen["precision"] == "no native bf16 on cpu"
    assert fast.chosen["channels_last"] == "fp32 convolutions on cpu"


@pytest.mark.parametrize(
    "capability, precision, channels_last",
    [((8, 0), "bf16", True), ((9, 0), "bf16", True), ((7, 5), "fp32", False), ((7, 0), "fp32", False)],
    ids=["A100", "H100", "T4", "V100"],
)
def test_a_cuda_device_gets_bf16_from_ampere_on(monkeypatch, capability, precision, channels_last):
    """A T4 or V100 runs bf16 emulated (torch.cuda.is_bf16_supported() says yes there too): fp32."""
    asked = []
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: asked.append(device) or capability)
    fast = choose_fast_path(trainer(), torch.device("cuda", 1))
    assert (fast.precision, fast.channels_last) == (precision, channels_last)  # fp32 NHWC is unmeasured on a GPU
    assert asked == [torch.device("cuda", 1)]  # the run's own GPU, not the current one


def test_a_value_given_pins_it(cpu_with_bf16):
    fast = choose_fast_path(trainer(precision="fp32"), CPU)
    assert (fast.precision, fast.channels_last) == ("fp32", True)  # channels_last=auto: NHWC for a CPU's fp32 too
    assert "precision" not in fast.chosen
    fast = choose_fast_path(trainer(channels_last=False, compile=True), CPU)
    assert (fast.precision, fast.channels_last, fast.compile) == ("bf16", False, True)
    assert set(fast.chosen) == {"precision"}


def test_a_resumed_run_keeps_the_choices_of_its_checkpoint(cpu_without_bf16):
    recorded = {"precision": "bf16", "channels_last": True, "compile": False}
    fast = choose_fast_path(trainer(), CPU, recorded=recorded)
    assert (fast.precision, fast.channels_last, fast.compile) == ("bf16", True, False)
    assert fast.chosen == dict.fromkeys(recorded, "as the checkpoint resumed from")


@pytest.mark.parametrize(
    "values, message",
    [
        ({"precision": "fp8"}, r"trainer.precision='fp8' is unknown"),
        ({"channels_last": "maybe"}, r"trainer.channels_last='maybe' is unknown: use true, false or auto"),
        ({"compile": 1}, r"trainer.compile=1 is unknown"),
    ],
)
def test_bad_values_name_the_option(cpu_with_bf16, values, message):
    with pytest.raises(ConfigError, match=message):
        choose_fast_path(trainer(**values), CPU)


def test_the_run_records_the_values_in_force(cpu_with_bf16):
    cfg = OmegaConf.create({"trainer": trainer(), "seed": 0})
    recorded = with_fast_path(cfg, choose_fast_path(cfg.trainer, CPU))
    assert OmegaConf.to_container(recorded.trainer) == {"precision": "bf16", "channels_last": True, "compile": False}
    assert cfg.trainer.precision == "auto"  # a copy: the composed config is left as it was


def test_native_bf16_is_never_claimed_for_another_device_kind():
    assert not device_module.native_bf16(torch.device("meta"))


def test_cuda_runs_let_cudnn_choose_and_matmuls_use_tf32():
    before = torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()
    try:
        device_module.configure_cuda()
        assert torch.backends.cudnn.benchmark and torch.get_float32_matmul_precision() == "high"
    finally:
        torch.backends.cudnn.benchmark = before[0]
        torch.set_float32_matmul_precision(before[1])


@pytest.mark.parametrize("experiment", ["ablation_fmnist", "leave_one_out"])
def test_a_published_experiment_runs_its_records_numerics_on_any_cpu(experiment, monkeypatch):
    """Its sweep continues on whatever machine a session gets (resume=auto into results/<name>): the numerics are
    pinned, the same with and without native bf16, and they are those of the runs already committed there."""
    trainer = compose_config("train", f"experiment={experiment}").trainer
    chosen = set()
    for native in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda native=native: native, raising=False)
        fast = choose_fast_path(trainer, CPU)
        assert fast.chosen == {}  # nothing left to `auto`
        chosen.add((fast.precision, fast.channels_last, fast.compile))
    [pinned] = chosen
    for record in sorted((ROOT / "results" / experiment).glob("*/config.yaml")):
        recorded = OmegaConf.load(record).trainer
        assert (recorded.precision, recorded.channels_last, recorded.compile) == pinned, record
