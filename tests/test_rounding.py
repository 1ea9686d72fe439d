"""Widths rounded to multiples (round_to): the rule, the structures it chooses, the evidence
it reports, and `bmrs compact --round-to`."""

from __future__ import annotations

import pytest
import torch

from bmrs import BMRSError, gates
from bmrs.cli import main
from bmrs.compaction import compact, load_compact
from bmrs.models import build_model
from bmrs.pruning import make_criterion, round_width, round_widths, set_masks


@pytest.mark.parametrize("kept, size, multiple, mode, expected", [
    (33, 150, 16, "nearest", 32), (40, 150, 16, "nearest", 48), (33, 150, 16, "up", 48), (47, 150, 16, "down", 32),
    (24, 150, 16, "nearest", 32),  # a tie goes up: keeps what the evidence kept
    (5, 150, 16, "down", 16),  # never down to 0
    (145, 150, 16, "up", 150),  # never beyond the full width
    (0, 150, 16, "nearest", 0), (150, 150, 16, "nearest", 150), (32, 150, 16, "nearest", 32), (7, 9, 1, "nearest", 7),
])
def test_round_width(kept, size, multiple, mode, expected):
    assert round_width(kept, size, multiple, mode) == expected


def test_round_width_refuses_bad_input():
    with pytest.raises(BMRSError):
        round_width(5, 10, 0)
    with pytest.raises(BMRSError):
        round_width(5, 10, 4, "sideways")


def _model(seed=0):
    torch.manual_seed(seed)
    model = build_model("mlp", (1, 8, 8), 3, width=40).double()
    with torch.no_grad():
        for gate in gates(model).values():
            gate.loc.copy_(torch.randn_like(gate.loc) * 2 - 1)
            gate.log_scale.copy_(torch.randn_like(gate.log_scale) - 1)
    return model


def test_round_widths_prunes_the_lowest_and_reports_the_evidence():
    model = _model()
    criterion = make_criterion("bmrs-n-kr")
    names = list(gates(model))
    set_masks(model, {n: torch.arange(40) < k for n, k in zip(names, (21, 30))})  # widths 21 and 30
    result = round_widths(model, criterion, 8)
    assert {n: b for n, (_, b) in result.widths.items()} == {"fc1": 24, "fc2": 32}  # printed by layer
    assert result.pruned == 0 and result.restored == 5
    # the restored structures are the pruned ones with the most evidence for keeping them
    change = 0.0
    for name, gate in gates(model).items():
        delta = (criterion.delta_f(gate) - criterion.gate_margin(gate)).detach().double()
        was = gate.mask.bool()
        now = result.masks[name]
        restored = now & ~was
        pruned_still = ~now & ~was
        if restored.any() and pruned_still.any():
            assert delta[restored].max() <= delta[pruned_still].min()  # least evidence for pruning first
        change -= float(delta[restored].sum())
    assert result.delta_f_change == pytest.approx(change, rel=1e-12)
    # the model's own masks are untouched until the result is written
    assert [int(g.mask.sum()) for g in gates(model).values()] == [21, 30]


def test_round_widths_down_prunes_the_structures_with_most_evidence_against_them():
    model = _model(1)
    criterion = make_criterion("bmrs-n")
    names = list(gates(model))
    set_masks(model, {n: torch.ones(40, dtype=torch.bool) for n in names})
    set_masks(model, {names[0]: torch.arange(40) < 34, names[1]: torch.ones(40, dtype=torch.bool)})
    result = round_widths(model, criterion, 16, mode="down")
    assert result.widths["fc1"] == (34, 32) and result.widths["fc2"] == (40, 40)
    gate = gates(model)[names[0]]
    delta = criterion.delta_f(gate).detach().double()
    gone = gate.mask.bool() & ~result.masks[names[0]]
    assert int(gone.sum()) == 2
    assert delta[gone].min() >= delta[result.masks[names[0]]].max()  # the most evidence for pruning
    assert result.delta_f_change == pytest.approx(float(delta[gone].sum()), rel=1e-12)
    set_masks(model, result.masks)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    model.eval()
    small = compact(model, x)
    torch.testing.assert_close(small(x), model(x))
    assert small[1].out_features == 32


def test_round_widths_of_a_baseline_reports_no_evidence():
    model = _model()
    set_masks(model, {n: torch.arange(40) < 13 for n in gates(model)})
    result = round_widths(model, make_criterion("l2"), 4)
    assert result.delta_f_change is None and all(b == 12 for _, b in result.widths.values())


def test_cli_compact_round_to(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--model", "mlp", "--width", "20", "--epochs", "3",
                 "--finetune-epochs", "0", "--method", "random", "--target", "0.3", "--threads", "1", "--no-progress",
                 "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["compact", str(run), "--round-to", "8", "--criterion", "l2", "--out", str(tmp_path / "c.pt")]) == 0
    printed = capsys.readouterr().out
    assert "widths rounded to multiples of 8 in the order of l2" in printed
    hidden = [m.out_features for m in load_compact(tmp_path / "c.pt").modules() if isinstance(m, torch.nn.Linear)][:-1]
    assert hidden and all(w % 8 == 0 or w == 20 for w in hidden)
    assert main(["compact", str(run), "--round-to", "0", "--out", str(tmp_path / "d.pt")]) == 2
