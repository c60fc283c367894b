"""GANStep.measure_gradient_noise: reads the real step's gradients per micro-batch and
leaves training exactly as it was."""

from __future__ import annotations

import pytest
import torch

from arwgan.config import ModelConfig, OptimConfig
from arwgan.errors import ConfigError
from arwgan.step import GANStep
from autotune.gns import NoiseScale

MODEL = ModelConfig(image_size=16, message_bits=4, channels=4, noise="")
CPU = torch.device("cpu")
#: A warm-up makes the learning rate depend on the step count, which the measurement must keep.
OPTIM = OptimConfig(warmup_steps=20)


def batches(n: int, batch: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.rand(batch, 3, 16, 16, generator=gen) * 2 - 1,
         torch.randint(0, 2, (batch, 4), generator=gen).float())
        for _ in range(n)
    ]


def trained_gan(steps: int) -> GANStep:
    gan = GANStep(MODEL, OPTIM, "fp32", CPU, seed=0)
    for images, messages in batches(steps):
        gan(images, messages)
    return gan


class Recorder:
    """Stands in for a NoiseScale: keeps what the step fed it."""

    def __init__(self) -> None:
        self.calls = []

    def update(self, micro_sqnorms, mean_sqnorm, micro_batch):
        self.calls.append((micro_sqnorms, mean_sqnorm, micro_batch))


def test_training_goes_on_as_if_never_measured():
    plain, measured = trained_gan(6), trained_gan(6)
    images, messages = batches(1, seed=7)[0]
    noise_g, noise_d = NoiseScale(), NoiseScale()
    assert measured.measure_gradient_noise(images, messages, 4, noise_g, noise_d) == 2
    assert noise_g.steps == noise_d.steps == 1
    assert measured.step_count == plain.step_count
    for opt_a, opt_b in ((plain.opt_g, measured.opt_g), (plain.opt_d, measured.opt_d)):
        assert [g["lr"] for g in opt_a.param_groups] == [g["lr"] for g in opt_b.param_groups]
    next_images, next_messages = batches(1, seed=8)[0]
    a, b = plain(next_images, next_messages), measured(next_images, next_messages)
    for name, value in a.as_dict().items():
        assert torch.equal(value, b.as_dict()[name]), name
    sa, sb = plain.state_dict(), measured.state_dict()
    for key, value in sa["nets"].items():
        assert torch.equal(value, sb["nets"][key]), key
    assert torch.equal(sa["noiser_rng"], sb["noiser_rng"])


def expected_sqnorm(optimizer, precondition: bool) -> float:
    """|g / (sqrt(v / (1 - beta2^t)) + eps)|^2 over the optimiser's parameters, from its
    state before the step (formula written out here, not taken from autotune.gns)."""
    total = 0.0
    for group in optimizer.param_groups:
        _, beta2 = group["betas"]
        for p in group["params"]:
            g = p.grad.double()
            if precondition:
                state = optimizer.state[p]
                t = float(state["step"])
                g = g / ((state["exp_avg_sq"].double() / (1 - beta2**t)).sqrt() + group["eps"])
            total += float(g.pow(2).sum())
    return total


@pytest.mark.parametrize("precondition", [False, True])
def test_first_micro_batch_matches_a_real_step_on_it_alone(precondition):
    gan = trained_gan(6)
    twin = GANStep(MODEL, OPTIM, "fp32", CPU, seed=0)
    twin.load_state_dict(gan.state_dict())
    images, messages = batches(1, seed=7)[0]
    rec_g, rec_d = Recorder(), Recorder()
    gan.measure_gradient_noise(images, messages, 2, rec_g, rec_d, precondition=precondition)

    seen = {}

    def capture(name):
        def hook(optimizer, args, kwargs):
            seen[name] = expected_sqnorm(optimizer, precondition)
            if name == "d":  # keep D where it was, as the measurement does
                for group in optimizer.param_groups:
                    group["lr"] = 0.0
        return hook

    twin.opt_g.register_step_pre_hook(capture("g"))
    twin.opt_d.register_step_pre_hook(capture("d"))
    twin(images[:4], messages[:4])
    (g_norms, g_mean, g_micro), = rec_g.calls
    (d_norms, _, _), = rec_d.calls
    assert g_micro == 4 and len(g_norms) == 2
    assert g_norms[0] == pytest.approx(seen["g"], rel=1e-5)
    assert d_norms[0] == pytest.approx(seen["d"], rel=1e-5)
    assert 0 < g_mean < max(g_norms)


def test_batch_must_split_evenly():
    gan = trained_gan(0)
    images, messages = batches(1)[0]
    with pytest.raises(ConfigError):
        gan.measure_gradient_noise(images, messages, 3, NoiseScale(), NoiseScale())
    with pytest.raises(ConfigError):
        gan.measure_gradient_noise(images, messages, 1, NoiseScale(), NoiseScale())
