"""Large-model I/O with real torchrun processes: streaming exports, hash-while-writing, background saves that a
kill cannot corrupt, a watchdog that tells a slow save from a stuck one, and checkpoints planned against the
preemption window.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from launcher.backends.slurm import Preemption, mem_bytes
from launcher.contract.config import apply_overrides, validate_config
from launcher.contract.errors import UserError
from launcher.contract.run_dir import LATEST, MANIFEST, TRAINER_STATE, RunDir
from launcher.planning.host import FusedAdamStatus, HostFacts
from launcher.planning.plan import build_plan, format_plan
from trainer.hf_writer import INDEX_FILE

from conftest import REPO, RenameDurability, losses, shardtune, tiny_config
from remote_models import custom_code_model

STEPS = 12
CONFIGS = REPO / "tests" / "data" / "model_configs"
TRAIN = {"max_steps": STEPS, "save_every": 5, "keep_last": 3, "grad_accum_steps": None, "global_batch_size": 8}


def config(tmp_path, model, zero_stage=2, **train):
    return tiny_config(tmp_path, model, train={**TRAIN, **train}, zero={"stage": zero_stage})


def safetensors_dir(directory) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, tiny_model):
    """One uninterrupted ZeRO-3 run whose end-of-run export writes many small shards."""
    tmp = tmp_path_factory.mktemp("zero3")
    shardtune("launch", str(config(tmp, tiny_model, zero_stage=3, export_max_shard_size="100KB")))
    return tmp / "run"


def test_final_and_offline_exports_stream_the_same_weights_deepspeed_reconstructs(zero3_run, tmp_path):
    """final/ (every rank gathering, rank 0 writing) and `shardtune export` (reading the checkpoint lazily)
    hold exactly the weights DeepSpeed's own zero_to_fp32 reconstructs (what the old whole-model export wrote)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM

    run = RunDir(zero3_run)
    ckpt = run.checkpoint(STEPS)
    offline = tmp_path / "offline"
    shardtune("export", str(ckpt), str(offline), "--max_shard_size=100KB")
    reference = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    for directory in (run.final, offline):
        got = safetensors_dir(directory)
        assert got.keys() == reference.keys()
        assert all(torch.equal(got[k], reference[k]) for k in reference), directory
        index = json.loads((directory / INDEX_FILE).read_text())
        files = sorted(p.name for p in directory.glob("*.safetensors"))
        assert len(files) >= 4 and sorted(set(index["weight_map"].values())) == files
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
        assert all(p.stat().st_size <= 100_000 + 20_000 or len(load_file(p)) == 1
                   for p in directory.glob("*.safetensors"))
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    models = [AutoModelForCausalLM.from_pretrained(d).eval() for d in (run.final, offline)]
    with torch.no_grad():
        assert torch.equal(models[0](ids).logits, models[1](ids).logits)
    assert models[0].generation_config is not None


def test_shards_reopened_one_at_a_time_still_give_the_weights_deepspeed_reconstructs(zero3_run, monkeypatch):
    """Reading a large checkpoint, each rank's shard is reopened on its own after a window of reads from it (it
    used to reopen every shard together, a load of each of them per window). With a window of a few KB here the
    reopening really happens, many times; the weights must not change."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from trainer import zero_reader

    ckpt = RunDir(zero3_run).checkpoint(STEPS)
    reference = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    loads, real_load = [], zero_reader._load
    monkeypatch.setattr(zero_reader, "_load", lambda path: loads.append(path.name) or real_load(path))
    got = dict(zero_reader.ZeroCheckpoint(ckpt, remap_bytes=8 << 10).tensors())
    assert got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in reference)
    shards = sorted(p.name for p in ckpt.glob("*optim_states.pt"))
    assert len(shards) == 2 and all(loads.count(name) > 5 for name in shards), loads


def test_an_export_replaces_only_an_earlier_export_or_an_empty_directory(zero3_run, tmp_path):
    """An export replaces its directory whole: it used to delete whatever was there (`export CKPT ~/models`
    wiped ~/models; `export RUN RUN` the run). A build abandoned by a crash, as big as the model, is removed."""
    from trainer.tools.export import export_command

    ckpt = RunDir(zero3_run).checkpoint(STEPS)
    mine = tmp_path / "models"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    proc = shardtune("export", str(ckpt), str(mine), check=False)
    assert proc.returncode == 1 and f"not exporting to {mine}" in proc.stderr and "new or empty" in proc.stderr
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    before = sorted(p.relative_to(zero3_run) for p in zero3_run.rglob("*"))
    with pytest.raises(UserError, match="not exporting"):
        export_command(ckpt, zero3_run)
    assert sorted(p.relative_to(zero3_run) for p in zero3_run.rglob("*")) == before

    out = tmp_path / "out"
    export_command(ckpt, out)
    gone = subprocess.Popen(["true"])
    gone.wait()
    abandoned = tmp_path / f".out.tmp-{socket.gethostname()}-{gone.pid}"
    abandoned.mkdir()
    (abandoned / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 1000)
    (out / "stale.txt").write_text("from the earlier export")
    export_command(ckpt, out)  # an earlier export is replaced whole
    assert not abandoned.exists() and not (out / "stale.txt").exists()
    assert safetensors_dir(out).keys() == safetensors_dir(RunDir(zero3_run).final).keys()


def test_an_export_is_on_disk_before_its_name_appears_fsyncs_recorded_as_no_power_cut_can_be_staged(
        zero3_run, tmp_path, monkeypatch):
    """The export is built under a temporary name and renamed into place; its index, config and tokenizer files
    were not fsynced, so a crash after the rename could leave a complete-looking export with empty files."""
    from trainer.tools.export import export_command

    durability = RenameDurability(monkeypatch)
    out = tmp_path / "out"
    export_command(RunDir(zero3_run).checkpoint(STEPS), out, max_shard_size="100KB")
    assert (out / INDEX_FILE).is_file() and (out / "config.json").is_file()
    durability.assert_durable(out)


def _live_processes() -> dict[int, tuple[int, int, str]]:
    """pid: (parent pid, process group, command line) of every process not yet dead (zombies count as dead)."""
    out = {}
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if proc.name.isdigit() and fields[0] != "Z":
            out[int(proc.name)] = (int(fields[1]), int(fields[2]), cmdline)
    return out


def test_a_killed_conversion_builder_takes_its_conversion_down_with_it(zero3_run):
    """A rank SIGKILLed while DeepSpeed's universal conversion runs (watchdog, OOM, scancel) used to leave the
    conversion and its workers running, holding memory and writing a directory nobody would rename."""
    ckpt = RunDir(zero3_run).checkpoint(STEPS)
    builder = subprocess.Popen([sys.executable, "-c", "import sys; from pathlib import Path; "
                                "from trainer.checkpoint import universal_copy; "
                                "universal_copy(Path(sys.argv[1]), print, workers=2)", str(ckpt)], cwd=REPO)
    deadline = time.monotonic() + 120
    converter = None
    while converter is None and time.monotonic() < deadline and builder.poll() is None:
        converter = next((pid for pid, (ppid, _, cmd) in _live_processes().items()
                          if ppid == builder.pid and "trainer.safe_convert" in cmd), None)
        time.sleep(0.01)
    assert converter is not None, "the conversion never started"
    builder.kill()
    builder.wait()
    deadline = time.monotonic() + 3  # importing DeepSpeed alone takes the conversion longer than this
    while time.monotonic() < deadline and any(pgid == converter for _, pgid, _ in _live_processes().values()):
        time.sleep(0.05)
    left = {pid: cmd for pid, (_, pgid, cmd) in _live_processes().items() if pgid == converter or pid == converter}
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, left


def test_a_model_with_its_own_code_trains_exports_and_answers(tmp_path, tiny_model):
    """model.trust_remote_code trained, then failed the end-of-run export: the checkpoint kept the config's code but
    not the model's, and the export rebuilt the model without trusting either. An offline export runs the code a
    checkpoint carries only when told to."""
    from transformers import AutoModelForCausalLM

    model = custom_code_model(tiny_model, tmp_path / "custom")
    cfg = config(tmp_path, model, zero_stage=2, max_steps=4, save_every=2, sample_prompt="hi")
    raw = yaml.safe_load(cfg.read_text())
    raw["model"]["trust_remote_code"] = True
    raw["launch"]["procs_per_node"] = 1  # the code's journey through checkpoint and export, not the ranks
    cfg.write_text(yaml.safe_dump(raw))
    proc = shardtune("launch", str(cfg))
    assert "sample: 'hi'\n    -> '" in proc.stdout + proc.stderr
    run = RunDir(tmp_path / "run")
    assert (run.final / "modeling_tinycustom.py").read_text() == (model / "modeling_tinycustom.py").read_text()

    refused = shardtune("export", str(run.path), str(tmp_path / "offline"), check=False)
    assert refused.returncode == 1 and "modeling_tinycustom.py" in refused.stderr and "--trust_remote_code" in \
        refused.stderr and not (tmp_path / "offline").exists()
    shardtune("export", str(run.path), str(tmp_path / "offline"), "--trust_remote_code")
    final, offline = (AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True)
                      for d in (run.final, tmp_path / "offline"))
    assert type(final).__name__ == type(offline).__name__ == "TinyCustomForCausalLM"
    assert final.state_dict().keys() == offline.state_dict().keys()
    assert all(torch.equal(final.state_dict()[k], offline.state_dict()[k]) for k in final.state_dict())
    assert shardtune("generate", str(run.path), "hi", "--max_new_tokens=4", "--trust_remote_code").stdout


def test_an_auto_map_that_transformers_implements_natively_needs_no_trust(tmp_path):
    """Hub models such as Phi-3 keep an `auto_map` next to a model_type transformers implements: they train
    without trust_remote_code, natively, and must export the same way."""
    from trainer.export import model_config

    cfg = json.loads((CONFIGS / "llama3_8b.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_llama.LlamaConfig",
                       "AutoModelForCausalLM": "modeling_llama.LlamaForCausalLM"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert type(model_config(tmp_path, trust_remote_code=False)).__name__ == "LlamaConfig"


def test_zero3_fingerprint_sums_the_master_weights_deepspeed_reconstructs(zero3_run):
    """The resume check compares the master weights' sum too; at ZeRO-3 it read the torch optimizer's param
    groups, which DeepSpeed empties between steps, so it compared 0 with 0 and only the Adam moments counted."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = RunDir(zero3_run).checkpoint(STEPS)
    saved = json.loads((ckpt / TRAINER_STATE).read_text())["fingerprint"]
    reference = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    want = sum(float(t.detach().double().sum()) for t in reference.values())
    assert saved[0] == pytest.approx(want, rel=1e-9) and abs(want) > 1


def test_zero1_bf16_with_accumulation_resumes_and_exports_offline(tmp_path, tiny_model):
    """bf16 at ZeRO-1 with fp32 accumulation is DeepSpeed's BF16_Optimizer, whose shards record no ZeRO stage:
    `shardtune export` failed on them with KeyError (DeepSpeed's zero_to_fp32 refuses them too). The offline export
    must hold the weights the run's ranks exported, and a run resumed from its step-2 checkpoint must continue
    exactly."""
    train = {"max_steps": 4, "save_every": 2, "precision": "bf16", "grad_accum_steps": 2}
    whole = tmp_path / "whole"
    whole.mkdir()
    shardtune("launch", str(tiny_config(whole, tiny_model, train=train, zero={"stage": 1})))
    ckpt = RunDir(whole / "run").checkpoint(4)
    assert list(ckpt.glob("bf16_zero_pp_rank_*_optim_states.pt"))
    offline = tmp_path / "offline"
    shardtune("export", str(ckpt), str(offline))
    got, want = safetensors_dir(offline), safetensors_dir(RunDir(whole / "run").final)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    from trainer.zero_reader import ZeroCheckpoint  # each shard reopened after every few KB read from it
    small_windows = dict(ZeroCheckpoint(ckpt, remap_bytes=8 << 10).tensors())
    assert all(torch.equal(small_windows[k].to(want[k].dtype), want[k]) for k in want)
    cfg = tiny_config(tmp_path, tiny_model, train=train, zero={"stage": 1})
    resumed = shardtune("launch", str(cfg), f"train.resume={RunDir(whole / 'run').checkpoint(2)}")
    assert "step_00000002 at step 2" in resumed.stderr
    got, want = losses(tmp_path / "run"), losses(whole / "run")
    assert sorted(got) == [3, 4] and all(got[step] == want[step] for step in got), (got, want)


def test_module_tensors_joined_on_disk_are_exported_as_save_pretrained_writes_them(tmp_path):
    """sarvam_moe runs q, k and v as three modules, which transformers stores as one query_key_value tensor.
    Reverted one module tensor at a time, each came out under the joined name: a file with three entries of one
    name, which the safetensors header cannot hold. transformers' own save_pretrained is the reference."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer.export import Layout, write_model_dir

    config = AutoConfig.for_model("sarvam_moe", hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=100,
                                  num_hidden_layers=2, n_routed_experts=4, num_experts_per_tok=2,
                                  first_k_dense_replace=1, n_shared_experts=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(tmp_path / "reference")
    layout = Layout(config, torch.float32)
    state = model.state_dict()
    entries = layout.entries([(n, tuple(t.shape)) for n, t in state.items()])
    out = write_model_dir(tmp_path / "streamed", config, None, layout, entries, iter(state.items()), "5GB")
    got, want = safetensors_dir(out), safetensors_dir(tmp_path / "reference")
    assert any("query_key_value" in k for k in want) and got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


LOAD_ONCE = """
import hashlib, sys, torch
from pathlib import Path
from trainer.checkpoint_io import load_verified

def status(key):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024

path, size, sha = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
Path("/proc/self/clear_refs").write_text("5")  # the peak RSS from here on
before = status("VmRSS")
state = load_verified(path, (size, sha))
print(status("VmHWM") - before, float(state["partition"][12345]))
"""


def test_a_verified_checkpoint_file_is_held_once_while_it_loads(tmp_path):
    """A resume used to read each file whole and parse those bytes: the file twice in memory (at ZeRO 0-2 every rank
    loads the whole model file). Measured as the peak RSS of a process loading a 200 MB file, verified."""
    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"partition": torch.arange(50_000_000, dtype=torch.float32)}, path)
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            digest.update(chunk)
    size = path.stat().st_size
    proc = subprocess.run([sys.executable, "-c", LOAD_ONCE, str(path), str(size), digest.hexdigest()],
                          capture_output=True, text=True, cwd=REPO, check=True)
    growth, last = proc.stdout.split()[-2:]
    assert float(last) == 12345
    assert 0.9 * size < int(growth) < 1.3 * size, (int(growth) / size, proc.stderr[-2000:])


def test_manifest_digests_hashed_while_writing_match_the_bytes_on_disk(zero3_run):
    ckpt = RunDir(zero3_run).checkpoint(STEPS)
    manifest = json.loads((ckpt / MANIFEST).read_text())["files"]
    on_disk = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST)
    assert sorted(manifest) == on_disk and any("optim_states" in f for f in on_disk)
    for rel, meta in manifest.items():
        data = (ckpt / rel).read_bytes()
        assert meta["size"] == len(data) and meta["sha256"] == hashlib.sha256(data).hexdigest(), rel
    rows = [r for r in RunDir(zero3_run).read_metrics() if "save_gbps" in r]
    assert rows and all(r["save_gb"] > 0 and r["save_seconds"] > 0 for r in rows)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model):
    """Synchronous saves, never interrupted: the losses every other run must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    shardtune("launch", str(config(tmp, tiny_model)))
    return losses(tmp / "run")


def test_an_export_that_fails_on_the_writing_rank_is_named_cleaned_up_and_done_by_a_relaunch(tmp_path, tiny_model,
                                                                                              zero3_run):
    """A full filesystem while rank 0 writes final/ at ZeRO-3. Rank 1 waits in the next parameter's gather and is
    killed by torchrun once rank 0 has failed; the job's last line names rank 0's error, not rank 1's silent end
    (it used to say "killed by a signal, e.g. SIGKILL from the OOM killer"). The partial export is gone, the last
    checkpoint is in charge, and a relaunch only exports from it: the weights of the uninterrupted run."""
    cfg = config(tmp_path, tiny_model, zero_stage=3, export_max_shard_size="100KB")
    proc = shardtune("launch", str(cfg), env={"SHARDTUNE_FAULTS": "fail_export_write@0:0"}, check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "rank 0 on" in last and "No space left on device" in last, proc.stderr[-3000:]
    run = RunDir(tmp_path / "run")
    assert (run.checkpoints / LATEST).read_text().strip() == run.checkpoint(STEPS).name
    assert not run.final.exists() and not list(run.path.glob(f".{run.final.name}.tmp-*"))
    proc = shardtune("launch", str(cfg))
    assert f"{run.checkpoint(STEPS).name} at step {STEPS}" in proc.stderr and run.read_status()["state"] == "completed"
    assert losses(run.path) == losses(zero3_run)
    final, reference = safetensors_dir(run.final), safetensors_dir(RunDir(zero3_run).final)
    assert final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in final)


def test_a_kill_during_a_background_save_leaves_the_previous_checkpoint_in_charge(tmp_path, tiny_model, reference):
    cfg = config(tmp_path, tiny_model, async_save=True)
    proc = shardtune("launch", str(cfg), env={"SHARDTUNE_FAULTS": "kill_in_write@10:1"}, check=False)
    assert proc.returncode != 0
    run = RunDir(tmp_path / "run")
    assert (run.checkpoints / LATEST).read_text().strip() == "step_00000005"
    assert not (run.checkpoint(10) / MANIFEST).exists()
    proc = shardtune("launch", str(cfg))
    assert "step_00000005 at step 5" in proc.stderr
    assert losses(run.path) == reference  # the background save's snapshot held the state of its own step


def test_the_watchdog_spares_a_slow_save_that_progresses_and_stops_one_that_does_not(tmp_path, tiny_model):
    """One rank: the watchdog judges each rank's own heartbeat, whatever the others do."""
    launch = {"stall_timeout_s": 4, "startup_timeout_s": 300, "max_restarts": 1, "procs_per_node": 1}
    (tmp_path / "slow").mkdir()
    (tmp_path / "stalled").mkdir()
    slow = tiny_config(tmp_path / "slow", tiny_model, train={"max_steps": 6, "save_every": 3}, launch=launch)
    proc = shardtune("launch", str(slow), env={"SHARDTUNE_FAULTS": "slow_save@3:0=12"})
    assert "stuck" not in proc.stdout + proc.stderr and "resumed from" not in proc.stderr
    assert RunDir(tmp_path / "slow" / "run").read_status()["state"] == "completed"
    stalled = tiny_config(tmp_path / "stalled", tiny_model, train={"max_steps": 6, "save_every": 3}, launch=launch)
    proc = shardtune("launch", str(stalled), env={"SHARDTUNE_FAULTS": "stall_save@3:0=30"})
    assert "rank 0 stuck in 'save' at step 3" in proc.stdout + proc.stderr
    assert RunDir(tmp_path / "stalled" / "run").read_status()["state"] == "completed"  # restarted, then finished


def _slurm_plan(train: dict | None = None, stage: int = 3, slurm: dict | None = None, preemption=None,
                disk_free=None, output_dir: str = "/scratch/run", **launch):
    raw = {"model": {"name_or_path": str(REPO / "tests" / "data" / "model_configs" / "llama3_8b.json")},
           "data": {"path": "/d.jsonl", "format": "messages", "seq_len": 4096},
           "train": {"max_steps": 10, "grad_accum_steps": 1, "lr": 1e-5, "seed": 0, **(train or {})},
           "zero": {"stage": stage}, "launch": {"backend": "slurm", "nodes": 2, "procs_per_node": 8, **launch},
           "slurm": slurm or {}, "output_dir": output_dir}
    host = HostFacts(0, FusedAdamStatus(True, "prebuilt"), slurm_node_cpus=96, preemption=preemption,
                     disk_free=disk_free)
    return build_plan(validate_config(apply_overrides(raw, [])), host=host)


def test_plan_compares_the_checkpoints_and_export_at_their_peak_with_the_free_space_of_their_filesystem(tmp_path):
    """Llama-3-8B (8,030,261,248 parameters, published) at ZeRO-3: 12 bytes per parameter a checkpoint, 2 for its
    bf16 export. With keep_last 3 and 5 saves, 4 checkpoints are on disk while the newest is written (more than
    3 and the export after the last save)."""
    params = 8_030_261_248
    ckpt_gb, export_gb = (12 * params + 5_000_000) / 1e9, 2 * params / 1e9
    train = {"save_every": 2, "keep_last": 3}
    roomy = _slurm_plan(train, disk_free=("/scratch", int(500e9))).to_json()
    assert roomy["disk_need_gb"] == pytest.approx(4 * ckpt_gb, abs=1e-3) and not roomy["warnings"]
    assert roomy["disk_free_gb"] == 500.0
    tight = _slurm_plan(train, disk_free=("/scratch", int(300e9)))
    (warning,) = tight.warnings
    assert warning.startswith("/scratch has 300.0 GB free, but the run needs 4 checkpoints of "
                              f"{ckpt_gb:,.1f} GB at once (the newest is written before the oldest is removed)")
    assert f"{4 * ckpt_gb:,.1f} GB more at the peak" in warning and "lower train.keep_last" in warning
    assert (f"the run needs {4 * ckpt_gb:,.1f} GB more on its filesystem at the peak (300.0 GB free)"
            in format_plan(tight))
    (problem,) = _slurm_plan(train, disk_free=("/scratch", int(50e9))).warnings
    assert (f"/scratch has 50.0 GB free, less than one checkpoint ({ckpt_gb:,.1f} GB): the first save would fail"
            in problem)
    # One save, at the end: that checkpoint and the export written beside it.
    single = _slurm_plan({"keep_last": 1}, disk_free=("/scratch", int(120e9))).to_json()
    assert single["disk_need_gb"] == pytest.approx(ckpt_gb + export_gb, abs=1e-3) and not single["warnings"]
    (warning,) = _slurm_plan({"keep_last": 1}, disk_free=("/scratch", int(110e9))).warnings
    assert (f"the run needs 1 checkpoint of {ckpt_gb:,.1f} GB and the export of {export_gb:,.1f} GB beside them: "
            f"{ckpt_gb + export_gb:,.1f} GB more at the peak") in warning
    # Resuming where two complete checkpoints of 16 ranks are already on disk: only two of the four are new bytes.
    run = RunDir(tmp_path / "run")
    for step in (2, 4):
        run.checkpoint(step).mkdir(parents=True)
        (run.checkpoint(step) / MANIFEST).write_text(json.dumps({"world_size": 16}))
    resumed = _slurm_plan(train, disk_free=("/scratch", int(300e9)), output_dir=str(run.path)).to_json()
    assert resumed["disk_need_gb"] == pytest.approx(2 * ckpt_gb, abs=1e-3) and not resumed["warnings"]
    # On 4 nodes instead of 2, the newest is first converted to DeepSpeed's universal format: a copy of its size.
    wider = _slurm_plan(train, disk_free=("/scratch", int(250e9)), output_dir=str(run.path), nodes=4)
    assert wider.to_json()["disk_need_gb"] == pytest.approx(3 * ckpt_gb, abs=1e-3)
    (warning,) = wider.warnings
    assert f"the universal copy of {ckpt_gb:,.1f} GB a resume on another world size makes" in warning
    fresh = _slurm_plan({**train, "resume": "never", "overwrite": True}, disk_free=("/scratch", int(300e9)),
                        output_dir=str(run.path))  # the earlier results are moved aside, not deleted
    assert fresh.to_json()["disk_need_gb"] == pytest.approx(4 * ckpt_gb, abs=1e-3) and fresh.warnings
    unknown = _slurm_plan(train).to_json()  # a filesystem that does not say how much is free
    assert unknown["disk_free_gb"] is None and not unknown["warnings"]


def test_plan_warns_when_a_checkpoint_cannot_be_written_within_the_preemption_window():
    # Llama-3-8B: 8,030,261,248 parameters (its published count); ZeRO-3 saves fp32 master + Adam moments.
    expected_gb = (12 * 8_030_261_248 + 5_000_000) / 1e9
    fits = _slurm_plan().to_json()
    assert fits["checkpoint_gb"] == pytest.approx(expected_gb, abs=1e-3) and not fits["warnings"]
    slow = _slurm_plan(storage_gbps=0.25).to_json()
    assert slow["checkpoint_write_s"] == pytest.approx(expected_gb / 0.25, abs=0.1)
    (warning,) = slow["warnings"]
    assert f"{expected_gb:,.1f} GB" in warning and f"{expected_gb / 0.25:,.0f} s" in warning
    assert "slurm.signal_lead_s gives it 300 s" in warning


def test_plan_warns_when_a_checkpoint_does_not_fit_the_partitions_preemption_grace_time():
    """SLURM's own preemption gives the partition's GraceTime, whatever slurm.signal_lead_s says. Llama-3-8B at
    ZeRO-3 (8,030,261,248 parameters, published) writes 12 bytes per parameter: 96.4 GB, 96 s at 1 GB/s, 145 s
    with the 1.5x margin; slurm.signal_lead_s is raised so only the grace time can be short."""
    expected_gb = (12 * 8_030_261_248 + 5_000_000) / 1e9
    short = _slurm_plan(slurm={"signal_lead_s": 1000}, storage_gbps=1.0,
                        preemption=Preemption("scavenger", "REQUEUE", 120)).to_json()
    (warning,) = short["warnings"]
    assert "partition scavenger preempts jobs (PreemptMode=REQUEUE) with GraceTime=120 s" in warning
    assert f"{expected_gb:,.1f} GB" in warning and f"{expected_gb * 1.5:,.0f} s" in warning
    long = _slurm_plan(slurm={"signal_lead_s": 1000}, storage_gbps=1.0,
                       preemption=Preemption("scavenger", "REQUEUE", 150))
    assert not long.to_json()["warnings"]


def test_plan_counts_the_host_copies_background_saves_keep_on_rank_zeros_node():
    # Llama-3-8B (8,030,261,248 parameters, published), 2 nodes x 8 ranks, bf16. Each rank's background save
    # copies its optimizer partition (fp32 master + two Adam moments: 12 bytes per parameter over 16 ranks);
    # at ZeRO-2 rank 0 also copies the bf16 module file (2 bytes per parameter). Node 0 holds 8 ranks.
    params = 8_030_261_248
    for stage, expected in ((3, 8 * 12 * params / 16), (2, 2 * params + 8 * 12 * params / 16)):
        on = _slurm_plan(train={"async_save": True}, stage=stage)
        assert on.memory["host_per_node_gb"]["async_save_snapshots"] == pytest.approx(expected / 1e9, abs=1e-3)
        assert f"background-save copies {expected / 1e9:.1f}" in format_plan(on)
        off = _slurm_plan(stage=stage)
        assert off.memory["host_per_node_gb"]["async_save_snapshots"] == 0
        assert "background-save" not in format_plan(off)


def test_a_background_save_copies_a_tied_embedding_once_and_holds_the_host_memory_the_plan_counts(tmp_path):
    """Tied input and output embeddings are one tensor: a background save must write (and hold) it once, as a
    synchronous save does, and its host copies must be what the plan promised for rank 0's node."""
    from transformers import AutoModelForCausalLM

    from examples.tiny_model import make_tiny_llama

    model = make_tiny_llama(tmp_path / "tied", tie_embeddings=True)
    sizes, runs = {}, {}
    for mode in ("sync", "async"):
        (tmp_path / mode).mkdir()
        cfg = tiny_config(tmp_path / mode, model, train={"max_steps": 3, "save_every": 2, "warmup_steps": 1,
                                                         "async_save": mode == "async"})
        shardtune("launch", str(cfg))
        runs[mode] = (cfg, RunDir(tmp_path / mode / "run"))
        files = json.loads((runs[mode][1].checkpoint(2) / MANIFEST).read_text())["files"]
        sizes[mode] = {rel: meta["size"] for rel, meta in files.items() if rel.endswith(".pt")
                       and "rng" not in rel}
    assert sizes["sync"].keys() == sizes["async"].keys()
    for rel, size in sizes["sync"].items():  # the same tensors; only zip records and padding may differ
        assert sizes["async"][rel] == pytest.approx(size, rel=0.03), rel
    cfg, run = runs["async"]
    (row,) = [r for r in run.read_metrics() if "save_snapshot_gb" in r]
    # ZeRO-2 in fp32 on 2 ranks of one node: rank 0's module file (4 bytes per parameter) and both ranks'
    # optimizer partitions (12 bytes per parameter over 2 ranks): 16 bytes per parameter on the node.
    params = AutoModelForCausalLM.from_pretrained(model).num_parameters()
    assert row["save_snapshot_gb"] == pytest.approx(16 * params / 1e9, rel=0.03)
    planned = json.loads(shardtune("plan", str(cfg), "--json").stdout)["memory"]
    assert planned["params"] == params
    assert planned["host_per_node_gb"]["async_save_snapshots"] == pytest.approx(16 * params / 1e9, abs=5e-4)


def test_plan_warns_when_slurm_mem_is_below_the_host_ram_a_node_needs():
    assert (mem_bytes("64G"), mem_bytes("500"), mem_bytes("2T"), mem_bytes("0")) == (64 << 30, 500 << 20, 2 << 40, None)
    needed_gb = _slurm_plan(train={"async_save": True}).memory["host_total_gb"]
    below, above = f"{int(needed_gb * 1e9 / 2**30) - 1}G", f"{int(needed_gb * 1e9 / 2**30) + 1}G"
    (warning,) = [w for w in _slurm_plan(train={"async_save": True}, slurm={"mem": below}).warnings if "slurm.mem" in w]
    assert f"slurm.mem {below}" in warning and f"{needed_gb:,.1f} GB" in warning
    assert not [w for w in _slurm_plan(train={"async_save": True}, slurm={"mem": above}).warnings if "slurm.mem" in w]


def test_plan_warns_when_the_sample_reply_cannot_fit_in_slurm_mem():
    """The end-of-run sample loads the exported model (Llama-3-8B: 8.03e9 parameters in bf16, 16.1 GB by hand) on
    rank 0's node; past slurm.mem SLURM kills the job at its very end."""
    (warning,) = [w for w in _slurm_plan(train={"sample_prompt": "hi"}, slurm={"mem": "12G"}).warnings
                  if "sample_prompt" in w]
    assert "16.1 GB in bfloat16" in warning and "slurm.mem 12G" in warning
    assert not [w for w in _slurm_plan(train={"sample_prompt": "hi"}, slurm={"mem": "500G"}).warnings
                if "sample_prompt" in w]
    assert not [w for w in _slurm_plan(slurm={"mem": "12G"}).warnings if "sample_prompt" in w]
