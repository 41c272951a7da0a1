"""Where a planned run goes: a torchrun command, an sbatch script, and what the scheduler says about a job.
Torch-free; imports the contract (and the plan's resolved config)."""
