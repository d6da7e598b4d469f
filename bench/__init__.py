"""namedmask benchmarks: every op, every live backend, against the torch reference in the
same run. `python -m bench` runs all; `python -m bench confusion_matrix` one."""
