"""The application: training runs, post-training sweeps, suites of runs and their analyses."""
