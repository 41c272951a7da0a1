"""Models published with quantized weights: fp8 and MXFP4 ones train in full from their dequantized weights, others
are refused.

The fp8 checkpoint is the tiny Llama written in DeepSeek-V3's published form by this test's own quantizer: each
projection a float8_e4m3fn weight and a `weight_scale_inv` per 32 × 32 block (the block size is the checkpoint's,
128 in DeepSeek-V3), so that weight = fp8 value × scale. The expected weights are that product, computed here,
and written as a plain checkpoint: training from it is the reference a run from the fp8 checkpoint must equal.
The MXFP4 checkpoint is a tiny gpt-oss whose experts this test packs as gpt-oss is published, by the OCP
Microscaling spec: per 32 values one power-of-two scale (a biased exponent byte) and 4-bit E2M1 elements, two to
a byte.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from launcher.contract.run_dir import RunDir

from conftest import REPO, losses, shardtune, tiny_config

BLOCK = 32
FP8_MAX = 448.0  # the largest finite float8_e4m3fn


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_model) -> dict[str, Path]:
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("quantized")
    fp8, plain = root / "fp8", root / "dequantized"
    shutil.copytree(tiny_model, fp8)
    shutil.copytree(tiny_model, plain)
    quantized, expected = {}, {}
    for name, w in load_file(tiny_model / "model.safetensors").items():
        if not name.endswith("_proj.weight"):
            quantized[name] = expected[name] = w
            continue
        rows, cols = w.shape
        blocks = w.float().reshape(rows // BLOCK, BLOCK, cols // BLOCK, BLOCK)
        scale = blocks.abs().amax(dim=(1, 3)) / FP8_MAX
        q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn)
        quantized[name] = q.reshape(rows, cols)
        quantized[name.replace(".weight", ".weight_scale_inv")] = scale
        expected[name] = (q.float() * scale[:, None, :, None]).reshape(rows, cols).to(w.dtype)
    save_file(quantized, fp8 / "model.safetensors", metadata={"format": "pt"})
    save_file(expected, plain / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((fp8 / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [BLOCK, BLOCK]}
    (fp8 / "config.json").write_text(json.dumps(config))
    assert max((expected[n].float() - w.float()).abs().max().item()
               for n, w in load_file(tiny_model / "model.safetensors").items()) > 0  # fp8 rounding is real
    return {"fp8": fp8, "dequantized": plain}


def test_plan_refuses_weights_no_loader_turns_back_and_notes_fp8(checkpoints, tmp_path):
    gptq = tmp_path / "gptq"
    gptq.mkdir()
    config = json.loads((checkpoints["fp8"] / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (gptq / "config.json").write_text(json.dumps(config))
    refused = shardtune("plan", str(tiny_config(tmp_path, gptq)), check=False)
    assert refused.returncode == 2
    assert f"model.name_or_path: {gptq} holds weights quantized with 'gptq'" in refused.stderr, refused.stderr
    planned = shardtune("plan", str(tiny_config(tmp_path, checkpoints["fp8"])))
    assert "the model's weights are published in fp8: they are dequantized to fp32 as they load" in planned.stdout


MOCKED_H100 = textwrap.dedent("""
    import json, sys, torch, yaml
    from safetensors.torch import load_file
    from launcher.contract.config import validate_config
    from launcher.planning.plan import build_plan
    from trainer.model import load_model
    from transformers import AutoModelForCausalLM

    cfg = build_plan(validate_config(yaml.safe_load(open(sys.argv[1])))).config
    torch.cuda.is_available = lambda: True  # what transformers' fp8 quantizer asks before keeping fp8 weights
    torch.cuda.get_device_capability = lambda *args: (9, 0)
    model = load_model(cfg, {"zero_optimization": {"stage": 2}}, torch.device("cpu"))
    state, expected = model.state_dict(), load_file(sys.argv[2])
    plain = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, dtype=torch.float32)
    print(json.dumps({
        "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "trainable": all(p.requires_grad for p in model.parameters()),
        "q_proj": type(model.model.layers[0].self_attn.q_proj).__name__,
        "max_difference": max((state[n].float() - w.float()).abs().max().item() for n, w in expected.items()),
        "config_quantized": hasattr(model.config, "quantization_config"),
        "transformers_alone": sorted({str(p.dtype) for p in plain.parameters()}),
    }))
""")


def test_fp8_weights_load_dequantized_on_a_mocked_h100(checkpoints, tmp_path):
    """CUDA is mocked (no GPU here): on an H100, transformers alone keeps the fp8 weights in FP8Linear modules."""
    proc = subprocess.run([sys.executable, "-c", MOCKED_H100, str(tiny_config(tmp_path, checkpoints["fp8"])),
                           str(checkpoints["dequantized"] / "model.safetensors")],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "torch.float8_e4m3fn" in found["transformers_alone"]  # the defect shardtune's loading avoids
    assert found["dtypes"] == ["torch.float32"] and found["trainable"] and found["q_proj"] == "Linear"
    assert found["max_difference"] == 0.0 and not found["config_quantized"]


def test_a_run_from_fp8_weights_trains_like_one_from_their_dequantized_values(checkpoints, tmp_path):
    """At ZeRO-3, where the model is built partitioned, against a run from the plain dequantized checkpoint."""
    from safetensors.torch import load_file

    runs = {}
    for name, model in checkpoints.items():
        (tmp_path / name).mkdir()
        cfg = tiny_config(tmp_path / name, model, train={"max_steps": 4, "save_every": 4}, zero={"stage": 3})
        shardtune("launch", str(cfg))
        runs[name] = RunDir(tmp_path / name / "run")
    assert losses(runs["fp8"].path) == losses(runs["dequantized"].path) and len(losses(runs["fp8"].path)) == 4
    final = runs["fp8"].final
    assert "quantization_config" not in json.loads((final / "config.json").read_text())
    ours, reference = load_file(final / "model.safetensors"), load_file(runs["dequantized"].final /
                                                                          "model.safetensors")
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)


E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # the magnitudes of FP4 E2M1; bit 3 is the sign


def mxfp4(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[E, R, C] -> packed elements [E, R, C/32, 16], exponent bytes [E, R, C/32], and the values they stand for.
    The shared exponent puts each block's largest magnitude in [4, 8): E2M1's own exponent reaches 2, and
    values past 6 saturate (OCP Microscaling Formats v1.0)."""
    e, r, c = rows.shape
    blocks = rows.float().reshape(e, r, c // 32, 32)
    exponent = torch.floor(torch.log2(blocks.abs().amax(-1).clamp(min=2.0 ** -126))) - 2
    scaled = blocks / torch.exp2(exponent)[..., None]
    magnitude = (scaled.abs()[..., None] - E2M1).abs().argmin(-1)
    code = magnitude + 8 * (scaled < 0)
    packed = (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8)
    value = torch.where(scaled < 0, -E2M1[magnitude], E2M1[magnitude]) * torch.exp2(exponent)[..., None]
    return packed, (exponent + 127).to(torch.uint8), value.reshape(e, r, c)


def test_mxfp4_experts_load_dequantized_to_the_values_the_microscaling_spec_gives(tmp_path):
    """gpt-oss stores each expert matrix transposed, its blocks running along the input dimension."""
    import yaml
    from safetensors.torch import load_file, save_file

    from launcher.contract.config import validate_config
    from trainer.model import load_model

    from moe_models import make_tiny_moe

    model_dir = make_tiny_moe(tmp_path / "gpt-oss", "gpt_oss")
    quantized, expected = {}, {}
    for name, w in load_file(model_dir / "model.safetensors").items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales, value = mxfp4(w.transpose(1, 2))
            quantized[name + "_blocks"], quantized[name + "_scales"] = blocks, scales
            expected[name] = value.transpose(1, 2)
        else:
            quantized[name] = expected[name] = w
    save_file(quantized, model_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (model_dir / "config.json").write_text(json.dumps(config))
    cfg = validate_config(yaml.safe_load(tiny_config(tmp_path, model_dir, train={"precision": "fp32"}).read_text()))
    model = load_model(cfg, {"zero_optimization": {"stage": 2}}, torch.device("cpu"))
    state = model.state_dict()
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())
    assert max((state[n] - w.float()).abs().max().item() for n, w in expected.items()) == 0.0
    assert not hasattr(model.config, "quantization_config")
