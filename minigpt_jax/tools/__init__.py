"""Tools beside training: sweeps, benchmarks, evaluation, PyTorch import, plots.
See docs/layout.md."""
