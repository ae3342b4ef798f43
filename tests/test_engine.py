"""engine.py: the schedule, the epoch loop (accumulation, averaging, non-finite losses), precision."""
import math

import pytest
import torch

import bookkeeping
import devices
import engine
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
    return torch.cat([p.detach().flatten() for p in model.parameters()]), (result.loss, result.extras,
                                                                            result.images_seen)


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
    with pytest.raises(UserError, match="became nan"):
        engine.train_epoch(step, batches, optimizer, 1, model)



# ------------------------------------------------------------------------------------- the GPU path, on the CPU


def tiny_mae_model(strategy="random"):
    from model import MAE_ViT

    torch.manual_seed(0)
    return MAE_ViT(16, 2, 32, 1, 2, 1, 2, mask_ratio=0.75, mask_strategy=strategy)


def tiny_classifier_model():
    from model import ModelConfig, build_classifier

    torch.manual_seed(0)
    return build_classifier(ModelConfig(image_size=16, patch_size=2, emb_dim=32, encoder_depth=1, encoder_heads=2,
                                        num_classes=5))


class HostSync(RuntimeError):
    pass


@pytest.fixture
def no_host_syncs(monkeypatch):
    """Every way a tensor reaches the host raises, except the one read per epoch (after ``all_reduce_sum``)."""
    def forbidden(*args, **kwargs):
        raise HostSync("a host sync inside the step")

    names = ("item", "tolist", "cpu", "__bool__")
    saved = {name: getattr(torch.Tensor, name) for name in names}
    for name in names:
        monkeypatch.setattr(torch.Tensor, name, forbidden)

    def reduce_then_allow(tensor):
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)  # the epoch's one read comes next
        return tensor

    monkeypatch.setattr(engine, "all_reduce_sum", reduce_then_allow)


def test_training_steps_and_evaluation_never_sync_with_the_host(no_host_syncs):
    cpu = torch.device("cpu")
    images, labels = torch.randn(4, 3, 16, 16), torch.arange(4) % 5
    mae = tiny_mae_model()
    optimizer = torch.optim.AdamW(mae.parameters(), fused=True)  # as on CUDA: the unfused one reads its step count
    engine.train_epoch(engine.make_pretrain_step(mae, cpu, "fp32", 2), [(images, labels)] * 2, optimizer, 2, mae)
    classifier = tiny_classifier_model()
    engine.evaluate(classifier, [(images, labels)] * 3, cpu, "fp32")


def test_the_no_sync_guard_catches_a_sync(no_host_syncs):
    with pytest.raises(HostSync):
        torch.ones(2).sum().item()


@pytest.mark.parametrize("strategy", ["random", "block", "grid", "blockwise"])
def test_pretraining_step_compiles_to_one_graph_with_accumulation(strategy):
    from torch._dynamo.testing import CompileCounterWithBackend

    model = tiny_mae_model(strategy)
    counter = CompileCounterWithBackend("aot_eager")
    torch.compiler.reset()
    try:
        step = torch.compile(engine.make_pretrain_step(model, torch.device("cpu"), "fp32", 2), backend=counter,
                             fullgraph=True)  # a graph break is an error
        batches = [(torch.randn(4, 3, 16, 16), torch.zeros(4, dtype=torch.long))] * 4
        engine.train_epoch(step, batches, torch.optim.AdamW(model.parameters()), 2, model)  # 2 micro-batches a step
    finally:
        torch.compiler.reset()
    assert counter.frame_count == 1


def test_classifier_step_and_probe_feature_pass_compile_to_one_graph():
    from torch._dynamo.testing import CompileCounterWithBackend

    model = tiny_classifier_model()
    counter = CompileCounterWithBackend("aot_eager")
    torch.compiler.reset()
    try:
        step = engine.make_classifier_step(model, torch.device("cpu"), "fp32", torch.nn.CrossEntropyLoss())
        compiled = torch.compile(step, backend=counter, fullgraph=True)
        engine.train_epoch(compiled, [(torch.randn(4, 3, 16, 16), torch.arange(4) % 5)] * 4,
                           torch.optim.AdamW(model.parameters()), 2, model)
        features = torch.compile(model.forward_features, backend=counter, fullgraph=True)
        with torch.no_grad():
            assert features(torch.randn(3, 3, 16, 16)).shape == (3, 1 + 64, 32)
    finally:
        torch.compiler.reset()
    assert counter.frame_count == 2


def test_forced_fp16_path_scales_the_loss_and_lowers_it():
    cpu = torch.device("cpu")
    model = tiny_classifier_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scaler = devices.grad_scaler(cpu, "fp16")
    assert scaler is not None and devices.grad_scaler(cpu, "bf16") is None
    step = engine.make_classifier_step(model, cpu, "fp16", torch.nn.CrossEntropyLoss())
    torch.manual_seed(1)
    batch = [(torch.randn(8, 3, 16, 16), torch.arange(8) % 5)]
    first = engine.train_epoch(step, batch, optimizer, 1, model, scaler=scaler).loss
    for _ in range(10):
        last = engine.train_epoch(step, batch, optimizer, 1, model, scaler=scaler).loss
    assert scaler.get_scale() > 1  # the loss really was scaled
    assert last < first


@pytest.mark.parametrize("device, requested, expected", [("cpu", "auto", "fp32"), ("cpu", "bf16", "bf16"),
                                                         ("cpu", "fp16", "fp16"), ("cpu", "fp32", "fp32")])
def test_precision_choice(monkeypatch, device, requested, expected):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    assert devices.resolve_precision(requested, torch.device(device)) == expected
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    assert devices.resolve_precision("auto", torch.device("cpu")) == "bf16"


def test_gpus_without_bf16_get_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert devices.resolve_precision("auto", torch.device("cuda")) == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert devices.resolve_precision("auto", torch.device("cuda")) == "bf16"


def test_first_step_is_timed_apart_for_the_steady_rate(monkeypatch):
    clock = iter([0.0, 5.0, 7.0])  # start, after the first step (compilation), end
    monkeypatch.setattr(bookkeeping.time, "perf_counter", lambda: next(clock))
    with bookkeeping.EpochTimer(torch.device("cpu")) as timer:
        timer.after_step()()
        timer.after_step()  # a hook that is never called changes nothing
    assert (timer.first_step_seconds, timer.seconds) == (5.0, 7.0)
    assert timer.steady_rate(300, 100) == pytest.approx(200 / 2.0)
