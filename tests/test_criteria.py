"""Each criterion's decisions against its definition, on hand-built posteriors and weights."""

import math

import mpmath as mp
import pytest
import torch
from torch import nn

import bmrs
import mpref
from bmrs.pruning import decide, make_criterion, set_masks
from nets import TinyResNet, lenet_like, small_mlp

F64 = torch.float64


def gated_mlp(hidden=4):
    model = small_mlp(inputs=6, hidden=hidden, classes=3)
    bmrs.attach_gates(model, torch.randn(2, 6))
    return model


def set_posterior(gate, mu, log_sigma):
    with torch.no_grad():
        gate.loc.copy_(torch.tensor(mu))
        gate.log_scale.copy_(torch.tensor(log_sigma))


# (mu, sigma, exact delta F_N, mpmath at 60 digits): prune, keep, keep, prune
TABLE = [(-19.0, 1.0, 1.749548317), (-3.0, 0.5, -575.2300048), (-12.0, 4.0, -1.285105034), (-25.0, 2.0, 3.34029384)]


def test_bmrs_n_prunes_exactly_where_delta_f_is_nonnegative():
    model = gated_mlp()
    gate = bmrs.gates(model)["1"]
    set_posterior(gate, [m for m, _, _ in TABLE], [math.log(s) for _, s, _ in TABLE])
    crit = make_criterion("bmrs-n")
    df = crit.delta_f(gate)
    assert torch.allclose(df, torch.tensor([d for _, _, d in TABLE], dtype=F64), rtol=1e-6)
    masks = decide(model, crit)
    assert masks["1"].tolist() == [False, True, True, False]
    assert masks["3"].all()  # the other layer sits at the initial posterior: certain, theta ~ 1


def test_bmrs_n_code_adds_half_log_two_pi_and_breaks_near_prior_ties():
    model = gated_mlp()
    gate = bmrs.gates(model)["1"]
    # near-prior posteriors: exact delta F slightly below 0
    set_posterior(gate, [-5.0, -2.0, -3.0, 0.0], [5.0, 5.0, 4.0, -5.0])
    exact, code = make_criterion("bmrs-n"), make_criterion("bmrs-n-code")
    # delta_f is the true delta F; the code's criterion differs in its margin only
    assert torch.equal(code.delta_f(gate), exact.delta_f(gate))
    assert code.margin - exact.margin == -0.5 * math.log(2 * math.pi)
    assert (exact.delta_f(gate)[:3] < 0).all() and (exact.delta_f(gate)[:3] > -0.05).all()
    assert decide(model, exact)["1"].tolist() == [True, True, True, True]
    assert decide(model, code)["1"].tolist() == [False, False, False, True]


def test_posterior_equal_to_the_prior():
    prior = bmrs.LogUniform(torch.tensor(-20.0, dtype=F64), torch.tensor(0.0, dtype=F64))
    assert bmrs.delta_f(prior, prior, bmrs.bmrs_n_prior()).item() == 0.0
    assert bmrs.delta_f(prior, prior, bmrs.bmrs_u_prior(8)).item() == 0.0
    assert bmrs.delta_f(prior, prior, bmrs.bmrs_u_prior(4)).item() == 0.0
    assert -make_criterion("bmrs-n-code").margin == pytest.approx(0.9189385332, abs=1e-9)


@pytest.mark.parametrize("bits", [8, 4])
def test_bmrs_u_against_mpmath(bits):
    model = gated_mlp()
    gate = bmrs.gates(model)["1"]
    mus, sigmas = [-19.0, -1.0, -6.0, -12.0], [1.0, 0.1, 2.0, 0.5]
    set_posterior(gate, mus, [math.log(s) for s in sigmas])
    log2 = mp.log(2)
    ref = [float(mpref.delta_f_uniform(m, s, -23 * log2, -bits * log2)) for m, s in zip(mus, sigmas)]
    crit = make_criterion("bmrs-u", bits=bits)
    assert torch.allclose(crit.delta_f(gate), torch.tensor(ref, dtype=F64), rtol=1e-5)
    assert decide(model, crit)["1"].tolist() == [r < 0 for r in ref]


def test_snr_and_expected_theta_thresholds():
    model = gated_mlp()
    gate = bmrs.gates(model)["1"]
    set_posterior(gate, [-1.0, -3.0, -0.5, -6.0], [-2.0, 0.5, 1.0, -3.0])
    q = bmrs.TruncatedLogNormal(gate.loc.detach().double(), torch.exp(gate.log_scale.detach().double()))
    snr, mean = q.snr, q.mean
    assert decide(model, make_criterion("snr"))["1"].tolist() == (snr >= 1).tolist()
    assert decide(model, make_criterion("etheta"))["1"].tolist() == (mean >= 0.1).tolist()
    assert decide(model, make_criterion("snr", threshold=5.0))["1"].tolist() == (snr >= 5).tolist()
    # the cases differ, so the test would notice a swapped criterion
    assert (snr >= 1).tolist() != (mean >= 0.1).tolist()


def test_l2_scores_are_incoming_weight_norms_and_target_cuts_globally():
    model = gated_mlp(hidden=4)
    with torch.no_grad():
        model[0].weight.copy_(torch.diag(torch.tensor([1.0, 5.0, 2.0, 4.0])) @ torch.ones(4, 6) / math.sqrt(6))
        model[2].weight.copy_(torch.diag(torch.tensor([3.0, 0.5, 6.0, 7.0])) @ torch.ones(4, 4) / 2)
    crit = make_criterion("l2")
    scores = crit.structure_scores(model)
    assert torch.allclose(scores["1"], torch.tensor([1.0, 5.0, 2.0, 4.0], dtype=F64))
    assert torch.allclose(scores["3"], torch.tensor([3.0, 0.5, 6.0, 7.0], dtype=F64))
    masks = decide(model, crit, target=0.5)  # the 4 smallest of 8 norms: 0.5, 1, 2, 3
    assert masks["1"].tolist() == [False, True, False, True] and masks["3"].tolist() == [False, False, True, True]
    with pytest.raises(ValueError, match="no threshold"):
        decide(model, crit)


def test_parameter_target_reaches_the_target_with_the_fewest_structures():
    model = lenet_like()
    bmrs.attach_gates(model, torch.randn(2, 1, 32, 32))
    crit = make_criterion("random", seed=3)
    for target in (0.3, 0.7, 0.9):
        set_masks(model, decide(model, crit, target=target, target_kind="params"))
        reached = bmrs.parameter_compression(model)
        assert reached >= target
        # un-pruning the last structure of the ranking would fall below the target
        scores = torch.cat([s for s in crit.structure_scores(model).values()])
        masks = torch.cat([g.mask for g in bmrs.gates(model).values()]).bool()
        last = torch.where(~masks, scores, -torch.inf).argmax()
        offsets = torch.cumsum(torch.tensor([0] + [g.num_structures for g in bmrs.gates(model).values()]), 0)
        gate_index = int(torch.searchsorted(offsets, last, right=True)) - 1
        name = list(bmrs.gates(model))[gate_index]
        bmrs.gates(model)[name].mask[last - offsets[gate_index]] = 1.0
        assert bmrs.parameter_compression(model) < target


def test_taylor_matches_a_hand_computed_first_order_estimate():
    torch.manual_seed(0)
    model = gated_mlp(hidden=5)
    with torch.no_grad():
        model[2].weight[:, 1] = 0.0  # unit 1 of the first layer feeds nothing: zero gradient
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    crit = make_criterion("taylor", data=[(x, y)], batches=1)
    scores = crit.structure_scores(model)
    assert scores["1"][1] == 0.0
    # by hand: activation a at the first gate's output, g = dLoss/da (mean loss)
    model.eval()
    acts = {}

    def keep(module, args, out):
        out.retain_grad()
        acts["a"] = out

    h = bmrs.gates(model)["1"].register_forward_hook(keep)
    nn.functional.cross_entropy(model(x), y).backward()
    h.remove()
    a = acts["a"]
    expected = (a * a.grad).sum(0).abs().double()  # |sum_n a g| with g of the mean loss: / N * N
    assert torch.allclose(scores["1"], expected, rtol=1e-5, atol=1e-12)
    assert decide(model, crit, target=0.1)["1"][1].item() is False


@pytest.mark.parametrize("backend", [
    "gloo", pytest.param("nccl", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="NCCL needs a GPU")),
])
def test_taylor_averages_over_ranks_on_the_gates_device(backend):
    # NCCL reduces GPU tensors only: the scores go to the gates' device for the all_reduce
    device = "cuda" if backend == "nccl" else "cpu"
    torch.manual_seed(0)
    model = gated_mlp(hidden=5).to(device)
    crit = make_criterion("taylor", data=[(torch.randn(16, 6), torch.randint(0, 3, (16,)))], batches=1)
    alone = crit.structure_scores(model)
    torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        together = crit.structure_scores(model)
    finally:
        torch.distributed.destroy_process_group()
    for name, score in together.items():
        assert score.device.type == "cpu" and torch.allclose(score, alone[name], rtol=1e-12, atol=0)


def test_random_is_seeded():
    model = gated_mlp(hidden=6)
    a = make_criterion("random", seed=1).structure_scores(model)
    b = make_criterion("random", seed=1).structure_scores(model)
    c = make_criterion("random", seed=2).structure_scores(model)
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)


def test_coupled_family_is_decided_by_the_sum_of_delta_f():
    model = TinyResNet(channels=4)
    bmrs.attach_gates(model, torch.randn(2, 3, 8, 8))
    g = bmrs.gates(model)
    # slot 0: stem prunable (+1.75), blocks neutral-ish (-1.29 each): sum < 0 -> keep all
    # slot 1: stem strongly prunable (+3.34), blocks -1.29 +1.75: sum > 0 -> prune all
    set_posterior(g["stem_bn"], [-19.0, -25.0, 0.0, 0.0], [0.0, math.log(2), -5.0, -5.0])
    set_posterior(g["block1.bn2"], [-12.0, -12.0, 0.0, 0.0], [math.log(4)] * 2 + [-5.0, -5.0])
    set_posterior(g["block2.bn2"], [-12.0, -19.0, 0.0, 0.0], [math.log(4), 0.0, -5.0, -5.0])
    masks = decide(model, make_criterion("bmrs-n"))
    for name in ("stem_bn", "block1.bn2", "block2.bn2"):
        assert masks[name].tolist() == [True, False, True, True]


def test_keep_pruned_and_recompute():
    model = gated_mlp()
    gate = bmrs.gates(model)["1"]
    gate.mask[2] = 0.0  # pruned earlier, although its posterior says keep
    crit = make_criterion("bmrs-n")
    assert decide(model, crit, keep_pruned=True)["1"].tolist() == [True, True, False, True]
    assert decide(model, crit, keep_pruned=False)["1"].all()
    assert decide(model, crit)["1"].tolist() == [True, True, False, True]  # the default, as prune's
    bmrs.prune(model, crit)
    assert gate.mask.tolist() == [1.0, 1.0, 0.0, 1.0]


def test_make_criterion_names_and_errors():
    assert make_criterion("bmrs_n_code").name == "bmrs-n-code"
    assert make_criterion("bmrs-u", bits=4).bits == 4
    with pytest.raises(ValueError, match="unknown criterion"):
        make_criterion("magnitude")
    with pytest.raises(ValueError, match="bits"):
        make_criterion("bmrs-u", bits=40)
    with pytest.raises(ValueError, match="target compression"):
        decide(gated_mlp(), make_criterion("snr"), target=1.5)


def test_bmrs_n_rel_prunes_relaxed_and_pushed_down_structures_only():
    model = gated_mlp(hidden=6)
    gate = bmrs.gates(model)["1"]
    # relaxed to the family's widest posterior at four locations; half relaxed; pushed to 0;
    set_posterior(gate, [0.0, -5.0, -10.0, -15.0, 0.0, -30.0], [5.0, 5.0, 5.0, 5.0, 3.0, -1.0])
    rel, exact = make_criterion("bmrs-n-rel"), make_criterion("bmrs-n")
    delta = rel.delta_f(gate) - rel.gate_margin(gate)  # delta F against the uninformed posterior's
    assert torch.equal(delta[:4], torch.zeros(4, dtype=F64))  # an exact tie with no information
    assert delta[4] < -0.1 and delta[5] > 1.0
    assert decide(model, rel)["1"].tolist() == [False, False, False, False, True, False]
    # the exact criterion keeps the relaxed ones whose location drifted above about -13
    assert decide(model, exact)["1"].tolist() == [True, True, True, False, True, False]
    # and the reference is the uninformed posterior: equal to exact delta F minus its value there
    q0 = bmrs.TruncatedLogNormal(torch.tensor(-7.0, dtype=F64), torch.tensor(math.exp(5.0), dtype=F64))
    set_posterior(gate, [-7.0, -2.0, -3.0, -4.0, -6.0, -8.0], [0.0] * 6)
    prior = bmrs.LogUniform(torch.tensor(-20.0, dtype=F64), torch.tensor(0.0, dtype=F64))
    expected = exact.delta_f(gate)[0] - bmrs.delta_f(q0, prior, bmrs.bmrs_n_prior())
    assert (rel.delta_f(gate) - rel.gate_margin(gate))[0].item() == pytest.approx(expected.item(), rel=1e-12)


def test_bmrs_n_kr_keeps_only_positive_evidence():
    model = gated_mlp(hidden=4)
    gate = bmrs.gates(model)["1"]
    # relaxed short of the clamp (delta F ~ -0.07 and -0.2), a needed unit, one near -1
    set_posterior(gate, [-1.3, -0.7, 0.0, -4.0], [3.8, 3.3, -2.0, 1.3])
    exact = make_criterion("bmrs-n").delta_f(gate)
    kr = make_criterion("bmrs-n-kr")
    assert torch.equal(kr.delta_f(gate), exact) and kr.margin == -1.0
    assert (exact[:2] > -0.3).all() and (exact[:2] < 0).all() and exact[2] < -100
    assert decide(model, kr)["1"].tolist() == (exact < -1.0).tolist()
    assert decide(model, kr)["1"][:3].tolist() == [False, False, True]


# --- the evidence criteria: one rule, delta F >= margin, against its formula ---------------------

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _gated_models():
    from bmrs.models import build_model

    mlp = small_mlp(12, 9, 3)
    bmrs.attach_gates(mlp, torch.randn(2, 12))
    resnet = TinyResNet()  # channels coupled by residual additions: families
    bmrs.attach_gates(resnet, torch.randn(2, 3, 8, 8))
    lenet = lenet_like()
    bmrs.attach_gates(lenet, torch.randn(2, 1, 32, 32))
    vit = build_model("vit", (3, 16, 16), 5, depth=2, embed_dim=32, patch_size=4)  # attention heads
    return {"mlp": mlp, "resnet": resnet, "lenet": lenet, "vit": vit}


def _scatter_posteriors(model, seed):
    """Posteriors all over the (mu, log sigma) plane, a third relaxed to the cap of log sigma."""
    g = torch.Generator().manual_seed(seed)
    for gate in bmrs.gates(model).values():
        n = gate.num_structures
        log_sigma = torch.empty(n).uniform_(-3, 5, generator=g)
        log_sigma[torch.rand(n, generator=g) < 0.3] = gate.log_scale_bounds[1]
        set_posterior(gate, torch.empty(n).uniform_(-25, 2, generator=g).tolist(), log_sigma.tolist())


def _expected_masks(model, reduced, margin):
    """Keep masks written out from the rule: a family (a single structure, or channels tied
    together) is pruned where the sum over its members of delta F - margin is >= 0."""
    excess = {}
    for name, gate in bmrs.gates(model).items():
        prior = gate.prior()
        q = gate.posterior(F64)
        excess[name] = bmrs.delta_f(q, prior, reduced(prior)) - margin(gate, q, prior, reduced(prior))
    masks = {name: torch.ones(g.num_structures, dtype=torch.bool) for name, g in bmrs.gates(model).items()}
    for family in bmrs.gate_layout(model).families:
        total = torch.stack([excess[name][idx] for name, idx in family.members]).sum(dim=0)
        for name, idx in family.members:
            masks[name][torch.as_tensor(idx)] = ~(total >= 0)
    return masks


def _uninformed_margin(gate, q, prior, reduced):
    q0 = bmrs.TruncatedLogNormal(q.loc, torch.full_like(q.loc, math.exp(gate.log_scale_bounds[1])), gate.log_low, gate.log_high)
    return bmrs.delta_f(q0, prior, reduced)


_N = lambda prior: bmrs.bmrs_n_prior(prior)  # noqa: E731
EVIDENCE_RULES = {
    # criterion (name, options): (reduced prior, margin)
    ("bmrs-n", ()): (_N, lambda *_: 0.0),
    ("bmrs-n-code", ()): (_N, lambda *_: -HALF_LOG_2PI),
    ("bmrs-n-kr", ()): (_N, lambda *_: -1.0),
    ("bmrs-n-rel", ()): (_N, _uninformed_margin),
    ("bmrs-u", (("bits", 8),)): (lambda prior: bmrs.bmrs_u_prior(8, prior), lambda *_: 0.0),
    ("bmrs-u", (("bits", 4),)): (lambda prior: bmrs.bmrs_u_prior(4, prior), lambda *_: 0.0),
    ("bmrs-u", (("bits", 2.5),)): (lambda prior: bmrs.bmrs_u_prior(2.5, prior), lambda *_: 0.0),
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("key", list(EVIDENCE_RULES), ids=lambda k: k[0] + "".join(f"-{v}" for _, v in k[1]))
def test_evidence_criteria_decide_by_delta_f_against_their_margin(key, seed):
    """Every evidence criterion's masks are those of its rule, delta F >= margin, on models
    with single structures, families of channels and attention heads (the structures with
    exactly tied posteriors included); delta_f is the true delta F, gate_margin the margin."""
    (name, options), (reduced, margin) = key, EVIDENCE_RULES[key]
    criterion = make_criterion(name, **dict(options))
    assert criterion.evidence_based and criterion.threshold == 0.0
    pruned_some = kept_some = False
    for model in _gated_models().values():
        _scatter_posteriors(model, seed)
        masks = decide(model, criterion)
        expected = _expected_masks(model, reduced, margin)
        assert {k: v.tolist() for k, v in masks.items()} == {k: v.tolist() for k, v in expected.items()}
        pruned_some |= any((~m).any() for m in masks.values())
        kept_some |= any(m.any() for m in masks.values())
        for gate in bmrs.gates(model).values():
            prior = gate.prior()
            assert torch.equal(criterion.delta_f(gate), bmrs.delta_f(gate.posterior(F64), prior, reduced(prior)))
    assert pruned_some and kept_some


def test_evidence_margins():
    assert make_criterion("bmrs-n").margin == 0.0
    assert make_criterion("bmrs-n-code").margin == -HALF_LOG_2PI
    assert make_criterion("bmrs-n-kr").margin == -1.0
    assert make_criterion("bmrs-u", bits=4).margin == 0.0
    gate = bmrs.gates(gated_mlp())["1"]
    set_posterior(gate, [-7.0, -2.0, -3.0, -4.0], [5.0, 5.0, 0.0, -1.0])
    rel = make_criterion("bmrs-n-rel")
    q0 = bmrs.TruncatedLogNormal(gate.loc.double(), torch.full((4,), math.exp(5.0), dtype=F64), gate.log_low, gate.log_high)
    assert torch.equal(rel.gate_margin(gate), bmrs.delta_f(q0, gate.prior(), bmrs.bmrs_n_prior(gate.prior())))
