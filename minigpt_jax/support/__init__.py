"""Support code: checkpoint I/O and restore, metrics, files, the lock, the CLI runner,
the compile cache, huge pages and profiling. See docs/layout.md."""
