"""What a checkpoint makes us load must not run code: JSON for our state, weights_only for our tensors."""
from __future__ import annotations

import json

import torch
from torch.torch_version import TorchVersion

import trainer.__main__ as entry
from launcher.contract.run_dir import MANIFEST, RNG, TRAINER_STATE, RunDir

from conftest import shardtune, tiny_config


def test_refuses_old_torch_with_faked_version(monkeypatch, capsys):
    """A torch < 2.6 cannot be installed next to this one, so its version string is faked."""
    monkeypatch.setattr(torch, "__version__", TorchVersion("2.5.1"))
    assert entry.main(["/nonexistent"]) == 2
    assert "CVE-2025-32434" in capsys.readouterr().err


def test_our_checkpoint_files_load_without_pickle(tmp_path, tiny_model):
    shardtune("launch", str(tiny_config(tmp_path, tiny_model, train={"max_steps": 2, "warmup_steps": 0},
                                        launch={"procs_per_node": 1})))
    ckpt = RunDir(tmp_path / "run").checkpoints / "step_00000002"
    state = json.loads((ckpt / TRAINER_STATE).read_text())
    assert state["step"] == 2 and state["position"]["offset"] > 0
    for rng in (ckpt / RNG).glob("rank_*.pt"):
        loaded = torch.load(rng, weights_only=True)  # would raise if it held arbitrary objects
        assert set(loaded) == {"torch", "device"}
    assert json.loads((ckpt / MANIFEST).read_text())["files"]
