"""utils.py: range-checked argparse types and the checks of devices and paths."""
import argparse

import pytest
import torch

import devices
import utils


@pytest.mark.parametrize("kind, text, ok", [
    (utils.POSITIVE_INT, "3", True), (utils.POSITIVE_INT, "0", False), (utils.POSITIVE_INT, "-2", False),
    (utils.POSITIVE_INT, "2.5", False), (utils.NONNEGATIVE_INT, "0", True), (utils.OPEN_UNIT, "0", False),
    (utils.OPEN_UNIT, "1", False), (utils.OPEN_UNIT, "0.75", True), (utils.POSITIVE_FLOAT, "nan", False),
    (utils.POSITIVE_FLOAT, "inf", False), (utils.POSITIVE_FLOAT, "1e-3", True)])
def test_ranged_types_accept_only_their_range(kind, text, ok):
    parser = argparse.ArgumentParser()
    parser.add_argument("--x", type=kind)
    if ok:
        assert parser.parse_args(["--x", text]).x == kind(text)
    else:
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(["--x", text])
        assert exit_info.value.code == 2


def test_range_errors_name_the_flag_the_value_and_the_range(capsys):
    parser = argparse.ArgumentParser()
    parser.add_argument("--mask_ratio", type=utils.OPEN_UNIT)
    with pytest.raises(SystemExit):
        parser.parse_args(["--mask_ratio", "1.5"])
    assert "argument --mask_ratio: 1.5 is not allowed: it must be in (0, 1)" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["gpu", "cuda:7", "tpu"])
def test_unknown_or_missing_devices_are_refused(device, capsys):
    parser = argparse.ArgumentParser()
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    with pytest.raises(SystemExit):
        devices.check_device(parser, device)
    assert "argument --device" in capsys.readouterr().err
