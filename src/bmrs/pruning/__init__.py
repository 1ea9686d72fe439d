"""Pruning criteria (and their registry), masks, counting and schedules."""

from .budget import BUDGET_KINDS, BudgetResult, budget_cut, parse_budget
from .criteria import (
    BMRSN, BMRSU, CRITERIA, PAPER, RECOMMENDED, SNR, BMRSNCode, BMRSNKassRaftery, BMRSNRelative, Criterion,
    EvidenceCriterion, ExpectedTheta, L2, Random, Taylor, make_criterion, register_criterion, resolve_criterion,
)
from .evidence import EvidenceReport, LayerEvidence, explain
from .masks import (
    count_trainable_parameters, decide, kept_per_layer, kept_structures, parameter_compression, prune, structure_compression,
)
from .rounding import ROUND_MODES, RoundResult, round_width, round_widths
from .schedules import ContinuousPruning
from .slots import set_masks

__all__ = [
    "BUDGET_KINDS", "BudgetResult", "budget_cut", "parse_budget",
    "BMRSN", "BMRSNCode", "BMRSNKassRaftery", "BMRSNRelative", "BMRSU", "CRITERIA", "ContinuousPruning", "Criterion",
    "EvidenceCriterion", "EvidenceReport", "ExpectedTheta", "LayerEvidence", "explain", "L2", "PAPER", "RECOMMENDED", "Random", "SNR", "Taylor",
    "count_trainable_parameters", "decide",
    "kept_per_layer", "kept_structures", "make_criterion", "parameter_compression", "prune", "register_criterion", "resolve_criterion", "set_masks",
    "structure_compression", "ROUND_MODES", "RoundResult", "round_width", "round_widths",
]
