"""Load the Hugging Face causal LM to train, and the loss it trains on.

At ZeRO-3 the model is built inside `deepspeed.zero.Init` (through transformers' DeepSpeed
integration), so each rank only ever holds its shard of the parameters, never the whole fp32 model.
"""
from __future__ import annotations

import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F

from launcher.contract.config import RunConfig
from launcher.contract.errors import UserError
from launcher.planning.host import cxx_compiler, inductor_problem
from launcher.planning.memory import SINK_ATTENTION_MODELS
from launcher.planning.model_files import weight_files_problems
from launcher.planning.quantized_weights import quant_method, quantized_weights_problem
from trainer import separation
from trainer.sink_attention import register_sink_attention

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# transformers' ZeRO-3 switch is a module-level weak reference to this object; it must outlive loading.
_hf_ds_config = None


def flash_attention_usable(cfg: RunConfig, device: torch.device) -> bool:
    """flash-attention-2 runs only in bf16/fp16, on CUDA GPUs of compute capability 8.0+ (Ampere and newer), for a
    model class that runs it (flash_attention_2_supported)."""
    if device.type != "cuda" or cfg.train.precision not in ("bf16", "fp16") \
            or importlib.util.find_spec("flash_attn") is None:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0) and flash_attention_2_supported(causal_lm_class(cfg))


def flash_attention_2_supported(model_class) -> bool:
    """transformers raises for a class without _supports_flash_attn (Llama 4, DeepSeek-V3.2) and swaps in its own
    kernels from the hub for a class that lists others (gpt-oss: vllm-flash-attn3, a download, Hopper only);
    an unknown class (remote code) is not assumed to run it."""
    listed = getattr(model_class, "_compatible_flash_implementations", None)
    return getattr(model_class, "_supports_flash_attn", False) is True and (listed is None
                                                                            or "flash_attention_2" in listed)


def attention_implementation(cfg: RunConfig, device: torch.device) -> str:
    """flash_attention_2 where its kernels can run (see flash_attention_usable), else PyTorch's sdpa."""
    if cfg.model.attn_implementation != "auto":
        return cfg.model.attn_implementation
    return "flash_attention_2" if flash_attention_usable(cfg, device) else "sdpa"


def model_attention(cfg: RunConfig, device: torch.device, packs_samples: bool) -> str:
    """The attn_implementation the model loads with (without sequence parallelism): attention_implementation's
    kernel; where transformers has no sdpa path for the class, shardtune's sdpa kernel for attention sinks
    (trainer/sink_attention.py) on the models it is verified for, else eager; and on sdpa, when rows hold several
    samples, one sdpa call per sample where every layer is causal over its whole sample (trainer/separation.py)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(cfg.model.name_or_path, revision=cfg.model.revision,
                                        trust_remote_code=cfg.model.trust_remote_code).get_text_config()
    model_class = causal_lm_class(cfg)
    attention = attention_implementation(cfg, device)
    if attention == "sdpa" and cfg.model.attn_implementation == "auto" and not _sdpa_supported(model_class):
        if config.model_type in SINK_ATTENTION_MODELS:
            return separation.SINK_ATTENTION
        return "eager"  # transformers builds its masks from the position ids (trainer/separation.py)
    return separation.attention_kernel(attention, config.to_dict(), cfg.data.seq_len, packs_samples,
                                       model_class is not None)


def causal_lm_class(cfg: RunConfig):
    """The transformers class that will run the model (None for remote code).

    Loading remote code registers its classes in transformers' auto mappings, so the mapping alone would call
    the model native once it is loaded: the class must also come from transformers itself.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(cfg.model.name_or_path, revision=cfg.model.revision,
                                        trust_remote_code=cfg.model.trust_remote_code)
    found = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    return found if found is not None and found.__module__.startswith("transformers.") else None


def _sdpa_supported(model_class) -> bool:
    """False for model classes transformers refuses to run with sdpa (gpt-oss: its attention sinks)."""
    return getattr(model_class, "_supports_sdpa", True) is not False


def load_model(cfg: RunConfig, ds_config: dict, device: torch.device, attn_implementation: Optional[str] = None):
    """The model to hand to deepspeed.initialize (sharded at creation under ZeRO-3); attn_implementation
    overrides the usual choice (sequence parallelism brings its own)."""
    global _hf_ds_config
    from transformers import AutoModelForCausalLM

    if ds_config["zero_optimization"]["stage"] == 3:
        from transformers.integrations import HfDeepSpeedConfig

        _hf_ds_config = HfDeepSpeedConfig(ds_config)
    experts = {} if cfg.model.experts_implementation == "auto" else {
        "experts_implementation": cfg.model.experts_implementation}
    attention = attn_implementation or model_attention(cfg, device, cfg.data.packing)
    if attention == separation.PACKED_ATTENTION:
        separation.register_packed_attention()
    elif attention == separation.SINK_ATTENTION:
        register_sink_attention()
    model, loading = AutoModelForCausalLM.from_pretrained(
        cfg.model.name_or_path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code,
        dtype=DTYPES[cfg.train.precision], attn_implementation=attention, output_loading_info=True, **experts,
        **dequantized_loading(cfg))
    refuse_missing_weights(cfg.model.name_or_path, model, loading.get("missing_keys") or ())
    model.config.use_cache = False
    if cfg.train.recomputes:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def dequantized_loading(cfg: RunConfig) -> dict:
    """from_pretrained's arguments for a checkpoint published quantized (launcher/planning/quantized_weights.py):
    its own quantization config with `dequantize=True`, so every weight loads trainable, in the training
    precision, on any device; {} for plain weights. Checked here as well as in `plan`, which cannot read a hub
    id's config."""
    from transformers import AutoConfig
    from transformers.quantizers.auto import AutoQuantizationConfig

    config = AutoConfig.from_pretrained(cfg.model.name_or_path, revision=cfg.model.revision,
                                        trust_remote_code=cfg.model.trust_remote_code)
    quantization = getattr(config, "quantization_config", None)
    if quantization is not None and not isinstance(quantization, dict):
        quantization = quantization.to_dict()
    model_config = {"quantization_config": quantization}
    problem = quantized_weights_problem(model_config, cfg.model.name_or_path)
    if problem:
        raise UserError(problem)
    if quant_method(model_config) is None:
        return {}
    return {"quantization_config": AutoQuantizationConfig.from_dict({**quantization, "dequantize": True})}


def load_saved_model(model_dir, dtype, trust_remote_code: bool = False):
    """A saved model, for evaluation or generation, in eval mode. Refused, naming the file or the weights, when its
    weight files are damaged (model_files) or lack weights of the architecture: an export or a copy cut short
    would otherwise load with those weights at random, and answer or score as noise."""
    from transformers import AutoModelForCausalLM

    damaged = weight_files_problems(str(model_dir))
    if damaged:
        raise UserError(f"{model_dir}: " + "; ".join(damaged))
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=trust_remote_code,
                                                       output_loading_info=True)
    refuse_missing_weights(str(model_dir), model, info["missing_keys"], field="")
    return model.eval()


def refuse_missing_weights(name: str, model, missing, field: str = "model.name_or_path") -> None:
    """A fine-tune starts from the checkpoint's weights, every one: transformers loads a model whose files lack
    some (a shard of another revision under a consistent index, a base model without its head, another
    architecture's checkpoint) with those weights at random and says so only in a log line, and the run would
    train a partly random model. Only parameters count: a buffer the files lack (rotary frequencies in some
    remote code) is computed by its module, not drawn at random. Weights a model declares optional, and tied
    ones, are not reported missing by transformers."""
    parameters = {n for n, _ in model.named_parameters()}
    missing = sorted(set(missing) & parameters)
    if missing:
        where = f"{field}: {name}" if field else name
        raise UserError(f"{where}: {len(missing)} weight(s) of {type(model).__name__} are in "
                        f"none of its files (e.g. {', '.join(missing[:3])}); transformers would start them from "
                        f"random values. Is every file of the checkpoint there, and from one revision of this model?")


def set_training(engine, mode: bool) -> None:
    """engine.train(mode) / engine.eval() without transformers re-kernelizing the model.

    transformers 5's train() and eval() also re-kernelize the model for the new mode (the `kernels` library swaps
    module forwards), so an evaluation between two steps would swap them twice, under a compiled model too. The
    kernels the model trains with serve an evaluation as well: only dropout and the like must switch, so
    evaluations and the packing check flip the flags alone. The one real switch, to training, happens once,
    before compiling (Session.build).
    """
    for module in engine.modules():
        module.training = mode


def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder's layers (`model.get_decoder().layers`, the transformers convention for decoder-only models);
    empty when the model has none there."""
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError):
        return []
    return list(getattr(decoder, "layers", None) or [])


def gather_layers_whole(model) -> bool:
    """ZeRO-3, compiled: make each decoder layer a ZeRO-3 leaf module, before deepspeed.initialize reads the flags.

    DeepSpeed then gathers a layer's parameters in one hook on entering it (as FSDP shards per block) instead of
    one per linear layer, so nothing inside a layer's forward calls into ZeRO-3's hooks and the forward compiles
    as one graph. False: the model names no decoder layer class to compile one at a time.
    """
    from deepspeed.utils import set_z3_leaf_modules

    layers = decoder_layers(model)
    if layers:
        set_z3_leaf_modules(model, sorted({type(m).__name__ for m in layers}), raise_if_not_found=False)
    return bool(layers)


def compile_model(engine, device: str, stage: int) -> str:
    """torch.compile the model DeepSpeed wraps, in place, so its parameters keep their names: checkpoints,
    resume and the export see the eager model; returns how. The first steps pay for the compilation (inductor
    caches the kernels on disk for later runs); a compiled model sees one batch shape (the session pads to it).

    ZeRO 0-2: the whole model (nn.Module.compile through engine.compile). ZeRO-3: each decoder layer's forward,
    the layers made leaf modules by `gather_layers_whole`: ZeRO-3's gather and release hooks run around the
    compiled forward, never inside it (compiled whole, the graph broke at every module and the hooks, recompiled
    per module, hit torch's recompile limit). The plan checked for a compiler on the machine that planned; this
    node is checked again, before the first step would fail in inductor."""
    triton = importlib.util.find_spec("triton") is not None
    problem = inductor_problem(device, cxx_compiler(), triton)
    if problem is not None:
        raise UserError(f"train.compile: the model cannot be compiled on this node: {problem}; install it or set "
                        f"train.compile: false")
    # A checkpointed layer's forward sets and resets a context variable (transformers' `kernels` routing), a side
    # effect dynamo refuses inside torch.utils.checkpoint unless told it need not replay it in backward: without
    # this every checkpointed layer broke its graph and ran eager. Its reset undoes it, so nothing is lost.
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    if stage < 3:
        engine.compile()
        return "the model is compiled (torch.compile through DeepSpeed)"
    layers = decoder_layers(engine.module)
    for layer in layers:
        layer.forward = torch.compile(layer.forward)
    return f"each of the {len(layers)} decoder layers is compiled (ZeRO-3 gathers a layer's parameters at once)"


def release_zero3_init() -> None:
    """After training, new models (the export's skeleton) must be built whole, not sharded by zero.Init."""
    global _hf_ds_config
    if _hf_ds_config is not None:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        _hf_ds_config = None


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of per-token cross-entropy over trained positions, in fp32 (targets are already shifted)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100,
                           reduction="sum")


def lr_lambda(cfg: RunConfig):
    """Multiplier of train.lr at optimizer step s (0-based): linear warmup, then cosine/linear/constant."""
    import math

    t = cfg.train
    warmup, total, floor = t.warmup_steps, t.max_steps, t.min_lr_ratio

    def at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if t.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup - 1))
        if t.lr_schedule == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return at
