"""Every decision about a run, made once before anything starts: model size, memory, the automatic choices, the
plan and the DeepSpeed config. Pure functions of the config and a few facts about the machine; torch-free.
Imports only the contract."""
