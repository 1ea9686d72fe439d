"""Support code for the experiments (data sets and related helpers)."""
