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


def _central_and_tail_parameters(n=400):
    torch.manual_seed(0)
    loc = torch.rand(n, dtype=torch.float64) * 30 - 25
    log_scale = torch.rand(n, dtype=torch.float64) * 32 - 25  # also beyond the clamp [-20, 5]
    scale = torch.exp(log_scale.clamp(-20, 5))
    central = ((0 - loc) / scale > -1) & ((-20 - loc) / scale < 1)
    assert 100 < central.sum() < n - 50  # both regimes are present in the draw
    return loc, log_scale, central


def test_fused_kernel_matches_the_general_code():
    """Values and gradients of theta and of the KL of several gates at once, against
    TruncatedLogNormal.icdf and kl_divergence (the general code, checked against mpmath)."""
    from bmrs.math import gate_kernel

    loc, log_scale, central = _central_and_tail_parameters()
    loc, log_scale = loc[central], log_scale[central]
    assert (log_scale < -20).any() and (log_scale > 5).any()  # the clamp's gradient is tested too
    sizes = [7, len(loc) - 7 - 50, 50]
    locs = [t.clone().requires_grad_() for t in loc.split(sizes)]
    log_scales = [t.clone().requires_grad_() for t in log_scale.split(sizes)]
    u = torch.rand(2, len(loc), dtype=torch.float64)
    k = gate_kernel.constants(torch.float64, loc.device, -20.0, 0.0, (-20.0, 5.0))
    *thetas, kl, tail = gate_kernel.GateNoise.apply(u, k.one, k, sizes, *locs, *log_scales)
    assert not tail
    ref_loc = torch.cat(locs).detach().requires_grad_()
    ref_log_scale = torch.cat(log_scales).detach().requires_grad_()
    q = TruncatedLogNormal(ref_loc, torch.exp(ref_log_scale.clamp(-20, 5)))
    prior = LogUniform(torch.tensor(-20.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))
    ref_theta, ref_kl = q.icdf(u), torch.distributions.kl_divergence(q, prior)
    torch.testing.assert_close(torch.cat(thetas, 1), ref_theta, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(kl, ref_kl, rtol=1e-12, atol=1e-12)
    w_theta, w_kl = torch.randn_like(ref_theta), torch.randn_like(ref_kl)
    for fused, ref in (((torch.cat(thetas, 1) * w_theta).sum(), (ref_theta * w_theta).sum()),
                       ((kl * w_kl).sum(), (ref_kl * w_kl).sum())):
        g_loc, g_log_scale = (torch.cat(g) for g in zip(*[
            torch.autograd.grad(fused, [a, b], retain_graph=True) for a, b in zip(locs, log_scales)
        ]))
        r_loc, r_log_scale = torch.autograd.grad(ref, (ref_loc, ref_log_scale), retain_graph=True)
        torch.testing.assert_close(g_loc, r_loc, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(g_log_scale, r_log_scale, rtol=1e-9, atol=1e-12)
    # one structure in a tail is reported, so that the caller uses the general code
    tail_loc = torch.tensor([5.0], dtype=torch.float64)
    *_, tail = gate_kernel.GateNoise.apply(u[:, :1], k.one, k, [1], tail_loc, torch.tensor([-8.0], dtype=torch.float64))
    assert tail


@pytest.mark.parametrize("regime", ["central", "mixed"])
def test_training_gates_match_the_reference_values_and_gradients(regime):
    """The gates of a model in training (one joint draw, fused kernel or, with a structure in a
    tail, the general code) give the reference theta, KL and gradients for the same uniforms."""
    from bmrs import build_model, gates, model_kl

    loc, log_scale, central = _central_and_tail_parameters()
    if regime == "central":
        loc, log_scale = loc[central], log_scale[central]
    else:
        assert not central[:90].all()
    torch.manual_seed(1)
    model = build_model("mlp", (1, 4, 4), 3, width=30, hidden_layers=2).double().train()
    layer = list(gates(model).values())
    with torch.no_grad():
        for i, g in enumerate(layer):
            g.loc.copy_(loc[30 * i:30 * i + 30])
            g.log_scale.copy_(log_scale[30 * i:30 * i + 30])
        layer[1].mask[3] = 0.0
    x = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    torch.manual_seed(2)
    out = model(x)
    loss = out.square().sum() + model_kl(model, "mean")
    loss.backward()
    fused = [(g.loc.grad.clone(), g.log_scale.grad.clone()) for g in layer]

    # the reference: the same network, theta from TruncatedLogNormal.icdf of the same uniforms
    torch.manual_seed(2)
    u = torch.rand(6, 30 * len(layer), dtype=torch.float64).clamp(min=torch.finfo(torch.float64).eps / 4)
    model.zero_grad()
    thetas = []
    for i, g in enumerate(layer):
        q = g.posterior()
        thetas.append(q.icdf(u[:, 30 * i:30 * i + 30]) * g.mask)
    h = x.flatten(1)
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    for lin, theta in zip(linears, thetas):
        h = torch.tanh(lin(h)) * theta
    ref_out = linears[-1](h)
    kl = torch.stack([(g.kl() * g.mask).sum() / g.num_structures for g in layer]).mean()
    ref_kl = torch.stack([
        (torch.distributions.kl_divergence(g.posterior(), g.prior()) * g.mask).sum() / g.num_structures for g in layer
    ]).mean()
    torch.testing.assert_close(kl, ref_kl, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    (ref_out.square().sum() + ref_kl).backward()
    for g, (g_loc, g_log_scale) in zip(layer, fused):
        torch.testing.assert_close(g_loc, g.loc.grad, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(g_log_scale, g.log_scale.grad, rtol=1e-8, atol=1e-10)


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


def _aten_ops_per_step(name, gated, **options):
    """aten operations (nested included) of one training step: forward, ELBO, backward, fused Adam."""
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    from bmrs import build_model, gates, model_kl

    torch.manual_seed(0)
    model = build_model(name, (1, 32, 32), 10, gated=gated, **options).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    x, y = torch.randn(8, 1, 32, 32), torch.randint(0, 10, (8,))

    def step():
        loss = F.cross_entropy(model(x), y) + (model_kl(model) if gated else 0.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return sum(1 for e in prof.events() if e.name.startswith("aten::")), len(gates(model)) if gated else 0


@pytest.mark.slow
def test_gates_add_a_bounded_number_of_operations_per_training_step():
    """The gates' sample and KL are one fused computation for all gates: LeNet5's four gates
    add at most 60 operations each to a step, and each further gate of an MLP adds at most 30
    (its share: Adam on two more tensors, the multiplication and its backward)."""
    plain, _ = _aten_ops_per_step("lenet5", False)
    gated, n = _aten_ops_per_step("lenet5", True)
    assert n == 4 and gated <= plain + 60 * n, (plain, gated)
    extra = {}
    for layers in (1, 5):
        plain, _ = _aten_ops_per_step("mlp", False, hidden_layers=layers)
        gated, n = _aten_ops_per_step("mlp", True, hidden_layers=layers)
        extra[n] = gated - plain
    assert set(extra) == {2, 6} and extra[6] - extra[2] <= 30 * 4, extra
