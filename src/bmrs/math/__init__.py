"""Distributions of the noise variable theta and the special functions behind them."""

from .distributions import LogUniform, TruncatedLogNormal

__all__ = ["LogUniform", "TruncatedLogNormal"]
