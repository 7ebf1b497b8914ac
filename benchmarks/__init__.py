"""Side-by-side benchmarks of mmfm against its peer libraries; run `python -m benchmarks.run_all`."""
