"""The run's contract, at the bottom of the house: the config schema, the run directory (every file in it, and
its one reader and writer), user-facing errors and where shipped templates live. Imports nothing of ours and
no torch, so a login node, the sbatch script and every rank agree on the same names."""
