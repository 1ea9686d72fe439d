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


# (mu, sigma, exact delta F_N from MATH.md's table): prune, keep, keep, prune
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
    assert torch.allclose(code.delta_f(gate) - exact.delta_f(gate), torch.full((4,), 0.5 * math.log(2 * math.pi), dtype=F64))
    assert (exact.delta_f(gate)[:3] < 0).all() and (exact.delta_f(gate)[:3] > -0.05).all()
    assert decide(model, exact)["1"].tolist() == [True, True, True, True]
    assert decide(model, code)["1"].tolist() == [False, False, False, True]


def test_posterior_equal_to_the_prior():
    prior = bmrs.LogUniform(torch.tensor(-20.0, dtype=F64), torch.tensor(0.0, dtype=F64))
    assert bmrs.delta_f(prior, prior, bmrs.bmrs_n_prior()).item() == 0.0
    assert bmrs.delta_f(prior, prior, bmrs.bmrs_u_prior(8)).item() == 0.0
    assert bmrs.delta_f(prior, prior, bmrs.bmrs_u_prior(4)).item() == 0.0
    code_shift = make_criterion("bmrs-n-code").delta_f(bmrs.gates(gated_mlp())["1"]) - make_criterion("bmrs-n").delta_f(
        bmrs.gates(gated_mlp())["1"])
    assert code_shift[0].item() == pytest.approx(0.9189385332, abs=1e-9)


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
    delta = rel.delta_f(gate)
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
    assert rel.delta_f(gate)[0].item() == pytest.approx(expected.item(), rel=1e-12)


def test_bmrs_n_kr_keeps_only_positive_evidence():
    model = gated_mlp(hidden=4)
    gate = bmrs.gates(model)["1"]
    # relaxed short of the clamp (delta F ~ -0.07 and -0.2), a needed unit, one near -1
    set_posterior(gate, [-1.3, -0.7, 0.0, -4.0], [3.8, 3.3, -2.0, 1.3])
    exact = make_criterion("bmrs-n").delta_f(gate)
    kr = make_criterion("bmrs-n-kr")
    assert torch.allclose(kr.delta_f(gate), exact + 1.0)
    assert (exact[:2] > -0.3).all() and (exact[:2] < 0).all() and exact[2] < -100
    assert decide(model, kr)["1"].tolist() == (exact < -1.0).tolist()
    assert decide(model, kr)["1"][:3].tolist() == [False, False, True]
