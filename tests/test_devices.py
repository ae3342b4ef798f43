"""Device choice across utils, checks and engine: --device auto takes CUDA, then Apple's MPS, then the CPU; on MPS
the run is fp32 and eager unless asked otherwise. No Apple hardware is needed: availability is monkeypatched."""
import argparse

import pytest
import torch

import bookkeeping
import devices
from utils import UserError

MPS = torch.device("mps")


@pytest.fixture
def machine(monkeypatch):
    """Pretend this machine has a CUDA GPU and / or Apple's MPS."""
    def pretend(cuda=False, mps=False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)

    return pretend


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (True, False, "cuda"), (False, True, "mps"),
                                                 (False, False, "cpu")])
def test_auto_prefers_cuda_then_mps_then_the_cpu(machine, cuda, mps, expected):
    machine(cuda=cuda, mps=mps)
    assert devices.auto_device() == expected


def test_setup_device_resolves_auto_to_mps(machine, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    machine(mps=True)
    assert devices.setup_device("auto").device == MPS
    assert devices.setup_device(None).device == MPS
    machine(mps=False)
    assert devices.setup_device("auto").device == torch.device("cpu")  # mps where there is none: check_device


def test_mps_under_torchrun_is_refused(machine, monkeypatch):
    machine(mps=True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="without torchrun"):
        devices.setup_device("mps")


def test_check_device_accepts_mps_only_where_it_is_available(machine, capsys):
    parser = argparse.ArgumentParser()
    machine(mps=True)
    devices.check_device(parser, "mps")  # no error
    machine(mps=False)
    with pytest.raises(SystemExit) as exit_info:
        devices.check_device(parser, "mps")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("error: argument --device: mps was asked for but Apple's MPS is not available here; "
                            "use --device cpu")
    with pytest.raises(SystemExit):
        devices.check_device(parser, "tpu")
    assert "use auto, cpu, mps, cuda or cuda:N" in capsys.readouterr().err


def test_mps_runs_fp32_and_eager_unless_asked(monkeypatch):
    monkeypatch.setattr(devices.shutil, "which", lambda name: "/usr/bin/" + name)  # a C++ compiler is there
    assert devices.resolve_precision("auto", MPS) == "fp32"
    assert devices.resolve_precision("fp16", MPS) == "fp16" and devices.resolve_precision("bf16", MPS) == "bf16"
    step = lambda x: x
    assert devices.maybe_compile(step, MPS) is step
    assert not devices.why_eager(torch.device("cpu")) and devices.why_eager(MPS)
    line = devices.describe_speed_path(MPS, "fp32", True, "auto")
    assert line.startswith("device mps, precision fp32 (chosen by --precision auto), eager (torch.compile on MPS "
                           "is experimental")
    assert "chosen by" not in devices.describe_speed_path(MPS, "fp16", False, "fp16")


def test_the_cpu_and_cuda_paths_are_unchanged(monkeypatch):
    monkeypatch.setattr(devices.shutil, "which", lambda name: None)  # no C++ compiler
    cpu = torch.device("cpu")
    assert not devices.why_eager(torch.device("cuda")) and devices.why_eager(cpu)
    assert "eager (no C++ compiler found)" in devices.describe_speed_path(cpu, "fp32", True)
    assert devices.describe_speed_path(cpu, "fp32", False).startswith("device cpu, precision fp32, eager, ")


def test_the_epoch_timer_waits_for_mps_work(monkeypatch):
    waits = []
    monkeypatch.setattr(torch.mps, "synchronize", lambda: waits.append("mps"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waits.append("cuda"))
    with bookkeeping.EpochTimer(MPS):
        pass
    with bookkeeping.EpochTimer(torch.device("cpu")):
        pass
    assert waits == ["mps", "mps"]


def test_kept_random_state_restores_the_cpu_and_mps_generators(monkeypatch):
    state = {"mps": torch.tensor([1])}
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: state["mps"].clone())
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda new: state.update(mps=new))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with devices.kept_random_state(MPS):
        torch.rand(5)
        state["mps"] = torch.tensor([2])  # a draw on the Apple GPU
    assert torch.equal(torch.rand(3), expected) and state["mps"].item() == 1
