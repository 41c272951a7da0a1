"""What a first run on NVIDIA GPUs would hit, tested on a machine without one.

Each test drives the code path a GPU run takes with the parts that exist here: transformers' own
flash-attention helpers and a CPU attention kernel with flash-attention's variable-length semantics,
DeepSpeed's own loss scaler, the real planner and renderers. Where a GPU fact is simulated (a missing
CUDA compiler, a device name), the test's name says so.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from launcher.contract.config import apply_overrides, validate_config
from launcher.contract.errors import ConfigError
from launcher.contract.run_dir import NCCL_TRACES
from launcher.planning.host import FusedAdamStatus, HostFacts, visible_gpus
from launcher.planning.plan import build_plan
from trainer.data.collate import IGNORE, collate
from trainer.data.packing import build_packed
from trainer.nonfinite import SkipJudge
from trainer.ops import ops_needed

from conftest import shardtune, tiny_config

GPU_NODE = HostFacts(visible_gpus=8, fused_adam=FusedAdamStatus(True, "prebuilt (simulated)"), slurm_node_cpus=96)
NO_COMPILER = HostFacts(visible_gpus=8, fused_adam=FusedAdamStatus(False, "no nvcc (simulated)"))
CPU_LOGIN_NODE = HostFacts(visible_gpus=0, fused_adam=FusedAdamStatus(False, "no nvcc"))


def run_config(*overrides: str, backend: str = "torchrun", nodes: int = 1, procs: int = 8):
    raw = {"model": {"name_or_path": "/models/m"}, "data": {"path": "/d.jsonl", "format": "messages", "seq_len": 512},
           "train": {"max_steps": 5, "grad_accum_steps": 4, "lr": 1e-5, "seed": 0},
           "launch": {"backend": backend, "nodes": nodes, "procs_per_node": procs},
           "slurm": {"partition": "gpu"}, "output_dir": "/scratch/run"}
    return validate_config(apply_overrides(raw, list(overrides)))


# ---- 1. flash-attention-2 keeps packed samples apart at any micro batch size


def _reference_varlen_attention(module, query, key, value, attention_mask, cu_seq_lens_q=None, cu_seq_lens_k=None,
                                max_length_q=None, max_length_k=None, scaling=None, dropout=0.0, **kwargs):
    """flash_attn_varlen_func's semantics on CPU: causal attention inside each cu_seqlens segment of the
    batch flattened row by row, written independently of shardtune with PyTorch's sdpa."""
    assert attention_mask is None and cu_seq_lens_q is not None and torch.equal(cu_seq_lens_q, cu_seq_lens_k)
    b, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    q = query.transpose(1, 2).reshape(b * length, heads, dim)
    k = key.transpose(1, 2).reshape(b * length, kv_heads, dim)
    v = value.transpose(1, 2).reshape(b * length, kv_heads, dim)
    out = torch.empty_like(q)
    bounds = cu_seq_lens_q.tolist()
    assert max_length_q == max(e - a for a, e in zip(bounds[:-1], bounds[1:]))
    for a, e in zip(bounds[:-1], bounds[1:]):
        ks = k[a:e].transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
        vs = v[a:e].transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
        out[a:e] = F.scaled_dot_product_attention(q[a:e].transpose(0, 1), ks, vs, is_causal=True,
                                                  scale=scaling).transpose(0, 1)
    return out.reshape(b, length, heads, dim), None


@pytest.fixture(scope="module")
def varlen_model():
    from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register("reference_varlen", _reference_varlen_attention)
    # The model builds its mask the way it does for flash_attention_2 (none, when nothing is padded).
    ALL_MASK_ATTENTION_FUNCTIONS.register("reference_varlen", ALL_MASK_ATTENTION_FUNCTIONS["flash_attention_2"])
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=101)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.config._attn_implementation = "reference_varlen"
    return model


def test_flash_attention_inputs_keep_every_packed_sample_apart_at_micro_batch_3(varlen_model):
    from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids

    rng = np.random.default_rng(0)
    lengths = [5, 7, 3, 9, 4, 11, 6]
    samples = [rng.integers(1, 101, n).astype(np.int32) for n in lengths]
    groups = [[0, 1, 2], [3, 4], [5, 6]]  # three rows of packed samples, padded to a common width
    packed = build_packed(samples, samples, groups)
    batch = collate(packed, np.arange(3), pad_id=0, separation="varlen")
    assert batch.attention_mask is None and batch.input_ids.shape == (3, 24)

    # The defect: with more than one row, transformers does not treat position ids as packing at all.
    assert not _is_packed_sequence(batch.position_ids, batch_size=3)
    # What the collator passes instead equals transformers' own derivation over the flattened batch, and
    # cuts exactly at every sample and every row's padding.
    (cu_q, cu_k), (max_q, _) = prepare_fa_kwargs_from_position_ids(batch.position_ids.reshape(1, -1))
    assert torch.equal(batch.varlen["cu_seq_lens_q"], cu_q) and torch.equal(batch.varlen["cu_seq_lens_k"], cu_k)
    assert batch.varlen["max_length_q"] == int(max_q) == 11
    expected, at = [0], 0
    for g in groups:
        for s in g:
            at += lengths[s]
            expected.append(at)
        pad = 24 - sum(lengths[s] for s in g)
        if pad:
            at += pad
            expected.append(at)
    assert batch.varlen["cu_seq_lens_q"].tolist() == expected

    # Through the whole model: per-token losses of every packed sample equal the sample run alone.
    with torch.no_grad():
        logits = varlen_model(**batch.model_inputs()).logits
    losses = F.cross_entropy(logits.transpose(1, 2), batch.targets, ignore_index=IGNORE, reduction="none")
    varlen_model.config._attn_implementation = "sdpa"
    try:
        for row, g in enumerate(groups):
            start = 0
            for s in g:
                ids = torch.tensor(samples[s], dtype=torch.long)[None]
                with torch.no_grad():
                    alone = varlen_model(input_ids=ids).logits[0]
                ref = F.cross_entropy(alone[:-1], ids[0, 1:], reduction="none")
                got = losses[row, start:start + lengths[s] - 1]
                torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
                assert batch.targets[row, start + lengths[s] - 1] == IGNORE  # no prediction across samples
                start += lengths[s]
    finally:
        varlen_model.config._attn_implementation = "reference_varlen"


# ---- 2. the optimizer falls back when FusedAdam cannot be built


def test_a_cpu_build_of_fused_adam_is_not_taken_for_a_cuda_one_simulated_no_compiler(tmp_path, monkeypatch):
    """`make install` builds DeepSpeed's CPU FusedAdam on a machine without GPUs (and any CPU run does), into this
    environment's build folder: no kernel for a CUDA run planned from this host. A CUDA build in torch's shared
    default folder (py<version>_cu128) or in another environment's folder is no use either: the ranks load from
    this environment's. One in this environment's folder for another kind of machine (a GPU node, planned from a
    login node) is. (This VM has a CUDA toolkit, which would make the op buildable anyway: the compiler is taken
    away.) Where a rank's torch puts a build is read from torch itself (`_get_build_directory`) after the rank's
    setting."""
    from torch.utils.cpp_extension import _get_build_directory

    from launcher.planning import host

    monkeypatch.setattr(host, "nvcc_path", lambda: None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(host.extensions_dir()))  # what trainer.ops.pin_build_dir sets
    build = Path(_get_build_directory("fused_adam", verbose=False))  # torch makes the directory
    assert build.parent.parent == tmp_path / "cache" / "torch_extensions"
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")  # `shardtune plan` on a login node
    (build / "fused_adam.so").write_bytes(b"")
    assert not host.fused_adam_status().usable
    shared = tmp_path / "cache" / "torch_extensions" / f"py{sys.version_info.major}{sys.version_info.minor}_cu128"
    (shared / "fused_adam").mkdir(parents=True)
    for name in ("fused_adam.so", "multi_tensor_adam.cuda.o"):
        (shared / "fused_adam" / name).write_bytes(b"")
    assert not host.fused_adam_status().usable
    environment, _machine = build.parent.name.rsplit("-", 1)
    other = environment[:-1] + ("1" if environment.endswith("0") else "0")  # another venv's key: differs in its last
    for folder in (f"{other}-0123abcd", f"{environment}-0123abcd"):  # another venv's; a GPU node's
        cuda_build = build.parent.parent / folder / "fused_adam"
        cuda_build.mkdir(parents=True)
        for name in ("fused_adam.so", "multi_tensor_adam.cuda.o"):
            (cuda_build / name).write_bytes(b"")
        usable = host.fused_adam_status()
        assert usable.usable is (folder.startswith(environment)), folder
    assert str(cuda_build) in usable.reason


def test_a_cuda_build_of_fused_adam_in_torch_extensions_dir_is_found_simulated_no_compiler(tmp_path, monkeypatch):
    """With $TORCH_EXTENSIONS_DIR set torch builds straight into $TORCH_EXTENSIONS_DIR/fused_adam, with no
    py*_cu* folder to tell a CUDA build: its object compiled from the .cu source (multi_tensor_adam.cuda.o) does.
    A node whose op was prebuilt there was refused as having no FusedAdam."""
    from torch.utils.cpp_extension import _get_build_directory

    from launcher.planning import host

    monkeypatch.setattr(host, "nvcc_path", lambda: None)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    build = Path(_get_build_directory("fused_adam", verbose=False))
    assert build == tmp_path / "ext" / "fused_adam"
    for name in ("fused_adam.so", "fused_adam_frontend.o"):
        (build / name).write_bytes(b"")
    assert not host.fused_adam_status().usable  # a CPU build
    (build / "multi_tensor_adam.cuda.o").write_bytes(b"")
    assert host.fused_adam_status().usable and str(build) in host.fused_adam_status().reason


def test_fused_adam_that_cannot_be_built_falls_back_to_torch_fused_adamw_simulated_no_compiler():
    plan = build_plan(run_config("launch.device=cuda"), host=NO_COMPILER)
    params = plan.deepspeed["optimizer"]["params"]
    assert params["torch_adam"] is True and params["fused"] is True
    assert any("train.optimizer=auto -> torch" in n and "no nvcc" in n for n in plan.notes)
    plan = build_plan(run_config("launch.device=cuda"), host=GPU_NODE)
    params = plan.deepspeed["optimizer"]["params"]
    assert params["torch_adam"] is False and "fused" not in params
    assert ops_needed(plan.deepspeed, "cuda") == ["fused_adam"]
    offload = build_plan(run_config("launch.device=cuda", "zero.offload_optimizer=cpu"), host=NO_COMPILER)
    assert ops_needed(offload.deepspeed, "cuda") == ["cpu_adam"]  # DeepSpeedCPUAdam steps on the host


def test_preflight_refuses_a_node_that_cannot_build_its_op_simulated(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model)
    proc = shardtune("preflight", str(cfg), env={"SHARDTUNE_FAULTS": "unbuildable_op@0:1=fused_adam"}, check=False)
    assert proc.returncode != 0
    assert "rank 1 on" in proc.stderr and "cannot load a compiled op the run needs: fused_adam" in proc.stderr


# ---- 5, 6, 8. resources, devices and gradient accumulation, decided before anything runs


def test_bf16_with_accumulation_accumulates_in_fp32():
    plan = build_plan(run_config("launch.device=cuda"), host=GPU_NODE)
    assert plan.config.train.precision == "bf16"
    assert plan.deepspeed["data_types"]["grad_accum_dtype"] == "fp32"
    single = build_plan(run_config("launch.device=cuda", "train.grad_accum_steps=1"), host=GPU_NODE)
    assert "data_types" not in single.deepspeed  # nothing accumulates
    fp32 = build_plan(run_config("launch.device=cpu", "launch.procs_per_node=2"), host=CPU_LOGIN_NODE)
    assert "data_types" not in fp32.deepspeed
    stage0 = build_plan(run_config("launch.device=cuda", "zero.stage=0"), host=GPU_NODE)
    assert "data_types" not in stage0.deepspeed  # DeepSpeed refuses fp32 accumulation without ZeRO: say so
    assert any(w.startswith("zero.stage 0 in bf16 accumulates gradients in bf16") for w in stage0.warnings)


def test_multi_node_torchrun_planned_on_a_gpu_less_machine_is_refused_not_rendered_for_cpu():
    with pytest.raises(ConfigError, match="launch.device: 'auto' cannot be decided for a 2-node torchrun run"):
        build_plan(run_config(nodes=2, procs=8), host=CPU_LOGIN_NODE)
    plan = build_plan(run_config("launch.device=cuda", nodes=2, procs=8), host=CPU_LOGIN_NODE)
    assert plan.config.train.precision == "bf16" and "DS_ACCELERATOR=cuda" in plan.script


def test_visible_gpus_honour_cuda_visible_devices():
    assert visible_gpus({}, driver_count=8) == 8
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1"}, driver_count=8) == 2
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, driver_count=8) == 0
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}, driver_count=8) == 0
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,-1,1"}, driver_count=8) == 1  # CUDA stops at an invalid entry
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-5f1d,GPU-77aa"}, driver_count=8) == 2
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1,2"}, driver_count=0) == 0
    with pytest.raises(ConfigError, match="2 visible GPUs"):
        build_plan(run_config("launch.device=cuda", procs=4), host=HostFacts(2, GPU_NODE.fused_adam))


def test_sbatch_asks_for_cpus_and_memory_and_srun_passes_cpus_on():
    script = build_plan(run_config(backend="slurm", nodes=2), host=GPU_NODE).script
    assert "#SBATCH --cpus-per-task=96" in script and "#SBATCH --mem=0" in script
    assert '--cpus-per-task="$SLURM_CPUS_PER_TASK"' in script[script.index("srun "):]
    assert "--wait=" not in script  # no time limit on ranks that are still working
    no_sinfo = build_plan(run_config(backend="slurm", nodes=2), host=NO_COMPILER)
    assert "#SBATCH --cpus-per-task=64" in no_sinfo.script  # 8 per process when SLURM cannot say
    assert any("slurm.cpus_per_task=auto -> 64" in n for n in no_sinfo.notes)
    own = build_plan(run_config("slurm.cpus_per_task=32", "slurm.mem=400G", backend="slurm"), host=GPU_NODE).script
    assert "#SBATCH --cpus-per-task=32" in own and "#SBATCH --mem=400G" in own
    # The flight recorder records only with a buffer, and dumps where every node's file can be read later
    # (torch >= 2.7 names, as installed here).
    assert f'TORCH_FR_DUMP_TEMP_FILE="${{TORCH_FR_DUMP_TEMP_FILE:-$RUN_DIR/{NCCL_TRACES}/rank_}}"' in script
    assert 'TORCH_FR_BUFFER_SIZE="${TORCH_FR_BUFFER_SIZE:-2000}"' in script


def test_an_offloaded_optimizer_steps_on_the_cpus_each_rank_gets():
    """DeepSpeed's CPU Adam runs OpenMP threads; the default OMP_NUM_THREADS=1 stepped each rank's partition on one
    core of a 96-CPU node. The user's own setting still wins (launch.env, or the job's environment on SLURM)."""
    offload = ("launch.device=cuda", "zero.stage=3", "zero.offload_optimizer=cpu", "slurm.cpus_per_task=96")
    script = build_plan(run_config(*offload, backend="slurm"), host=GPU_NODE).script
    assert 'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-12}"' in script
    plain = build_plan(run_config("launch.device=cuda", "zero.stage=3", backend="slurm"), host=GPU_NODE).script
    assert 'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"' in plain
    own = build_plan(run_config(*offload, "launch.env={OMP_NUM_THREADS: '4'}", backend="slurm"), host=GPU_NODE).script
    assert "export OMP_NUM_THREADS=4" in own and "OMP_NUM_THREADS:-12" not in own
    local = build_plan(run_config(*offload[:3], procs=1), host=GPU_NODE).script
    assert f"export OMP_NUM_THREADS={len(os.sched_getaffinity(0))}" in local


def test_flash_attention_is_refused_where_it_cannot_run():
    with pytest.raises(ConfigError,
                       match="flash_attention_2' runs only on CUDA GPUs in bf16 or fp16, not cuda in fp32"):
        build_plan(run_config("launch.device=cuda", "train.precision=fp32",
                              "model.attn_implementation=flash_attention_2"),
                   host=GPU_NODE)



def test_fp16_is_refused_off_cuda_before_launch():
    """DeepSpeed's CPU accelerator has no fp16: the run used to fail at engine start-up on every rank."""
    with pytest.raises(ConfigError, match="train.precision: 'fp16' trains only on CUDA GPUs .* not cpu"):
        build_plan(run_config("launch.device=cpu", "train.precision=fp16"), host=CPU_LOGIN_NODE)
    assert build_plan(run_config("launch.device=cuda", "train.precision=fp16"), host=GPU_NODE).deepspeed["fp16"]


def test_auto_attention_picks_flash_attention_2_only_for_model_classes_that_run_it():
    """transformers raises for Llama 4 and DeepSeek-V3.2 with flash_attention_2 and reroutes gpt-oss to a hub kernel
    (a download, Hopper only): `auto` checked only the GPU, the dtype and the flash_attn package."""
    from transformers import DeepseekV32ForCausalLM, GptOssForCausalLM, Llama4ForCausalLM, LlamaForCausalLM

    from trainer.model import flash_attention_2_supported

    assert flash_attention_2_supported(LlamaForCausalLM)
    assert not any(map(flash_attention_2_supported, (GptOssForCausalLM, Llama4ForCausalLM, DeepseekV32ForCausalLM)))
    assert not flash_attention_2_supported(None)  # remote code: not assumed

# ---- 4. fp16 loss-scale skips are not bad steps


@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory):
    """DeepSpeed's loss scaler asks the process group for its rank when it logs an overflow."""
    import deepspeed.comm as ds_dist
    import torch.distributed as dist

    from launcher.planning.host import extensions_dir

    with pytest.MonkeyPatch.context() as env:
        env.setenv("TORCH_EXTENSIONS_DIR", str(extensions_dir()))  # the comm op make install built, as a rank would
        if not dist.is_initialized():
            store = tmp_path_factory.mktemp("pg") / "store"
            dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        ds_dist.init_distributed(dist_backend="gloo")
    yield
    dist.destroy_process_group()


def test_fp16_loss_scale_skips_do_not_count_as_bad_steps(one_rank_group):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    from trainer.data.sampler import DataPosition
    from trainer.loop import TrainState

    # The fp16 section the launcher renders: initial scale 2^16, hysteresis 2, minimum 1.
    scaler = DynamicLossScaler(init_scale=2 ** 16, scale_window=1000, min_scale=1, delayed_shift=2,
                               consecutive_hysteresis=False, raise_error_at_min_scale=False)
    judge, state = SkipJudge(scaler), TrainState()
    outcomes = []
    for _ in range(6):  # six overflows in a row at start-up: more than train.max_bad_steps (3)
        judge.before_step()
        scaler.update_scale(True)  # what DeepSpeed's fp16 optimizer does on an overflow
        outcomes.append(judge.judge(skipped=True, loss_finite=True))
        state.advance(DataPosition(), 10, 1, outcomes[-1])
    assert outcomes == ["loss_scale"] * 6 and scaler.cur_scale == 2 ** 11  # hysteresis 2, then halving
    assert state.bad_streak == 0 and state.skipped_steps == 0 and state.loss_scale_skips == 6
    judge.before_step()
    scaler.update_scale(False)
    assert judge.judge(skipped=False, loss_finite=True) == "ok"
    judge.before_step()
    scaler.update_scale(True)
    assert judge.judge(skipped=True, loss_finite=False) == "bad"  # a NaN loss is no overflow a scale can fix
    scaler.cur_scale, scaler.cur_hysteresis = 1, 1
    judge.before_step()
    scaler.update_scale(True)
    assert judge.judge(skipped=True, loss_finite=True) == "bad"  # at the minimum scale nothing absorbs it
    assert SkipJudge(None).judge(skipped=True, loss_finite=True) == "bad"  # bf16 / fp32: every skip is bad


def test_fp16_optimizer_shards_load_without_running_code_built_without_a_gpu(tmp_path):
    """fp16 (CUDA only) pickles DeepSpeed's DynamicLossScaler into every optimizer shard; the safe loader refused
    it, so an fp16 run could never resume, export or convert. Built here as ZeRO builds it from the fp16 section
    the launcher renders (loss_scale 0: dynamic), saved with torch.save, and read back through the loader."""
    import hashlib

    import torch
    from deepspeed.runtime.fp16.loss_scaler import CreateLossScaler, DynamicLossScaler
    from deepspeed.runtime.precision_config import get_float16_config
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from launcher.contract.config import validate_config
    from launcher.planning.plan import build_plan
    from trainer.checkpoint_io import load_verified

    raw = {"model": {"name_or_path": "/m"}, "data": {"path": "/d.jsonl", "format": "messages", "seq_len": 64},
           "train": {"max_steps": 5, "lr": 1e-4, "seed": 0, "precision": "fp16", "grad_accum_steps": 1},
           "zero": {"stage": 2},
           "launch": {"device": "cuda", "nodes": 1, "procs_per_node": 2}, "output_dir": str(tmp_path / "run")}
    fp16 = get_float16_config(build_plan(validate_config(raw), host=GPU_NODE).deepspeed)
    assert fp16.enabled and fp16.loss_scale == 0
    scaler = CreateLossScaler(torch.float16, 0, True, fp16.dynamic_loss_scale_args())
    assert isinstance(scaler, DynamicLossScaler)
    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"loss_scaler": scaler, "dynamic_loss_scale": True, "zero_stage": ZeroStageEnum.gradients}, path)
    data = path.read_bytes()
    state = load_verified(path, (len(data), hashlib.sha256(data).hexdigest()))
    assert vars(state["loss_scaler"]) == vars(scaler) and state["zero_stage"] == ZeroStageEnum.gradients
