"""A resumed rank maps its checkpoint files and copies out only what the optimizer keeps (trainer/mapped_loads.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from launcher.planning.memory import Setup, estimate_memory
from launcher.planning.model_size import counts_from_path
from trainer.checkpoint_io import safe_load
from trainer.mapped_loads import COPY_CHUNK, MappedLoads, drop_pages, mapped_files

from test_memory import AS_ASKED, CONFIGS, ROOT, bf16_run_config

RESUME_LOAD = """
import gc, hashlib, json, os, sys
from pathlib import Path
rank, store, work, configs = int(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE="2")
import torch, torch.distributed as dist
from trainer.ops import pin_build_dir
pin_build_dir()
import deepspeed, deepspeed.comm
from trainer.checkpoint_io import Manifests
from trainer.mapped_loads import mapped_files
from trainer.shard_writer import ShardWriter
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
deepspeed.comm.init_distributed(dist_backend="gloo")
def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {key: int(fields[key].split()[0]) * 1024 for key in ("VmRSS", "VmHWM", "RssAnon")}
def engine(ds_config):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(12)])
    return deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds_config)[0], model
def states_digest(engine):
    digest, opt = hashlib.sha256(), engine.optimizer
    while opt is not None:
        if isinstance(opt, torch.optim.Optimizer):
            for state in opt.state.values():
                for key in sorted(state):
                    value = state[key]
                    digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if torch.is_tensor(value)
                                  else repr(value).encode())
        opt = getattr(opt, "optimizer", None)
    return digest.hexdigest()
out = []
for i, ds_config in enumerate(configs):
    trained, model = engine(ds_config)
    for _ in range(ds_config["gradient_accumulation_steps"]):  # one optimizer step: Adam's moments exist
        trained.backward(trained(torch.randn(2, 1024)).pow(2).mean())
        trained.step()
    trained.save_checkpoint(f"{work}/{i}", tag="t")
    dist.barrier()
    ckpt = Path(work) / str(i) / "t"
    del trained, model
    gc.collect()  # an engine's reference cycles: freed now, not during the load measured
    row = {}
    for reader in ("deepspeed", "shardtune"):
        resumed, model = engine(ds_config)  # as a relaunched rank: built, then loaded
        if reader == "shardtune":
            resumed.checkpoint_engine = writer = ShardWriter(resumed._config)
            writer.manifests = Manifests()
            writer.manifests.add(ckpt, {f.name: {"size": f.stat().st_size,
                                                 "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
                                        for f in ckpt.iterdir()})
        gc.collect()
        before = status()
        open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
        resumed.load_checkpoint(f"{work}/{i}", tag="t")
        if reader == "shardtune":
            row["taken"] = writer.mapped.take_states(resumed.optimizer)
        gc.collect()
        after = status()
        row[reader] = {"kept": after["RssAnon"] - before["RssAnon"], "peak_over_kept": after["VmHWM"] - after["VmRSS"],
                       "mapped": mapped_files(Path(work)), "states": states_digest(resumed)}
        row["params"] = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        del resumed, model
        gc.collect()
    out.append(row)
print("RESULT " + json.dumps(out), flush=True)
dist.barrier()
os._exit(0)  # as a rank ends (trainer.distributed.exit_without_teardown): gloo's teardown can abort a clean exit
"""


def test_a_resumed_rank_holds_no_second_copy_of_its_checkpoint(tmp_path):
    """DeepSpeed's own checkpoint engine reads each rank's files whole into host memory: the optimizer partition
    (fp32 master and two moments, 12 bytes per parameter of the rank's share) is all resident before the master is
    copied into place, so a rank peaks 4 bytes per parameter of its share above what it keeps (the moments, which
    torch's Optimizer.load_state_dict keeps as loaded when device and dtype match: offloaded, or on CPU); at
    stage 0 the module file's weights do the same. On an 8-GPU node resuming Llama-3-70B at ZeRO-3 with the
    optimizer offloaded that is 282 GB of host RAM beyond the run's own.

    shardtune's reader maps the files and copies the moments out of them a chunk at a time: measured on two real
    ranks, the same states (bitwise), the same memory kept, a peak at most one chunk above it, and no checkpoint
    file left mapped (the disk space of a checkpoint train.keep_last deletes is freed)."""
    overrides = [("zero.stage=2", "zero.offload_optimizer=cpu"), ("zero.stage=3", "zero.offload_optimizer=cpu"),
                 ("zero.stage=1",), ("zero.stage=0",)]
    from launcher.planning.deepspeed_config import render_deepspeed_config

    configs = [render_deepspeed_config(bf16_run_config(tmp_path, *o, "train.precision=fp32")) for o in overrides]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed memory goes back to the system at once
    ranks = [subprocess.Popen([sys.executable, "-c", RESUME_LOAD, str(rank), str(tmp_path / "store"), str(tmp_path),
                               json.dumps(configs)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=ROOT, env=env) for rank in range(2)]
    outputs = [proc.communicate(timeout=300) for proc in ranks]
    assert all(proc.returncode == 0 for proc in ranks), [err[-3000:] for _, err in outputs]
    for (stage, *_), seen in zip(overrides, json.loads(outputs[0][0].split("RESULT ", 1)[1])):
        # From first principles: fp32, Adam's two moments kept (8 bytes per parameter of the rank's share, the
        # whole model's at stage 0), and 4 more loaded beside them by DeepSpeed (its master copy or weights).
        share = seen["params"] // (1 if stage == "zero.stage=0" else 2)
        ours, theirs = seen["shardtune"], seen["deepspeed"]
        assert ours["states"] == theirs["states"], stage
        assert abs(theirs["kept"] - 8 * share) < 0.03 * 8 * share, (stage, theirs)
        assert abs(ours["kept"] - theirs["kept"]) < 0.01 * theirs["kept"], (stage, ours, theirs)
        assert abs(theirs["peak_over_kept"] - 4 * share) < 0.03 * 4 * share, (stage, theirs)
        assert ours["peak_over_kept"] <= COPY_CHUNK + (1 << 20) < 0.5 * 4 * share, (stage, ours)
        assert seen["taken"] >= 2 and ours["mapped"] == [] == theirs["mapped"], (stage, seen)

    counts = counts_from_path(CONFIGS / "llama3_70b.json")
    node = Setup(stage=3, world_size=8, gpus_per_node=8, dtype="bf16", offload_optimizer=True)
    est = estimate_memory(counts, node, margins=AS_ASKED)
    assert est.host_total == est.host["process_runtime"] + est.host["offloaded_optimizer"]  # resuming adds nothing


def test_memory_of_its_own_is_never_dropped_and_a_mapped_tensor_reads_back_from_its_file(tmp_path):
    """Dropping pages is only safe on a file's private mapping: an untouched page comes back from the file. On memory
    a tensor owns it would zero the data, so a state read into memory (the legacy format, or a file read whole) is
    left alone, and a mapped one still holds its values after its pages are dropped."""
    values = torch.arange(1 << 20, dtype=torch.float32)
    torch.save({"mapped": values}, tmp_path / "zip.pt")
    torch.save({"read": values}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    loads = MappedLoads()
    mapped = loads.add(safe_load(tmp_path / "zip.pt", mmap=True))["mapped"]
    read = loads.add(safe_load(tmp_path / "legacy.pt"))["read"]  # dropping the first file's pages on the way
    assert str((tmp_path / "zip.pt").resolve()) in mapped_files(tmp_path)
    drop_pages(read.data_ptr(), read.nbytes)  # what add() is careful never to do: the proof the care matters
    assert (read == 0).float().mean() > 0.99  # all but the partial pages at either end
    read = safe_load(tmp_path / "legacy.pt")["read"]
    loads.add({"read": read})
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))])
    optimizer.state[optimizer.param_groups[0]["params"][0]] = {"mapped": mapped, "read": read}
    assert loads.take_states(optimizer) == 1
    state = next(iter(optimizer.state.values()))
    assert state["read"] is read and torch.equal(read, values) and torch.equal(state["mapped"], values)
    assert state["mapped"].untyped_storage().data_ptr() != mapped.untyped_storage().data_ptr()
    del mapped, state, optimizer
    assert mapped_files(tmp_path) == []
