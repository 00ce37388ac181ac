"""Building blocks of the studies in scripts/ (not installed: scripts/ is their import root, as when a study runs
with `python scripts/<study>.py`; tests/test_bench.py puts scripts/ on the path to load them).

  archs.py     the architectures the studies measure, taken from the model presets (models/presets.py)
  scaling/     the scaling study of scripts/bench_scaling.py, split by job: plan, worker, study, optimum, report
"""
