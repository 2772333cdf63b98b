"""Keyed random streams (soupkit.rlhf.rng), stage timing (soupkit.rlhf.timing), launch refusals and
the typed PPO records (soupkit.rlhf.rollout)."""

from __future__ import annotations

import random
import time

import pytest
import torch

from soupkit.errors import SoupkitError
from soupkit.launch import check_launch, sharded_launch
from soupkit.rlhf.rng import key_seed, keyed_generator
from soupkit.rlhf.rollout import Rollout, Samples, Trajectory, samples_of
from soupkit.rlhf.timing import STAGES, StageClock, slowest


def test_key_seed_is_cpythons_tuple_hash():
    # Oracle: the interpreter's own hash of the tuple (runs made with hash() reproduce exactly).
    rng = random.Random(0)
    specials = [0, 1, -1, -2, 2**61 - 1, 2**61 - 2, 2**61, -(2**61), 2**63, -(2**64) - 5]
    for _ in range(20_000):
        key = tuple(rng.choice([rng.randrange(-2**80, 2**80), rng.randrange(100), rng.choice(specials)])
                    for _ in range(rng.randrange(6)))
        assert key_seed(*key) == hash(key) % 2**63


def test_keyed_generator_streams_depend_on_the_key_only():
    a = torch.rand(5, generator=keyed_generator(3, 7, 1))
    torch.rand(100)  # the global RNG moving does not matter
    assert torch.equal(a, torch.rand(5, generator=keyed_generator(3, 7, 1)))
    assert not torch.equal(a, torch.rand(5, generator=keyed_generator(3, 7, 2)))
    with pytest.raises(TypeError):
        keyed_generator(1, "step")


def test_stage_clock_splits_the_step_exactly():
    clock = StageClock()
    with clock("generate"):
        time.sleep(0.02)
    with clock("optimise"):
        time.sleep(0.01)
    with clock("generate"):
        time.sleep(0.01)
    time.sleep(0.01)  # not in any stage: other
    lap = clock.lap()
    assert set(lap) == {f"time_{s}" for s in STAGES} | {"time_other", "seconds"}
    assert lap["time_generate"] >= 0.03 and lap["time_optimise"] >= 0.01 and lap["time_other"] >= 0.01
    assert sum(v for k, v in lap.items() if k.startswith("time_")) == pytest.approx(lap["seconds"], abs=1e-9)
    assert slowest(lap) == ("generate", pytest.approx(lap["time_generate"] / lap["seconds"]))
    assert clock.lap()["seconds"] < 0.01  # a lap starts the next step's clock
    with pytest.raises(KeyError, match="unknown PPO stage"):
        with clock("sampling"):
            pass


@pytest.mark.parametrize("env, lora, message", [
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, 0, "FSDP version 1 is not supported"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, 8, "lora_rank under FSDP"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, 8, "lora_rank under FSDP"),
])
def test_unsupported_launches_are_refused_from_the_environment(monkeypatch, env, lora, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SoupkitError, match=message):
        check_launch(lora)


def test_supported_launches_pass(monkeypatch):
    check_launch(8)  # no launcher
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    check_launch(8)  # ZeRO-2 keeps whole weights on every process
    assert sharded_launch() is None
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert sharded_launch() == "zero3"
    check_launch(0)


def test_records_select_rows_of_every_field():
    b, t = 3, 4
    samples = Samples(torch.arange(6).view(b, 2), torch.ones(b, 2, dtype=torch.bool),
                      torch.arange(12).view(b, t), torch.ones(b, t, dtype=torch.bool))
    roll = Rollout(**samples_of(samples), logprobs=torch.randn(b, t), entropy=torch.rand(b, t),
                   ref_logprobs=torch.randn(b, 2, t), values=torch.randn(b, t), scores=torch.randn(b),
                   watch_logprobs={"sft": torch.randn(b, t)})
    rows = torch.tensor([2, 0])
    part = roll.select(rows)
    assert isinstance(part, Rollout)
    assert torch.equal(part.ref_logprobs, roll.ref_logprobs[rows]) and torch.equal(part.scores, roll.scores[rows])
    assert torch.equal(part.watch_logprobs["sft"], roll.watch_logprobs["sft"][rows])
    assert torch.equal(part.sequences, torch.cat([samples.query[rows], samples.response[rows]], dim=1))
    traj = Trajectory(**samples_of(roll), logprobs=roll.logprobs, values=roll.values,
                      advantages=torch.randn(b, t), returns=torch.randn(b, t))
    assert torch.equal(traj.select(rows).advantages, traj.advantages[rows])


def test_bf16_auto_follows_the_hardware_check(monkeypatch):
    from soupkit.rlhf import build_spec
    from soupkit.rlhf.config import native_bf16, with_precision

    spec = build_spec(None, {"ref": ["m"], "prompts": "p.txt", "reward": "m:f"})
    assert spec.bf16 == "auto"
    monkeypatch.setenv("SOUPKIT_NATIVE_BF16", "1")
    assert native_bf16("cpu") and with_precision(spec).bf16 is True
    monkeypatch.setenv("SOUPKIT_NATIVE_BF16", "0")
    assert with_precision(spec).bf16 is False
    assert with_precision(spec.model_copy(update={"bf16": True})).bf16 is True  # explicit settings stay
    monkeypatch.delenv("SOUPKIT_NATIVE_BF16")
    monkeypatch.setattr("soupkit.rlhf.config.cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert native_bf16("cpu") is __import__("torch").backends.mkldnn.is_available()
    monkeypatch.setattr("soupkit.rlhf.config.cpu_flags", lambda: {"avx512f", "avx2"})
    assert native_bf16("cpu") is False
    assert native_bf16("mps") is False


def test_the_optimiser_is_fused_adamw_and_steps_like_the_reference_loop():
    """Oracle: torch's single-tensor AdamW (foreach=False), the textbook loop, on the same gradients."""
    from types import SimpleNamespace

    from soupkit.rlhf import build_spec
    from soupkit.rlhf.trainer import _optimizer

    torch.manual_seed(0)
    policy, critic = torch.nn.Linear(6, 5), torch.nn.Linear(5, 1)
    critic.weight.requires_grad_(False)  # frozen parameters take no optimiser state
    spec = build_spec(None, {"ref": ["m"], "prompts": "p.txt", "reward": "m:f", "learning_rate": 1e-2,
                             "value_learning_rate": 3e-2})
    opt = _optimizer(spec, SimpleNamespace(policy=policy, critic=critic))
    assert opt.defaults["fused"] and [len(g["params"]) for g in opt.param_groups] == [2, 1]
    params = [p for g in opt.param_groups for p in g["params"]]
    copies = [p.detach().clone().requires_grad_(True) for p in params]
    oracle = torch.optim.AdamW([{"params": copies[:2], "lr": 1e-2}, {"params": copies[2:], "lr": 3e-2}],
                               eps=spec.adam_eps, weight_decay=spec.weight_decay, foreach=False)
    for _ in range(3):
        for p, c in zip(params, copies):
            c.grad = torch.randn_like(c)
            p.grad = c.grad.clone()
        opt.step()
        oracle.step()
    for p, c in zip(params, copies):
        torch.testing.assert_close(p, c, rtol=1e-6, atol=1e-7)
