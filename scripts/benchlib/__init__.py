"""The benchmark behind scripts/bench.py, by responsibility.

processes  child processes (stub, load generator, proxies, HAProxy), all
           stopped when the run ends; the C tools' build; CPU pinning
checks     is every proxy run's statistics exact? (pure, unit-tested)
targets    what each figure should reach, and whether it does
runs       one load run, one idle run, and the scenarios built from them
tables     medians, paired ratios and the printed tables
"""
