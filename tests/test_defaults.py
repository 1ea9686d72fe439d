"""The library, the Lightning callback and the command default to the same, recommended
settings (bmrs.pruning.RECOMMENDED); the paper's (bmrs.pruning.PAPER) are one option away."""

import inspect

import pytest

import bmrs
from bmrs.gates import DEFAULT_KL_REDUCTION, KL_REDUCTIONS
from bmrs.pruning import PAPER, RECOMMENDED, make_criterion


def defaults(fn) -> dict:
    return {n: p.default for n, p in inspect.signature(fn).parameters.items() if p.default is not inspect.Parameter.empty}


def test_the_settings_are_known_names():
    assert RECOMMENDED == {"method": "bmrs-n-kr", "kl_reduction": "structures"}
    assert PAPER == {"method": "bmrs-n-code", "kl_reduction": "mean"}
    assert DEFAULT_KL_REDUCTION == RECOMMENDED["kl_reduction"]
    for settings in (RECOMMENDED, PAPER):
        make_criterion(settings["method"])
        assert settings["kl_reduction"] in KL_REDUCTIONS


def test_the_library_defaults_to_the_recommended_settings():
    for fn in (bmrs.model_kl, bmrs.elbo_loss, bmrs.Trainer):
        kl = defaults(fn)["reduction" if fn is bmrs.model_kl else "kl_reduction"]
        assert kl == RECOMMENDED["kl_reduction"], fn.__qualname__


def test_the_lightning_callback_defaults_to_the_recommended_settings():
    pytest.importorskip("lightning")
    from bmrs.integrations.lightning import BMRSPruning

    found = defaults(BMRSPruning)
    assert {"method": found["criterion"], "kl_reduction": found["kl_reduction"]} == RECOMMENDED


def test_the_command_defaults_to_the_recommended_settings(tmp_path):
    """``bmrs train`` without --method and --kl-reduction fills in RECOMMENDED (and says so),
    and offers exactly the library's KL reductions."""
    from bmrs.cli import build_parser
    from bmrs.commands.train import _config_from_args, _recommended_defaults

    args = build_parser().parse_args(["train", "--dataset", "digits", "--model", "mlp", "--out", str(tmp_path / "r")])
    line = _recommended_defaults(args)
    config = _config_from_args(args)
    assert {"method": config.method, "kl_reduction": config.kl_reduction} == RECOMMENDED
    assert "recommended defaults" in line
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    choices = next(a.choices for a in train._actions if a.dest == "kl_reduction")
    assert tuple(choices) == tuple(KL_REDUCTIONS)
    from bmrs.rundir import RunConfig

    assert {"method": RunConfig().method, "kl_reduction": RunConfig().kl_reduction} == RECOMMENDED
