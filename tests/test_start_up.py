"""What a rank spends before its first step: work DeepSpeed would do that the run never uses is skipped."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from trainer.ops import MUON_MODULES

REPO = Path(__file__).resolve().parents[1]

# One process trains the same tiny Llama under the three DeepSpeed optimizers that ask whether the optimizer is
# Muon (bf16 at ZeRO-1 with fp32 accumulation: BF16_Optimizer; ZeRO-2: stage_1_and_2, which asks at every
# gradient reduction; ZeRO-3: stage3), with or without trainer.ops.skip_unused_muon before each initialize, and
# prints its losses and final weights.
ENGINES = textwrap.dedent("""
    import json, os, sys
    os.environ.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1")
    import torch, deepspeed, deepspeed.comm
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM
    from trainer.ops import pin_build_dir, skip_unused_muon

    spared, store = sys.argv[1] == "spared", sys.argv[2]
    pin_build_dir()  # the comm op the group loads: from make install's build, as a rank would
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    deepspeed.comm.init_distributed(dist_backend="gloo")
    out = {}
    for name, zero, bf16 in (("bf16 zero-1", 1, True), ("zero-2", 2, False), ("zero-3", 3, False)):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
        ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                     "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
                     "zero_optimization": {"stage": zero}, "bf16": {"enabled": bf16},
                     "data_types": {"grad_accum_dtype": "fp32"} if bf16 else {}}
        if spared:
            assert skip_unused_muon(ds_config) or name != "bf16 zero-1"
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
        ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
        losses = []
        for _ in range(3):
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            weights = float(sum(p.double().sum() for p in engine.module.parameters()))
        out[name] = {"losses": losses, "weights": weights, "optimizer": type(engine.optimizer).__name__}
    out["muon compiled"] = hasattr(sys.modules.get("deepspeed.runtime.zero.muon.original_muon"), "__file__")
    print("RESULT " + json.dumps(out))
""")


def train_engines(tmp_path: Path, spared: bool) -> dict:
    proc = subprocess.run([sys.executable, "-c", ENGINES, "spared" if spared else "real",
                           str(tmp_path / f"store-{spared}")], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.split("RESULT ", 1)[1])


def test_a_run_spared_deepspeeds_muon_import_trains_bitwise_like_one_that_imports_it(tmp_path):
    """DeepSpeed imports its Muon optimizer to ask whether the run's optimizer is one, and Muon's update at every
    ZeRO-1/2 gradient reduction; the import wraps the update in torch.compile, which imports inductor (~1.7 s of
    CPU per rank at every start). The spared process must not import it, and must train exactly as the process
    where DeepSpeed imports the real modules."""
    spared, real = train_engines(tmp_path, True), train_engines(tmp_path, False)
    assert real.pop("muon compiled") is True, "DeepSpeed no longer imports Muon here: skip_unused_muon can go"
    assert spared.pop("muon compiled") is False
    assert [v["optimizer"] for v in real.values()] == ["BF16_Optimizer", "DeepSpeedZeroOptimizer",
                                                       "DeepSpeedZeroOptimizer_Stage3"]
    assert spared == real
    assert all(v["losses"][-1] < v["losses"][0] for v in real.values()), real


def test_a_config_that_trains_with_muon_gets_the_real_modules():
    """In a fresh process (a test process may have imported the real modules already, which also leaves them)."""
    script = textwrap.dedent(f"""
        import sys
        from trainer.ops import skip_unused_muon
        names = {MUON_MODULES!r}
        assert skip_unused_muon({{"optimizer": {{"type": "Muon", "params": {{"lr": 1e-3}}}}}}) is False
        assert not any(name in sys.modules for name in names), "a Muon config got stand-ins"
        assert skip_unused_muon({{"optimizer": {{"type": "AdamW"}}}}) is True
        assert all(not hasattr(sys.modules[name], "__file__") for name in names)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
