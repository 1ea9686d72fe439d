"""When to prune: continuously during training (post-training sweeps live in bmrs.experiments)."""

from __future__ import annotations

from torch import nn

from ..errors import BMRSError
from .criteria import Criterion, resolve_criterion
from .masks import decide, kept_structures
from .slots import set_masks

__all__ = ["ContinuousPruning"]


class ContinuousPruning:
    """Prune every ``every`` epochs while training (the paper prunes after every epoch).

    Args:
        criterion: the criterion that decides.
        every: prune after epochs ``every, 2*every, ...`` of the training phase.
        recompute: if True, masks are recomputed from scratch each time, so a structure
            pruned earlier can come back (the paper's code does this). Default False: a
            pruned structure stays pruned. Once masked, a structure gets no gradient from
            the data, only from the KL, so its posterior drifts back to the prior and a later
            decision about it would be made without evidence; keeping it pruned also makes
            compression monotone, which is what a user watching a run expects.
        target: optional compression target passed to :func:`~bmrs.pruning.decide`.
        target_kind: ``"structures"`` or ``"params"``.
    """

    def __init__(
        self,
        criterion: Criterion | str,
        every: int = 1,
        *,
        recompute: bool = False,
        target: float | None = None,
        target_kind: str = "structures",
    ) -> None:
        if int(every) < 1:
            raise BMRSError(f"every must be a positive number of epochs, got {every!r}")
        self.criterion, self.every, self.recompute = resolve_criterion(criterion), int(every), recompute
        self.target, self.target_kind = target, target_kind

    def __call__(self, model: nn.Module, epoch: int) -> dict[str, int] | None:
        """Called after training epoch ``epoch`` (1-based); returns kept counts if it pruned."""
        if epoch % self.every:
            return None
        masks = decide(
            model, self.criterion, target=self.target, target_kind=self.target_kind,
            keep_pruned=not self.recompute,
        )
        set_masks(model, masks)
        return kept_structures(model)
