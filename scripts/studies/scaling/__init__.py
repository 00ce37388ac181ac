"""The scaling study (scripts/bench_scaling.py), split by job: plan, models, worker, study, optimum, report."""
