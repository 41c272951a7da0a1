"""train.compile: a compiled model trains like the eager one on packed samples kept apart by block masks, with
parameter names unchanged in the export, and a compiled run relaunched from a checkpoint continues with the losses of
an uninterrupted one, at ZeRO-2 and at ZeRO-3. At ZeRO-3 each decoder layer is compiled alone, as a ZeRO-3 leaf
module, and trains like the eager model too. `train.compile: auto` (the default) compiles a run long enough to repay
compiling, without sequence parallelism or experts, on a host with a compiler for the device; the rule is
launcher.planning.compile_choice.

The reference runs are at ZeRO-2: compile wraps the module alone, so ZeRO-0/1/2 run the same compiled forward and
backward, and ZeRO-2 is the stage whose gradient reduction fires from hooks inside that backward. Whether compile is
worth it is measured by bench.throughput (`--ab compiled=train.compile=true`)."""
from __future__ import annotations

import pytest
from safetensors.torch import load_file
from test_autoplan import model_dir, plan_for, run_config

from launcher.contract.config import validate_config
from launcher.contract.errors import ConfigError
from launcher.contract.run_dir import RunDir
from launcher.planning.compile_choice import COMPILE_MIN_STEPS
from launcher.planning.host import FusedAdamStatus, HostFacts
from launcher.planning.plan import build_plan

from conftest import losses, shardtune, tiny_config

STEPS = 6
SAVE_EVERY = 3  # the reference runs' step-3 checkpoints are where the resumed runs start


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model):
    """The ZeRO-2 run of STEPS steps, eager or compiled, launched once for every test that compares with it."""
    runs: dict[bool, tuple[RunDir, str]] = {}

    def get(compile: bool) -> tuple[RunDir, str]:
        if compile not in runs:
            where = tmp_path_factory.mktemp("compiled" if compile else "eager")
            train = {"max_steps": STEPS, "save_every": SAVE_EVERY}  # eager: auto
            if compile:
                train["compile"] = True
            cfg = tiny_config(where, tiny_model, train=train, zero={"stage": 2})
            runs[compile] = RunDir(where / "run"), shardtune("launch", str(cfg)).stderr
        return runs[compile]

    return get


def test_compiled_model_trains_like_the_eager_one(uninterrupted):
    eager, _ = uninterrupted(False)
    compiled, stderr = uninterrupted(True)
    assert "train.compile: the model is compiled" in stderr
    first = compiled.train_metrics()[0]
    assert first["compiled"] is True  # DeepSpeed's engine says so, not our flag
    assert first["data/samples"] > first["data/sequences"], "packed rows: the block-mask path must be exercised"
    assert eager.train_metrics()[0]["compiled"] is False  # train.compile: auto leaves a 6-step run eager
    got, want = losses(compiled.path), losses(eager.path)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in want:  # inductor reorders float sums: equal to float32 rounding, not bit for bit
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
    ours = load_file(next(compiled.final.glob("*.safetensors")))
    theirs = load_file(next(eager.final.glob("*.safetensors")))
    assert sorted(ours) == sorted(theirs)  # no "_orig_mod." prefixes: checkpoints and exports are the eager model's
    for name in theirs:
        assert (ours[name] - theirs[name]).abs().max() < 1e-4, name


def assert_resumed_run_continues(tmp_path, tiny_model, reference: RunDir, compiled: str, train: dict,
                                 zero: dict, env: dict | None = None) -> None:
    """Launch from the uninterrupted run's step-3 checkpoint (`train.resume`): the new run resumes there, compiles
    again (the log says `compiled`), and every later step's loss is the uninterrupted run's. (Stopping a run to
    make that checkpoint is test_checkpoint_resume's subject; the checkpoint is the same.)"""
    cfg = tiny_config(tmp_path, tiny_model, train=train, zero=zero)
    proc = shardtune("launch", str(cfg), f"train.resume={reference.checkpoint(SAVE_EVERY)}", env=env)
    assert f"{reference.checkpoint(SAVE_EVERY).name} at step {SAVE_EVERY}" in proc.stderr and compiled in proc.stderr
    got, want = losses(tmp_path / "run"), losses(reference.path)
    assert sorted(got) == list(range(SAVE_EVERY + 1, STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=0), step


def test_compiled_run_resumed_from_a_checkpoint_continues_exactly(tmp_path, tiny_model, uninterrupted):
    reference, _ = uninterrupted(True)
    assert_resumed_run_continues(tmp_path, tiny_model, reference, "train.compile: the model is compiled",
                                 train={"max_steps": STEPS, "compile": True}, zero={"stage": 2})


ZERO3 = {"train": {"max_steps": STEPS, "compile": True, "activation_checkpointing": True}, "zero": {"stage": 3}}


@pytest.fixture(scope="module")
def compiled_zero3(tmp_path_factory, tiny_model):
    """The compiled ZeRO-3 run (with activation checkpointing) of STEPS steps, with its inductor cache, and stderr."""
    where = tmp_path_factory.mktemp("zero3")
    cache = where / "inductor"
    cfg = tiny_config(where, tiny_model, train={**ZERO3["train"], "save_every": SAVE_EVERY}, zero=ZERO3["zero"])
    proc = shardtune("launch", str(cfg), env={"TORCHINDUCTOR_CACHE_DIR": str(cache)})
    return RunDir(where / "run"), cache, proc.stdout + proc.stderr


def test_compiled_zero3_trains_like_the_eager_model_one_layer_at_a_time(compiled_zero3, uninterrupted):
    """ZeRO-3's gather hooks stay outside the compiled code: each decoder layer is a leaf module and only its
    forward is compiled, here with activation checkpointing (recomputation inside the compiled layer). Inductor must
    really have compiled (its cache, empty before, holds generated kernels), and the losses and the export are the
    eager model's (the eager ZeRO-2 run without checkpointing: the stages compute the same sums, and recomputing
    changes no value)."""
    eager, _ = uninterrupted(False)
    run, cache, output = compiled_zero3
    assert "train.compile: each of the 2 decoder layers is compiled" in output
    assert "activation checkpointing on" in output  # what the plan printed
    assert list(cache.rglob("*.py")), "inductor generated no code: nothing was compiled"
    assert run.train_metrics()[0]["compiled"] is True
    got, want = losses(run.path), losses(eager.path)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
    ours = load_file(next(run.final.glob("*.safetensors")))
    theirs = load_file(next(eager.final.glob("*.safetensors")))
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        assert (ours[name] - theirs[name]).abs().max() < 1e-4, name


def test_compiled_zero3_run_resumed_from_a_checkpoint_continues_exactly(tmp_path, tiny_model, compiled_zero3):
    """Resume at ZeRO-3 with compiled layers: the checkpoint holds the sharded eager parameters (leaf modules change
    how ZeRO-3 gathers, not what it stores), so the resumed run, compiling again, continues with the losses of the
    uninterrupted one. It shares the uninterrupted run's inductor cache, as a relaunched job on the same host would:
    the ZeRO-2 resume shares its reference's through inductor's default directory."""
    reference, cache, _ = compiled_zero3
    assert_resumed_run_continues(tmp_path, tiny_model, reference, "each of the 2 decoder layers is compiled", **ZERO3,
                                 env={"TORCHINDUCTOR_CACHE_DIR": str(cache)})


def test_auto_stage_with_compile_plans_zero3_too(tmp_path):
    """8B on 48 GB devices: ZeRO-3 is the fastest fit, compiled or not (ZeRO-2 needs 53 GB)."""
    model, small = model_dir(tmp_path), {"gpu_memory_gb": 48}
    assert plan_for(tmp_path, model, launch=small).config.zero.stage == 3
    assert plan_for(tmp_path, model, launch=small, train={"compile": True}).config.zero.stage == 3


def test_compile_with_sequence_parallelism_or_experts_is_refused(tmp_path):
    """Neither has been verified compiled: the config says so before a job is queued."""
    with pytest.raises(ConfigError) as info:
        validate_config(run_config(tmp_path, model_dir(tmp_path), train={"compile": True, "sequence_parallel": 2},
                                   zero={"stage": 2}))
    assert any(p.startswith("train.sequence_parallel: 2 with train.compile: true has not been verified")
               and "allowed with compile: 1" in p for p in info.value.problems)
    mixtral = model_dir(tmp_path, "mixtral_8x7b")
    plan_for(tmp_path, mixtral, zero={"stage": 2}, launch={"gpu_memory_gb": 400})  # uncompiled, the plan is made
    with pytest.raises(ConfigError, match="train.compile: true is not allowed for .*mixtral_8x7b, a mixture-of-"):
        plan_for(tmp_path, mixtral, train={"compile": True}, zero={"stage": 2}, launch={"gpu_memory_gb": 400})


GPU_NODE = HostFacts(8, FusedAdamStatus(True, "prebuilt (simulated)"), triton=True)


@pytest.mark.parametrize("train, stage, host, compiled, why", [
    ({"max_steps": COMPILE_MIN_STEPS}, 2, GPU_NODE, True, "repays itself within 200 steps"),
    ({"max_steps": COMPILE_MIN_STEPS - 1}, 2, GPU_NODE, False, "train.max_steps 199 < 200"),
    ({"max_steps": 5000}, 3, GPU_NODE, True, "5000 steps at ZeRO-3"),
    ({"max_steps": 5000, "sequence_parallel": 2}, 2, GPU_NODE, False, "train.sequence_parallel 2"),
    ({"max_steps": 5000}, 2, HostFacts(8, GPU_NODE.fused_adam, triton=False), False, "triton is not installed"),
])
def test_compile_auto_compiles_long_runs_where_compiling_is_verified(tmp_path, train, stage, host, compiled, why):
    plan = build_plan(validate_config(run_config(tmp_path, model_dir(tmp_path), train=train, zero={"stage": stage})),
                      host=host)
    assert plan.config.train.compile is compiled
    (note,) = [n for n in plan.notes if n.startswith("train.compile=auto")]
    assert why in note and note.startswith(f"train.compile=auto -> {str(compiled).lower()}")


def test_compile_auto_leaves_experts_and_cpu_hosts_without_a_compiler_eager(tmp_path):
    moe = run_config(tmp_path, model_dir(tmp_path, "olmoe_1b_7b"), train={"max_steps": 5000}, zero={"stage": 2})
    assert build_plan(validate_config(moe), host=GPU_NODE).config.train.compile is False
    cpu = run_config(tmp_path, model_dir(tmp_path, "smollm2_135m"), train={"max_steps": 5000, "precision": "fp32"},
                     zero={"stage": 2},
                     launch={"device": "cpu", "nodes": 1, "procs_per_node": 2, "rdzv_endpoint": None})
    no_cxx = HostFacts(0, FusedAdamStatus(False, "no nvcc"), cxx=None)
    plan = build_plan(validate_config(cpu), host=no_cxx)
    assert plan.config.train.compile is False and any("no C++ compiler" in n for n in plan.notes)
    assert build_plan(validate_config(cpu), host=HostFacts(0, no_cxx.fused_adam, cxx="/usr/bin/g++")
                      ).config.train.compile is True



def test_a_node_checks_a_gpu_device_by_its_type():
    """The trainer passes its torch.device (cuda:3), which equals no string: GPU nodes were checked for a C++
    compiler instead of triton, so a node without triton passed and failed in inductor at the first step."""
    import torch

    from launcher.planning.host import inductor_problem

    for device in (torch.device("cuda", 3), torch.device("cuda"), "cuda"):
        assert "triton" in inductor_problem(device, cxx="/usr/bin/g++", triton=False)
        assert inductor_problem(device, cxx=None, triton=True) is None
    assert "no C++ compiler" in inductor_problem(torch.device("cpu"), cxx=None, triton=True)
