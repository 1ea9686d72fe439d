"""The noise gate: initialisation, sampling granularity, evaluation, masks, errors."""

import math

import pytest
import torch

from bmrs import LogUniform, NoiseGate, TruncatedLogNormal


def test_paper_initialisation_and_state_dict():
    gate = NoiseGate(7)
    assert torch.equal(gate.loc, torch.zeros(7)) and torch.equal(gate.log_scale, torch.full((7,), -5.0))
    state = gate.state_dict()
    assert set(state) == {"loc", "log_scale", "mask"} and torch.equal(state["mask"], torch.ones(7))
    q = gate.posterior()
    assert isinstance(q, TruncatedLogNormal) and q.batch_shape == (7,)
    assert isinstance(gate.prior(), LogUniform)
    assert gate.kl().shape == (7,) and (gate.kl() > 0).all()


def test_mask_round_trips_through_state_dict():
    gate = NoiseGate(4)
    gate.mask[1] = 0.0
    other = NoiseGate(4)
    other.load_state_dict(gate.state_dict())
    assert other.mask.tolist() == [1.0, 0.0, 1.0, 1.0]


def test_log_scale_is_clamped():
    gate = NoiseGate(2)
    with torch.no_grad():
        gate.log_scale.copy_(torch.tensor([-50.0, 50.0]))
    assert torch.allclose(gate.posterior().scale, torch.tensor([math.exp(-20.0), math.exp(5.0)]))


def test_conv_input_draws_one_uniform_per_example_and_channel(monkeypatch):
    gate = NoiseGate(5).train()
    drawn = []
    real_rand = torch.rand

    def counting_rand(*args, **kwargs):
        out = real_rand(*args, **kwargs)
        drawn.append(out.numel())
        return out

    monkeypatch.setattr(torch, "rand", counting_rand)
    x = torch.ones(3, 5, 8, 6)
    y = gate(x)
    assert drawn == [3 * 5]
    # one theta per (example, channel), broadcast over H and W
    assert torch.equal(y, y[:, :, :1, :1].expand_as(y))
    assert not torch.equal(y[0], y[1])


def test_channels_last_sequence_input():
    gate = NoiseGate(6, dim=-1).train()
    x = torch.ones(2, 9, 6)
    y = gate(x)
    assert torch.equal(y, y[:, :1, :].expand_as(y))
    gate.eval()
    assert torch.allclose(gate(x), gate.expected_gate().expand(2, 9, 6))


def test_eval_multiplies_by_expected_theta_times_mask():
    gate = NoiseGate(3)
    with torch.no_grad():
        gate.loc.copy_(torch.tensor([-3.0, -1.0, 0.0]))
        gate.log_scale.copy_(torch.tensor([0.0, -1.0, -5.0]))
    gate.mask[1] = 0.0
    gate.eval()
    x = torch.randn(4, 3, 2, 2)
    y = gate(x)
    mean = TruncatedLogNormal(gate.loc.detach(), torch.exp(gate.log_scale.detach())).mean
    assert torch.allclose(y, x * (mean * torch.tensor([1.0, 0.0, 1.0])).view(1, 3, 1, 1))
    assert torch.equal(gate(x), y)  # deterministic


def test_masked_structures_output_exactly_zero_in_training():
    gate = NoiseGate(4).train()
    gate.mask[2] = 0.0
    y = gate(torch.randn(16, 4))
    assert torch.equal(y[:, 2], torch.zeros(16)) and (y[:, [0, 1, 3]] != 0).all()


def test_training_samples_follow_the_posterior():
    torch.manual_seed(0)
    gate = NoiseGate(2).train()
    with torch.no_grad():
        gate.loc.copy_(torch.tensor([-2.0, -8.0]))
        gate.log_scale.copy_(torch.tensor([-1.0, 0.5]))
    theta = gate(torch.ones(40000, 2))
    mean = gate.posterior().mean.detach()
    se = theta.std(0) / math.sqrt(40000)
    assert ((theta.mean(0) - mean).abs() < 5 * se).all()


def test_gradients_reach_the_variational_parameters():
    gate = NoiseGate(3).train()
    loss = (gate(torch.randn(8, 3)) ** 2).sum() + gate.kl().sum()
    loss.backward()
    assert torch.isfinite(gate.loc.grad).all() and (gate.loc.grad != 0).all()
    assert torch.isfinite(gate.log_scale.grad).all() and (gate.log_scale.grad != 0).all()


def test_float64_gate_and_dtype_of_output():
    gate = NoiseGate(3).double().train()
    assert gate(torch.randn(2, 3, dtype=torch.float64)).dtype == torch.float64
    gate32 = NoiseGate(3).train()
    assert gate32(torch.randn(2, 3)).dtype == torch.float32


@pytest.mark.parametrize("shape,dim", [((2, 4), 1), ((2, 3, 5), -1), ((5,), 1)])
def test_wrong_shapes_raise(shape, dim):
    gate = NoiseGate(3, dim=dim)
    with pytest.raises(ValueError, match="expects 3 channels"):
        gate(torch.randn(*shape))


def test_constructor_errors():
    with pytest.raises(ValueError, match="positive"):
        NoiseGate(0)
    with pytest.raises(ValueError, match="batch axis"):
        NoiseGate(3, dim=0)
    with pytest.raises(ValueError, match="log_low"):
        NoiseGate(3, log_low=0.0, log_high=-1.0)


def test_fused_central_kernels_match_the_general_code():
    from bmrs.math import fast

    torch.manual_seed(0)
    loc = torch.rand(400, dtype=torch.float64) * 22 - 21
    log_scale = torch.rand(400, dtype=torch.float64) * 10 - 7
    scale = torch.exp(log_scale)
    central = ((0 - loc) / scale > -1) & ((-20 - loc) / scale < 1)
    assert 100 < central.sum() < 400  # both regimes are present in the draw
    loc, log_scale = loc[central].requires_grad_(), log_scale[central].requires_grad_()
    assert fast.is_central(loc, torch.exp(log_scale), -20.0, 0.0)
    prior = LogUniform(torch.tensor(-20.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))

    def both(fn_fast, fn_general):
        a, b = fn_fast(), fn_general()
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        ga = torch.autograd.grad(a.sum(), (loc, log_scale))
        gb = torch.autograd.grad(b.sum(), (loc, log_scale))
        for x, y in zip(ga, gb):
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)

    both(lambda: fast.CentralKL.apply(loc, torch.exp(log_scale), -20.0, 0.0, math.log(20.0)),
         lambda: torch.distributions.kl_divergence(TruncatedLogNormal(loc, torch.exp(log_scale)), prior))
    u = torch.rand(5, len(loc), dtype=torch.float64)
    both(lambda: fast.CentralSample.apply(u, loc, torch.exp(log_scale), -20.0, 0.0),
         lambda: TruncatedLogNormal(loc, torch.exp(log_scale)).icdf(u))


def test_gate_falls_back_to_the_tail_safe_code():
    gate = NoiseGate(3).double().train()
    with torch.no_grad():
        gate.loc.copy_(torch.tensor([5.0, -30.0, -3.0]))  # upper tail, lower tail, central
        gate.log_scale.copy_(torch.tensor([-8.0, -6.0, 0.0]))
    kl = gate.kl()
    expected = torch.distributions.kl_divergence(gate.posterior(), gate.prior())
    torch.testing.assert_close(kl, expected)
    theta = gate(torch.ones(1000, 3, dtype=torch.float64))
    assert torch.isfinite(theta).all() and (theta[:, 0] > 0.999).all() and (theta[:, 1] < 3e-9).all()
    (theta.sum() + kl.sum()).backward()
    assert torch.isfinite(gate.loc.grad).all() and torch.isfinite(gate.log_scale.grad).all()
