"""engine.py: the schedule, the epoch loop (accumulation, averaging, non-finite losses), precision."""
import math

import pytest
import torch

import engine
from engine import NonFiniteLoss
from utils import UserError


# ------------------------------------------------------------------------------------------- schedule and loop


def test_warmup_cosine():
    schedule = engine.warmup_cosine(5, 100)
    assert schedule(0) == pytest.approx(0.2)  # linear warm-up: (epoch + 1) / warmup
    assert schedule(2) == pytest.approx(0.6)
    assert schedule(4) == pytest.approx(0.5 * (math.cos(4 / 100 * math.pi) + 1))  # the cosine is already lower
    assert schedule(50) == pytest.approx(0.5)
    assert schedule(100) == pytest.approx(0.0, abs=1e-12)


def linear_run(batches, accum_steps):
    """One train_epoch of a fixed linear model with SGD; returns its weights after and train_epoch's result."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(x, y):
        loss = torch.nn.functional.mse_loss(model(x), y)
        return loss, (model(x) - y).abs().sum()

    result = engine.train_epoch(step, batches, optimizer, accum_steps, model)
    return torch.cat([p.detach().flatten() for p in model.parameters()]), result


def test_gradient_accumulation_matches_the_whole_batch():
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 4, generator=generator), torch.randn(8, 1, generator=generator)
    torch.manual_seed(0)
    before = torch.cat([p.detach().flatten() for p in torch.nn.Linear(4, 1).parameters()])  # linear_run's start
    whole, (whole_loss, whole_extra, whole_seen) = linear_run([(x, y)], accum_steps=1)
    split, (split_loss, split_extra, split_seen) = linear_run([(x[:4], y[:4]), (x[4:], y[4:])], accum_steps=2)
    assert not torch.allclose(whole, before)  # the step did move the weights
    assert torch.allclose(whole, split, atol=1e-6)
    assert whole_seen == split_seen == 8
    assert whole_extra[0] == pytest.approx(split_extra[0], rel=1e-5)  # extra sums add up over micro-batches


def test_train_epoch_skips_an_incomplete_optimizer_step_and_averages_the_loss():
    generator = torch.Generator().manual_seed(2)
    batches = [(torch.randn(2, 4, generator=generator), torch.randn(2, 1, generator=generator)) for _ in range(3)]
    _, (loss, _, seen) = linear_run(batches, accum_steps=2)
    assert seen == 4  # the third micro-batch cannot complete a step of two
    with torch.no_grad():
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        losses = [torch.nn.functional.mse_loss(model(x), y).item() for x, y in batches[:2]]
    assert loss == pytest.approx(sum(losses) / 2, rel=1e-5)  # both micro-batches ran before the one step
    with pytest.raises(UserError, match="fewer images than one optimizer step"):
        linear_run(batches[:1], accum_steps=2)


def test_a_nan_loss_raises_non_finite_loss():
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(x, y):
        return (model(x).sum() * float("nan"),)

    batches = [(torch.randn(2, 4), torch.zeros(2))]
    with pytest.raises(NonFiniteLoss, match="became nan"):
        engine.train_epoch(step, batches, optimizer, 1, model)

