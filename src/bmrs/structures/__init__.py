"""What a gate removes, and where: the core analysis of a network's prunable structures.

* :mod:`~bmrs.structures.kinds`: gate sites, families, the layout of a gated model and the
  structure kinds (channels, attention heads, packed-qkv heads, residual blocks, an
  adapter's kinds) with their registry;
* :mod:`~bmrs.structures.sites`: finding the gate sites of a plain network (tracing it) and
  the families of coupled structures;
* :mod:`~bmrs.structures.attention`: attention heads as structures (the library's
  self-attention, ``nn.MultiheadAttention`` with its heads exposed, their compaction);
* :mod:`~bmrs.structures.adapters`: the :class:`~bmrs.structures.adapters.Adapter` protocol
  for model families the generic analysis cannot see, and the integrations that provide them.
"""
