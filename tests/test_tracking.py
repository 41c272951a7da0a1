"""Observability: metrics.jsonl and the wandb run agree, one run per job, no secrets on disk, honest FLOPs."""
from __future__ import annotations

import os
import struct

import pytest
import torch

from launcher.contract.run_dir import RunDir
from trainer.flops import ModelFlops, model_flops_of, peak_tflops

from conftest import read_metrics, shardtune, tiny_config
from wandb_reader import find_runs, read_history_for_id

SENTINEL = "sentinel-key-0123456789abcdef0123456789abcdef"


def wandb_history(run_dir, run_id) -> dict[int, dict]:
    history = {}
    for row in read_history_for_id(run_dir / "wandb", run_id):  # later attempts replace rolled-back steps
        history[row["_step"]] = row
    return history


def assert_history_matches(history: dict, rows: list[dict]) -> None:
    for row in rows:
        for key in ("loss", "lr", "grad_norm", "tokens_per_sec", "tflops_per_device", "mem_host_rss_gb"):
            assert history[row["step"]][key] == pytest.approx(row[key], rel=1e-12), (row["step"], key)


def test_one_wandb_run_whose_history_equals_metrics_and_no_key_on_disk(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model, train={"max_steps": 10}, wandb={"mode": "offline", "tags": ["ci"]})
    shardtune("launch", str(cfg), env={"WANDB_API_KEY": SENTINEL})
    run = tmp_path / "run"
    runs = find_runs(run / "wandb")
    assert len(runs) == 1, runs
    run_id = RunDir(run).read_wandb_id()
    assert runs[0].name.endswith(run_id)
    metrics = RunDir(run).train_metrics()  # the last save's measurements follow on a row of their own
    assert [r["step"] for r in metrics] == list(range(1, 11))
    assert_history_matches(wandb_history(run, run_id), metrics)
    leaked = [p for p in run.rglob("*") if p.is_file() and SENTINEL.encode() in p.read_bytes()]
    assert not leaked, f"the API key was written to {leaked}"


def test_crash_and_relaunch_continue_the_same_wandb_run(tmp_path, tiny_model):
    """Rank 0 holds the wandb run and crashes: one rank is the whole story."""
    cfg = tiny_config(tmp_path, tiny_model, train={"max_steps": 10, "save_every": 4}, wandb={"mode": "offline"},
                      launch={"procs_per_node": 1})
    failed = shardtune("launch", str(cfg), env={"SHARDTUNE_FAULTS": "crash@7:0"}, check=False)
    assert failed.returncode != 0
    run = tmp_path / "run"
    run_id = RunDir(run).read_wandb_id()
    shardtune("launch", str(cfg))
    assert RunDir(run).read_wandb_id() == run_id, "the relaunch started a new wandb run"
    runs = find_runs(run / "wandb")
    assert len(runs) == 2 and all(p.name.endswith(run_id) for p in runs), runs  # one run, one directory per attempt
    resumed = [r for r in RunDir(run).train_metrics() if r["step"] > 4]
    assert [r["step"] for r in resumed] == list(range(5, 11))
    assert_history_matches(wandb_history(run, run_id), resumed)


def test_throughput_times_step_time_is_the_step_tokens(tmp_path, tiny_model):
    shardtune("launch", str(tiny_config(tmp_path, tiny_model, train={"max_steps": 6}, launch={"peak_tflops": None})))
    rows = RunDir(tmp_path / "run").train_metrics()  # not the last save's measurements, logged on a row of their own
    previous = 0
    for r in rows:
        step_tokens = r["trained_tokens"] - previous
        previous = r["trained_tokens"]
        assert r["tokens_per_sec"] * r["step_time"] == pytest.approx(step_tokens, rel=1e-9)
        assert r["tokens_per_sec_per_device"] == pytest.approx(r["tokens_per_sec"] / 2)
        assert r["total_tokens_per_sec"] >= r["tokens_per_sec"] > 0 and r["samples_per_sec"] > 0
        assert r["rank_time_min"] <= r["rank_time_max"] and r["slowest_rank"] in (0, 1)
        assert 0 < r["mfu"] < 1 and r["hfu"] == r["mfu"]  # on CPU the peak is probed; no recomputation here
    assert rows[0]["data/rows_read"] == 400 and rows[0]["data/packing_efficiency"] > 0.9
    # When each step ended (the benchmarks time steps with it): a step's row is logged after its step time, and the
    # last step's end is not the end of the final save, whose measurements are merged into that step's row.
    ends = RunDir(tmp_path / "run").step_end_times()
    assert len(ends) == 6 and all(b - a >= r["step_time"] for a, b, r in zip(ends, ends[1:], rows[1:]))
    assert rows[-1]["time"] >= ends[-1] + rows[-1]["save_seconds"], "the final save's row merges into step 6"


def test_flops_formula_matches_a_hand_computation():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    flops = model_flops_of(model, config)
    # per layer: q 64·64 + k 64·32 + v 64·32 + o 64·64 + MLP 3·64·128 + 2 norms·64 = 36,992
    per_layer = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64
    assert flops == ModelFlops(matmul_params=2 * per_layer + 64 + 512 * 64, layers=2, attention_width=64)
    model_flops, hardware = flops.step(tokens=30, sum_sq_lengths=10 ** 2 + 20 ** 2)
    assert model_flops == 6 * 106_816 * 30 + 6 * 2 * 64 * 500 == 19_610_880
    assert flops.step(30, 500, recompute=True)[1] == pytest.approx(model_flops * 8 / 6)
    config.tie_word_embeddings = True
    with torch.device("meta"):
        tied = LlamaForCausalLM(config)
    assert model_flops_of(tied, config).matmul_params == flops.matmul_params, "a tied LM head still computes"


def hand_model_flops(config: dict, tokens: int, square_lengths: int) -> float:
    """A Llama's training FLOPs from its config.json, written out apart from trainer/flops.py: 2 FLOPs forward and
    4 backward per weight a token meets (all parameters but the input embedding, a lookup), plus causal
    attention's QK^T and AV, 6 · heads · head_dim · n² per layer for a sample of n tokens (half of 12 · w · n²)."""
    h, heads, kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    d, layers = h // heads, config["num_hidden_layers"]
    per_layer = h * heads * d + 2 * h * kv * d + heads * d * h + 3 * h * config["intermediate_size"] + 2 * h
    weights = layers * per_layer + h + config["vocab_size"] * h  # layers, final norm, LM head
    return 6 * weights * tokens + 6 * layers * heads * d * square_lengths


def test_cpu_mfu_is_probed_reported_and_equals_flops_counted_by_hand(tmp_path, tiny_model):
    """No data sheet has a CPU's peak: every rank probes it in preflight (logged, in preflight.json and the first
    metrics row), and each row's mfu is hand-counted FLOPs / its step time / world / that peak."""
    import json

    seq_len, words = 64, "the cat sat on a mat by the river and the dog ran to the red house".split()
    rows = tmp_path / "long.jsonl"
    rows.write_text("".join(json.dumps({"text": " ".join(words[(i + k) % len(words)] for k in range(120))}) + "\n"
                            for i in range(64)))
    cfg = tiny_config(tmp_path, tiny_model, train={"max_steps": 4, "log_every": 1}, launch={"peak_tflops": None},
                      data={"path": str(rows), "format": "text", "seq_len": seq_len, "truncation": "truncate"})
    proc = shardtune("launch", str(cfg))
    run = RunDir(tmp_path / "run")
    peak = json.loads(run.preflight_file.read_text())["peak"]
    assert peak["source"] == "probe" and len(peak["per_rank"]) == 2 and all(p > 0 for p in peak["per_rank"])
    assert min(peak["per_rank"]) <= peak["tflops"] <= max(peak["per_rank"])
    assert "matmul probe" in proc.stderr and "GFLOP/s per device" in proc.stderr
    metrics = run.train_metrics()
    assert metrics[0]["peak_tflops"] == peak["tflops"] and metrics[0]["peak_tflops_source"] == "probe"
    model_config = json.loads((tiny_model / "config.json").read_text())
    global_batch = 2 * 2 * 2  # micro 2 × accumulation 2 × 2 ranks; every sequence one sample of seq_len tokens
    for r in metrics:
        assert r["trained_tokens"] - (r["step"] - 1) * global_batch * (seq_len - 1) == global_batch * (seq_len - 1)
        flops = hand_model_flops(model_config, global_batch * seq_len, global_batch * seq_len ** 2)
        assert r["mfu"] == pytest.approx(flops / r["step_time"] / 2 / 1e12 / peak["tflops"], rel=1e-9)
        assert 0 < r["mfu"] < 1


def test_peak_table_and_override():
    # Data sheets quote bf16 with sparsity (H100 SXM 1,979, PCIe 1,513, NVL 1,671, L40 362.1, L4 242); dense is half.
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16", None) == 989.5
    assert peak_tflops("NVIDIA H100 PCIe", "bf16", None) == 756.5
    assert peak_tflops("NVIDIA H100 NVL", "bf16", None) == 835.5
    assert peak_tflops("NVIDIA H800", "bf16", None) == 989.5
    assert peak_tflops("NVIDIA L40", "bf16", None) == 181.05
    assert peak_tflops("NVIDIA L4", "bf16", None) == 121.0
    assert peak_tflops("NVIDIA L40S", "bf16", None) == 362.05
    assert peak_tflops("NVIDIA GeForce RTX 4090", "bf16", None) is None  # not in the table: no guess
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "fp32", None) == 19.5
    assert peak_tflops("cpu", "fp32", None) is None
    assert peak_tflops("cpu", "fp32", 1.5) == 1.5


def test_secrets_in_launch_env_are_refused(tmp_path, tiny_model):
    proc = shardtune("plan", str(tiny_config(tmp_path, tiny_model)), "launch.env={WANDB_API_KEY: x}", check=False)
    assert proc.returncode == 2 and "launch.env.WANDB_API_KEY: the name says it holds a secret" in proc.stderr


def test_report_writes_readable_pngs(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model, train={"max_steps": 8, "eval_every": 4}, launch={"procs_per_node": 1},
                      data={"eval_path": str(tiny_config.__globals__["EXAMPLES"] / "data" / "tiny_chat_eval.jsonl")})
    shardtune("launch", str(cfg))
    out = shardtune("report", str(tmp_path / "run")).stdout
    assert "== run summary ==" in out and "steps            8" in out
    for name in ("loss", "lr", "throughput", "memory"):
        png = tmp_path / "run" / f"report_{name}.png"
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", data[16:24])
        assert (width, height) == (700, 400) and len(data) > 10_000, name
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows if "eval_loss" in r] == [4, 8]  # the final eval merges into step 8's row


def test_wandb_failure_never_stops_training(tmp_path, tiny_model):
    """Online without any API key fails at init: the run goes on offline, with one warning (from rank 0, the one
    rank that logs, so one rank is enough)."""
    cfg = tiny_config(tmp_path, tiny_model, train={"max_steps": 3}, wandb={"mode": "online"},
                      launch={"procs_per_node": 1})
    # A HOME without credentials, with the caches where they are: DeepSpeed's JIT-built ops are found from
    # $XDG_CACHE_HOME as from ~/.cache (setting TORCH_EXTENSIONS_DIR instead moves torch's build folder, and the
    # CPU comm op was built again, ~25-60 s, in every fresh clone).
    cache = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    proc = shardtune("launch", str(cfg), env={"WANDB_API_KEY": "", "HOME": str(tmp_path), "XDG_CACHE_HOME": cache})
    assert proc.stderr.count("wandb: online init failed") == 1
    assert len(find_runs(tmp_path / "run" / "wandb")) == 1
    assert [r["step"] for r in RunDir(tmp_path / "run").train_metrics()] == [1, 2, 3]
