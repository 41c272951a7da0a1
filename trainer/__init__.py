"""shardtune trainer: what torchrun starts on every rank (`python -m trainer RUN_DIR`)."""
