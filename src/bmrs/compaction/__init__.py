"""Compaction: from a gated, masked model to a physically smaller plain network.

* :func:`compact` folds every gate's ``E[theta] * mask`` into the weights and deletes the
  pruned structures (with Torch-Pruning), keeping the eval-mode outputs.
* :func:`save_compact` / :func:`load_compact` store and rebuild a compacted model from
  tensors and JSON metadata (no pickled Python objects).
* :func:`remove_structures` removes one kind of structure (channels, heads, an adapter's
  kinds); a new :class:`~bmrs.structures.kinds.StructureKind` registers its removal there.
* :func:`count_parameters` and :func:`count_flops` measure a model before and after.
"""

from .core import compact, remove_structures
from .counting import count_flops, count_parameters
from .storage import ARCHITECTURES, architecture_builder, load_compact, register_architecture, save_compact

__all__ = [
    "ARCHITECTURES", "architecture_builder", "compact", "count_flops", "count_parameters", "load_compact", "register_architecture",
    "remove_structures", "save_compact",
]
