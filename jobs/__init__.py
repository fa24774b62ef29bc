"""seedsift entry points, one module per job, each runnable as `python -m jobs.NAME`."""
