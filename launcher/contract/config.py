"""The run config: one typed tree, loaded strictly from YAML plus `section.field=value` overrides.

Every field carries its documentation as the docstring under it, so `shardtune plan`, the README and
the error messages all speak about the same names. Validation happens once, here, before anything is
launched, and reports every problem together.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from launcher.contract.errors import ConfigError
from launcher.contract.secrets import secret_problems


class Section(BaseModel):
    """Base for every config section: unknown keys are errors. Field docstrings are read by `field_docs`
    only: pydantic's use_attribute_docstrings parses every class's source at import, ~0.1 s of each
    `shardtune plan`."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name_or_path: str
    """Hugging Face causal LM: a local directory or a hub id (`launch` downloads a hub model once into HF_HOME, at
    one commit; the nodes load it from there)."""
    tokenizer: Optional[str] = None
    """Tokenizer directory or hub id; defaults to `model.name_or_path`."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) of `model.name_or_path`; `launch` resolves it to one commit for the whole
    run."""
    tokenizer_revision: Optional[str] = None
    """Hub revision of `model.tokenizer` when it is a repository of its own; default its main branch (a model's
    branch or commit is not one of another repository's). `launch` resolves it to one commit."""
    trust_remote_code: bool = False
    """Run Python code shipped with the model. Off unless you trust the model's authors. The code is kept in every
    checkpoint and the export; offline tools run it only with --trust_remote_code."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    """Attention kernel. `auto`: flash_attention_2 when installed, in bf16/fp16 on an Ampere or newer GPU, else sdpa;
    for gpt-oss (attention sinks, which transformers runs only eagerly) shardtune's sdpa kernel for sinks, and eager
    for other models transformers has no sdpa path for (Gemma 2)."""
    experts_implementation: Literal["auto", "grouped_mm", "batched_mm", "eager"] = "auto"
    """Mixture of experts: kernel of the fused experts. `auto`: transformers' default (grouped_mm); `eager`
    loops over the experts a batch hits."""
    router_aux_loss_coef: Optional[float] = Field(None, ge=0)
    """Mixture of experts: weight of the router load-balancing loss added to the training objective (logged as
    aux_loss, apart from loss); default: the model config's router_aux_loss_coef; 0 disables."""
    moe_leaf_modules: list[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.]*$")]] = []
    """ZeRO-3: class names of more MoE blocks to gather as one unit (known blocks, and parents of an `experts`
    module, are found without this)."""

    def tokenizer_source(self) -> tuple[str, Optional[str]]:
        """Where the tokenizer is read, and at which revision: `model.tokenizer` at its own revision when it is
        another repository, else the model's."""
        if self.tokenizer and self.tokenizer != self.name_or_path:
            return self.tokenizer, self.tokenizer_revision
        return self.name_or_path, self.tokenizer_revision or self.revision


class DataFields(Section):
    """Column names in the data files, for data that uses other keys than the standard ones."""

    text: str = "text"
    """`text` format: the document column."""
    instruction: str = "instruction"
    """`alpaca` format: the instruction column."""
    input: str = "input"
    """`alpaca` format: the optional input column."""
    output: str = "output"
    """`alpaca` format: the response column."""
    system: str = "system"
    """`alpaca` format: an optional per-row system prompt column."""
    messages: str = "messages"
    """`messages` format: the list of turns."""
    role: str = "role"
    """`messages` format: the role key inside a turn."""
    content: str = "content"
    """`messages` format: the content key inside a turn."""
    conversations: str = "conversations"
    """`sharegpt` format: the list of turns."""
    speaker: str = "from"
    """`sharegpt` format: the speaker key inside a turn (human / gpt / system / function_call / observation)."""
    value: str = "value"
    """`sharegpt` format: the text key inside a turn."""
    tools: str = "tools"
    """`messages`, `sharegpt` formats: the optional per-row tool definitions (a list, or a JSON string of one)."""
    function_call: str = "function_call"
    """`sharegpt` format: speaker of a turn calling tools; its value is JSON {"name", "arguments"} or a list."""
    observation: str = "observation"
    """`sharegpt` format: the speaker of a tool result (never trained)."""


DataFormat = Literal["text", "alpaca", "messages", "sharegpt"]


class DataSource(Section):
    """One dataset of a weighted mixture."""

    path: str
    """File, glob, directory or hub dataset id."""
    format: Optional[DataFormat] = None
    """Row format of this source; defaults to `data.format`."""
    weight: float = Field(1.0, gt=0)
    """Relative share of this source in the training mixture (> 0)."""
    fields: Optional[DataFields] = None
    """Column names of this source; default `data.fields`."""
    split: str = "train"
    """Split to read for hub datasets."""
    subset: Optional[str] = None
    """Subset (configuration) of a hub dataset that has several; `launch` records the one datasets reads by default."""
    revision: Optional[str] = None
    """Hub dataset revision (branch, tag or commit); `launch` and `prepare` resolve it to one commit."""
    max_rows: Optional[int] = Field(None, gt=0)
    """Read only the first N rows of this source; default: all."""


class DataConfig(Section):
    path: str
    """Training data: a .jsonl/.json/.parquet/.csv file, a glob, a directory or a hub dataset id."""
    format: DataFormat
    """Row format: text, alpaca (instruction/input/output), messages (role/content turns) or sharegpt."""
    seq_len: int = Field(gt=0)
    """Tokens per training sequence; samples are packed into sequences of this length."""
    mix: list[DataSource] = []
    """Further datasets mixed with `data.path` (which has weight `data.weight`): each a `path` and `weight`, and as
    `data`'s own the optional `format`, `fields`, `split`, `subset`, `revision` and `max_rows`."""
    weight: float = Field(1.0, gt=0)
    """Share of `data.path` in the mixture when `data.mix` is set."""
    fields: DataFields = DataFields()
    """Column names, for data whose keys differ from the format's standard ones."""
    split: str = "train"
    """Split to read for hub datasets."""
    subset: Optional[str] = None
    """Subset (configuration) of a hub `data.path` that has several (e.g. `en` of allenai/c4); `launch` records the
    one datasets reads by default."""
    revision: Optional[str] = None
    """Hub dataset revision of `data.path` (and of `data.eval_path` when it is the same dataset); `launch` and
    `prepare` resolve it to one commit, which the run and its data cache key read."""
    max_rows: Optional[int] = Field(None, gt=0)
    """Read only the first N rows of `data.path` (in file order, bad rows included; an `eval_fraction` is held out of
    them), to try a run on a large dataset before preparing all of it; default: all. Of a hub dataset's split, `launch`
    downloads only the files that hold them."""
    chat_template: Optional[str] = None
    """Jinja chat template for tokenizers without one (or to replace theirs); `chatml` names the built-in."""
    train_on: Literal["assistant", "last_assistant", "all"] = "assistant"
    """Which tokens carry loss: every assistant turn (tool calls too, never tool results), the last one, or all."""
    multi_turn: Literal["auto", "per_turn", "whole"] = "auto"
    ("Exact masks where a template renders a turn differently inside the conversation than as its last one "
     "(Qwen3 drops earlier reasoning). `per_turn`: each assistant turn is its own sample, in the context the model "
     "sees at inference (the conversation up to it with the generation prompt); `whole`: the conversation rendered "
     "once, each turn located in it with sentinels; `auto`: rendered once where the conversation renders "
     "prefix-stably, per_turn where not.")
    train_on_reasoning: bool = True
    ("Reasoning (`reasoning_content` rendered by the template, or inline <think>…</think>) carries loss; "
     "false masks the reasoning text and still trains the rest of the turn.")
    packing: bool = True
    """Pack several samples into each sequence; attention never crosses samples."""
    truncation: Literal["drop", "truncate"] = "drop"
    """Samples longer than seq_len: drop them, or cut them to seq_len (counted either way)."""
    on_bad_row: Literal["error", "skip"] = "error"
    """A malformed row stops the run naming file:line (error) or is dropped and counted (skip)."""
    num_proc: Optional[int] = Field(None, gt=0)
    """Worker processes for tokenization; default: up to 8 (one per core) for sources of 20,000 rows or more, none
    below."""
    cache_dir: Optional[str] = None
    """Tokenized-data cache; default $SHARDTUNE_CACHE or ~/.cache/shardtune/data. Shared filesystem: one process
    preprocesses for the job; node-local: one per node."""
    eval_path: Optional[str] = None
    """Held-out data in the same format; evaluated every train.eval_every steps. Not a file or a hub split the run
    trains on."""
    eval_split: Optional[str] = None
    """Split of a hub `data.eval_path` (e.g. test); default `data.split`, which must then be another dataset's."""
    eval_subset: Optional[str] = None
    """Subset of a hub `data.eval_path`; default `data.subset` when it is `data.path`'s dataset."""
    eval_revision: Optional[str] = None
    """Hub revision of `data.eval_path`; default `data.revision` when it is `data.path`'s dataset, else its main
    branch. `launch` and `prepare` resolve it to one commit."""
    eval_fraction: float = Field(0.0, ge=0, lt=1)
    """Alternatively, hold out this fraction of the training rows for evaluation."""
    shuffle: bool = True
    """Shuffle the global sample order (seeded by train.seed and the epoch)."""

    def reads(self) -> list[DataRead]:
        """Every dataset the section reads, training sources first, then `data.eval_path`, each with the defaults
        of its hub coordinates applied and the names of the fields that give them."""
        plain = {"path": "path", "subset": "subset", "split": "split", "revision": "revision"}
        out = [DataRead(self, "data", plain, True, self.path, self.subset, self.split, self.revision,
                        max_rows=self.max_rows)]
        out += [DataRead(s, f"data.mix[{i}]", plain, True, s.path, s.subset, s.split, s.revision, i, s.max_rows)
                for i, s in enumerate(self.mix)]
        if self.eval_path:
            same = self.eval_path == self.path
            out.append(DataRead(self, "data", {k: f"eval_{k}" for k in plain}, False, self.eval_path,
                                self.eval_subset or (self.subset if same else None), self.eval_split or self.split,
                                self.eval_revision or (self.revision if same else None)))
        return out


@dataclass
class DataRead:
    """One dataset a run reads: its path and hub coordinates (defaults applied), and the config fields behind them."""

    owner: Section
    prefix: str
    keys: dict[str, str]
    """Attribute of `owner` holding each of path, subset, split, revision."""
    trained: bool
    path: str
    subset: Optional[str]
    split: str
    revision: Optional[str]
    mix_index: Optional[int] = None
    """Position in data.mix, for a mixture source."""
    max_rows: Optional[int] = None
    """Only the first rows are read (a training source's `max_rows`)."""

    def field(self, what: str) -> str:
        """The config field that gives `what` (path, subset, split, revision), as messages name it."""
        return f"{self.prefix}.{self.keys[what]}"

    def record(self, what: str, value: str) -> None:
        """Write a resolved value (a commit, the subset datasets picked) into the config."""
        setattr(self.owner, self.keys[what], value)
        setattr(self, what, value)


class TrainConfig(Section):
    max_steps: int = Field(gt=0)
    """Optimizer steps to train for."""
    micro_batch_size: Union[Annotated[int, Field(gt=0)], Literal["auto"]] = 1
    """Sequences per device per forward pass; `auto` picks the largest that fits launch.gpu_memory_gb."""
    grad_accum_steps: Optional[int] = Field(None, gt=0)
    """Micro-batches accumulated per optimizer step; derived from global_batch_size when unset."""
    global_batch_size: Optional[int] = Field(None, gt=0)
    """Sequences per optimizer step across all ranks; kept when the world size changes."""
    lr: float = Field(gt=0)
    """Peak learning rate."""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup: cosine or linear to min_lr_ratio × lr, or constant."""
    warmup_steps: int = Field(0, ge=0)
    """Steps of linear warmup from 0 to lr."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Final learning rate as a fraction of lr."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW decoupled weight decay, applied to every trained parameter, norm weights and biases included (one
    parameter group); the HF Trainer exempts biases and norm weights, so a non-zero value here decays them too."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW beta1, beta2."""
    adam_eps: float = Field(1e-8, gt=0)
    """AdamW epsilon."""
    grad_clip: float = Field(1.0, ge=0)
    """Clip the global gradient norm to this value (0 disables)."""
    seed: int
    """Seeds weights init of new layers, data order and dropout; same seed, same run."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Training precision. `auto`: bf16 on GPUs, fp32 on CPU. With bf16/fp16 and accumulation, gradients accumulate in
    fp32."""
    optimizer: Literal["auto", "fused", "torch"] = "auto"
    """AdamW kernel: `fused` is DeepSpeed's FusedAdam (CUDA; needs its op prebuilt or a CUDA compiler), `torch` is
    torch.optim.AdamW with its fused kernels; `auto`: fused when it can be built, else torch."""
    activation_checkpointing: Union[bool, Literal["auto", "offload"]] = False
    """Recompute activations in backward to save memory; `auto` turns it on only when needed to fit;
    `offload` also keeps each layer's checkpointed input in host RAM until backward (GPUs; on CPU the host
    is the device, so it changes nothing)."""
    sequence_parallel: Union[Annotated[int, Field(gt=0)], Literal["auto"]] = 1
    """Ulysses sequence parallelism: every sequence is split over this many ranks (attention exchanges heads
    between them), so activations per device shrink N-fold; data-parallel degree = world / N. `auto`: the
    smallest N that fits launch.gpu_memory_gb."""
    chunked_loss: Union[bool, Literal["auto"]] = "auto"
    """Compute the LM head and cross-entropy a chunk of tokens at a time, never holding the tokens × vocab
    logits; `auto`: on for models whose logits are a plain linear head (off, e.g., with logit soft-capping)."""
    tiled_mlp: bool = False
    """Run each MLP over tiles of the sequence and recompute them in backward (DeepSpeed's TiledMLP): its
    intermediate activations never exist for the whole sequence. For the longest sequences; costs one more
    MLP forward."""
    compile: Union[bool, Literal["auto"]] = "auto"
    """torch.compile the model (ZeRO 0-2: the whole model through DeepSpeed's engine.compile; ZeRO-3: each decoder
    layer, as a ZeRO-3 leaf module; parameter names, checkpoints and the export stay the eager model's). `auto`: on
    for runs of at least 200 steps without sequence parallelism or experts, where compiling repays its start-up
    (launcher.planning.compile_choice says why each is excluded)."""
    log_every: int = Field(1, gt=0)
    """Log metrics every N optimizer steps."""
    eval_every: int = Field(0, ge=0)
    """Evaluate every N steps (0: only at the end, when eval data is set)."""
    save_every: int = Field(0, ge=0)
    """Checkpoint every N steps (0: only at the end)."""
    keep_last: int = Field(2, gt=0)
    """Keep the newest K complete checkpoints."""
    resume: str = "auto"
    """`auto`: continue from the newest complete checkpoint if any; `never`; or a checkpoint path."""
    overwrite: bool = False
    """With resume `never`: move an earlier run's results in output_dir aside (to replaced-TIME/) instead of
    refusing."""
    stop_at_step: Optional[int] = Field(None, gt=0)
    """End this launch after this step with a checkpoint; relaunching continues the run (to split it over
    allocations)."""
    async_save: bool = False
    """Write periodic checkpoints in the background: training waits only for an in-memory copy of the state; the
    checkpoint counts once every rank's files are durable."""
    export_max_shard_size: str = Field("5GB", pattern=r"^\d+(\.\d+)?\s*([KMGT]i?B)?$")
    """Largest safetensors file of the exported model (the run's final model and `shardtune export`), e.g. 5GB or
    500MB."""
    max_bad_steps: int = Field(3, gt=0)
    """Stop after this many consecutive steps skipped for a non-finite loss or gradient norm (fp16 loss-scale skips are
    not counted)."""
    sample_prompt: Optional[str] = None
    """A user message answered by the final model at the end, to eyeball the result: rank 0 loads the export on its
    CPU in the dtype it is saved in, once the run is complete (a failure is reported, not fatal)."""

    @property
    def recomputes(self) -> bool:
        """Activation checkpointing is on, plainly or with its checkpointed inputs offloaded."""
        return self.activation_checkpointing in (True, "offload")


class ZeroConfig(Section):
    stage: Union[Literal[0, 1, 2, 3], Literal["auto"]] = 2
    """ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters; `auto` picks by memory."""
    offload_optimizer: Literal["none", "cpu", "auto"] = "none"
    """Keep optimizer state (and its step) in host RAM; `auto` lets the memory planner offload only when nothing fits
    without it."""
    offload_params: Literal["none", "cpu", "auto"] = "none"
    """Keep parameters in host RAM (stage 3 only); `auto` lets the memory planner decide."""
    config: Optional[str] = None
    """Your own DeepSpeed JSON instead of the template; its "auto" values are filled and checked."""
    overlap_comm: Optional[bool] = None
    """Overlap gradient reduction with backward; default from the template."""


class LaunchConfig(Section):
    backend: Literal["torchrun", "slurm"] = "torchrun"
    """torchrun on this machine (or by hand on every node), or an sbatch job."""
    nodes: int = Field(1, gt=0)
    """Machines in the job."""
    procs_per_node: int = Field(gt=0)
    """Training processes per machine: one per GPU."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where training runs. `auto`: on SLURM from slurm.gpus_per_node (cuda unless 0); one-node torchrun: cuda when
    this machine has visible GPUs; multi-node torchrun needs it set."""
    rdzv_endpoint: Optional[str] = None
    """host:port of the first node for multi-node torchrun; default: this host, port 29400."""
    max_restarts: int = Field(0, ge=0)
    """torchrun restarts all workers this many times after a worker failure."""
    rdzv_timeout_s: int = Field(600, gt=0)
    """Seconds torchrun waits for all nodes to join the rendezvous before failing."""
    collective_timeout_s: int = Field(1800, gt=0)
    """Seconds any collective (all-reduce, barrier, ...) may wait before the process group fails it."""
    stall_timeout_s: int = Field(300, gt=0)
    """A rank that makes no progress for this long dumps its stacks and exits (steady-state steps)."""
    startup_timeout_s: int = Field(1200, gt=0)
    """The same allowance before the first step completes and during saves, evals and export."""
    gpu_memory_gb: Optional[float] = Field(None, gt=0)
    """Memory of one device, used by the planner to check fit and choose `auto` settings."""
    force_approximate_fit: bool = False
    """Check fit against gpu_memory_gb even for a mixture-of-experts model whose size is only approximate
    (refused otherwise)."""
    env: dict[str, str] = {}
    """Extra environment variables for the training processes (not secrets: they are written to launch scripts)."""
    storage_gbps: float = Field(1.0, gt=0)
    """Aggregate write bandwidth of the run's storage in GB/s, for the checkpoint write time in the plan (measured
    values are logged after each save)."""
    peak_tflops: Optional[float] = Field(None, gt=0)
    """Dense peak TFLOPs of one device at the training precision, for MFU; default: a table of common GPUs,
    else measured at start-up by a matmul probe on every rank (CPUs, unlisted GPUs)."""

    @property
    def world_size(self) -> int:
        """Training processes in the job: nodes × processes per node."""
        return self.nodes * self.procs_per_node


class SlurmConfig(Section):
    partition: Optional[str] = None
    """Partition (queue) to submit to; default: the cluster's default partition."""
    account: Optional[str] = None
    """Account to charge."""
    qos: Optional[str] = None
    """Quality of service."""
    time: str = Field("04:00:00", pattern=r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$|^\d+$")
    """Time limit per attempt (minutes, HH:MM:SS or D-HH:MM:SS); a requeued attempt gets it again."""
    gpus_per_node: Optional[int] = Field(None, ge=0)
    """GPUs to request per node; default: launch.procs_per_node on cuda, 0 on cpu."""
    cpus_per_task: Union[Annotated[int, Field(gt=0)], Literal["auto"]] = "auto"
    """CPU cores per node (one task per node runs all its training processes); `auto`: all of a node's CPUs (from sinfo
    at launch)."""
    mem: Union[Annotated[str, Field(pattern=r"^\d+[KMGT]?$")], Literal["auto"]] = "auto"
    """Host memory per node, e.g. 500G (no suffix: MB, as in SLURM); 0 means all of it; `auto`: 0 (all of it: 8 ranks
    load a model on the host). `plan` warns when it is below the host RAM its estimate gives a node."""
    constraint: Optional[str] = None
    """Node features required (--constraint)."""
    exclusive: bool = False
    """Do not share nodes with other jobs."""
    extra_sbatch: list[str] = []
    """More #SBATCH options, literally, e.g. ['--reservation=big', '--mail-type=END']."""
    setup: list[str] = []
    """Shell lines run on the batch host before training: module loads, venv activation."""
    signal_lead_s: int = Field(300, ge=30)
    """Seconds before the time limit at which SLURM sends USR1, so the job saves and requeues (SLURM may send it up to
    30 s earlier). Also how long torchrun's agents let the workers finish that save after a SIGTERM (SLURM's own
    preemption, or a SIGTERM without SLURM) before they kill them; torch's default is 30 s."""
    max_requeues: int = Field(3, ge=0)
    """Attempts in a row that may end without a newer checkpoint (a crash, a stop before the first save) and still be
    requeued. An attempt that saved progress resets the count, so time limits and preemptions requeue a run for as
    long as it trains."""
    job_name: Optional[str] = None
    """Job name; default: the output directory's name."""


class WandbConfig(Section):
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """`auto`: online when WANDB_API_KEY is set, else offline (upload later with `wandb sync`)."""
    project: str = "shardtune"
    """wandb project."""
    entity: Optional[str] = None
    """wandb team or user."""
    name: Optional[str] = None
    """Run name; default is the output directory's name."""
    group: Optional[str] = None
    """Run group, e.g. a sweep."""
    tags: list[str] = []
    """Run tags."""


class RunConfig(Section):
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    zero: ZeroConfig = ZeroConfig()
    launch: LaunchConfig
    slurm: SlurmConfig = SlurmConfig()
    wandb: WandbConfig = WandbConfig()
    output_dir: str
    """Run directory: resolved config, launch script, metrics, checkpoints and the final model."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into its key path and a YAML-typed value (so `true`, `[a, b]`, `null` work)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError([f"override {text!r}: expected section.field=value, e.g. train.lr=1e-5"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set each override into the raw tree; typing and unknown keys are left to validation."""
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[path[-1]] = value
    return raw


def _model_at(model: type[BaseModel], loc: tuple) -> Optional[type[BaseModel]]:
    """The section class that owns a location, to suggest the nearest valid key."""
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return model if isinstance(part, str) else None
        ann = field.annotation
        candidates = [ann] + list(getattr(ann, "__args__", ()))
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            for c in candidates:
                for arg in getattr(c, "__args__", ()):
                    if isinstance(arg, type) and issubclass(arg, BaseModel):
                        nested = [arg]
        if not nested:
            return None
        model = nested[0]
    return model


def _nearest(word: str, names: list[str]) -> Optional[str]:
    """The valid key a typo most likely meant: a shared prefix first (lr_typo -> lr), then spelling."""
    prefixed = [n for n in names if word.startswith(n) or n.startswith(word)]
    if prefixed:
        return max(prefixed, key=len)
    close = difflib.get_close_matches(word, names, n=1, cutoff=0.5)
    return close[0] if close else None


def _describe(loc: tuple, errs: list[dict]) -> str:
    """One line for one location; the members of a Union field each add what they allow."""
    name = ".".join(str(p) for p in loc)
    err = errs[0]
    if err["type"] == "extra_forbidden":
        owner = _model_at(RunConfig, loc[:-1])
        names = list(owner.model_fields) if owner else []
        near = _nearest(str(loc[-1]), names)
        hint = f"; did you mean {'.'.join([*map(str, loc[:-1]), near])!r}?" if near else ""
        allowed = f" Valid keys here: {', '.join(names)}." if names else ""
        return f"{name}: unknown key{hint}{allowed}"
    if err["type"] == "missing":
        return f"{name}: required field is missing"
    wants = "; or ".join(dict.fromkeys(e["msg"][0].lower() + e["msg"][1:] for e in errs))
    return f"{name}: {err.get('input')!r} is not allowed: {wants}"


_TYPE_TAGS = ("int", "bool", "float", "str", "list", "tuple", "dict", "function-after", "constrained-int")


def _group_errors(errors: list[dict]) -> dict[tuple, list[dict]]:
    """pydantic reports a Union field once per member (with the member in the location); regroup by field."""
    grouped: dict[tuple, list[dict]] = {}
    for err in errors:
        loc = tuple(p for p in err["loc"]
                    if not (isinstance(p, str) and (p.startswith(("literal[", "function-")) or p in _TYPE_TAGS)))
        grouped.setdefault(loc, []).append(err)
    return grouped


def validate_config(raw: dict) -> RunConfig:
    """Typed tree from raw YAML data, or a ConfigError listing every problem."""
    if not isinstance(raw, dict):
        raise ConfigError([f"the config must be a mapping of sections, got {type(raw).__name__}"])
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError([_describe(loc, errs) for loc, errs in _group_errors(exc.errors()).items()]) from None
    problems = check_consistency(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def replicas_words(world: int, sequence_parallel: int = 1) -> str:
    """How the batch arithmetic names the number of model replicas: the world, or world / sequence parallel."""
    if sequence_parallel == 1:
        return f"world {world}"
    return f"data-parallel {world // sequence_parallel} (world {world} / sequence_parallel {sequence_parallel})"


def batch_split_problems(global_batch_size: int, micro_batch_size: Optional[int], world: int,
                         sequence_parallel: int = 1) -> list[str]:
    """Every data-parallel replica takes the same whole number of micro-batches from each global batch (micro None:
    any micro). Under sequence parallelism the ranks of one group share their rows, so replicas = world / N."""
    replicas = world // sequence_parallel
    if micro_batch_size is None:
        if global_batch_size % replicas:
            what = f"the world size {world}" if sequence_parallel == 1 else replicas_words(world, sequence_parallel)
            return [f"train.global_batch_size: {global_batch_size} is not a multiple of {what}; "
                    "every rank needs the same share"]
        return []
    per_step = micro_batch_size * replicas
    if global_batch_size % per_step:
        return [f"train.global_batch_size: {global_batch_size} is not a multiple of micro {micro_batch_size} × "
                f"{replicas_words(world, sequence_parallel)} = {per_step}"]
    return []


def sequence_parallel_problems(cfg: RunConfig) -> list[str]:
    """What the config alone says about train.sequence_parallel (the model's heads are checked by the planner).

    A kernel that cannot keep packed samples apart under sequence parallelism is refused here: DeepSpeed's
    Ulysses attention drops the attention mask (it was built for one rank's slice), so only kernels that read
    sample boundaries from the gathered position ids stay exact.
    """
    t, world, attn = cfg.train, cfg.launch.world_size, cfg.model.attn_implementation
    sp = t.sequence_parallel
    if t.compile is True and sp != 1:
        return [f"train.sequence_parallel: {sp!r} with train.compile: true has not been verified (DeepSpeed's Ulysses "
                f"all-to-all autograd functions under torch.compile); allowed with compile: 1, or set "
                f"train.compile: false"]
    if sp == "auto" or sp == 1:
        return []
    problems = []
    if world % sp:
        divisors = ", ".join(str(d) for d in range(1, world + 1) if world % d == 0)
        problems.append(f"train.sequence_parallel: {sp} does not divide the world size {world} (launch.nodes × "
                        f"launch.procs_per_node); allowed: {divisors}")
    if cfg.data.seq_len % sp:
        problems.append(f"data.seq_len: {cfg.data.seq_len} is not a multiple of train.sequence_parallel {sp}; every "
                        f"rank of a sequence-parallel group takes an equal slice")
    if attn == "eager":
        problems.append(f"model.attn_implementation: 'eager' cannot run under train.sequence_parallel {sp}: it keeps "
                        "packed samples apart only with an L×L mask, and sequence parallelism cannot hand the "
                        "attention one (each rank builds it for its own slice); use sdpa or auto")
    if attn == "flash_attention_2" and cfg.data.packing and t.micro_batch_size != 1:
        problems.append(f"model.attn_implementation: 'flash_attention_2' under train.sequence_parallel {sp} keeps "
                        f"packed samples apart only with one row per micro-batch (it finds samples in the gathered "
                        f"position ids only then), got train.micro_batch_size {t.micro_batch_size!r}; set "
                        "train.micro_batch_size: 1, data.packing: false, or model.attn_implementation: sdpa "
                        "(exact for any micro batch)")
    return problems


def check_consistency(cfg: RunConfig) -> list[str]:
    """Rules that span fields; pydantic checks each field alone."""
    problems = []
    t, z = cfg.train, cfg.zero
    world = cfg.launch.world_size
    problems += sequence_parallel_problems(cfg)
    # train.sequence_parallel: auto is checked against the batch once the planner has chosen it.
    sp = t.sequence_parallel if isinstance(t.sequence_parallel, int) and world % t.sequence_parallel == 0 else 1
    replicas = world // sp
    if z.offload_params != "none" and z.stage not in (3, "auto"):
        problems.append(f"zero.offload_params: {z.offload_params!r} needs zero.stage 3 or auto, got stage {z.stage}")
    if z.offload_optimizer != "none" and z.stage == 0:
        problems.append(f"zero.offload_optimizer: {z.offload_optimizer!r} needs zero.stage 1, 2, 3 or auto, "
                        f"got stage 0")
    if t.grad_accum_steps is None and t.global_batch_size is None:
        problems.append("train.grad_accum_steps: required unless train.global_batch_size is set")
    if t.micro_batch_size == "auto" and t.global_batch_size is None:
        problems.append("train.micro_batch_size: 'auto' needs train.global_batch_size")
    if t.micro_batch_size == "auto" and t.global_batch_size is not None:
        problems += batch_split_problems(t.global_batch_size, None, world, sp)
    if t.micro_batch_size == "auto" and t.grad_accum_steps is not None:
        problems.append(f"train.grad_accum_steps: leave it unset when train.micro_batch_size is auto; the planner "
                        f"derives it from train.global_batch_size (got {t.grad_accum_steps})")
    if t.global_batch_size is not None and isinstance(t.micro_batch_size, int):
        per_step = t.micro_batch_size * replicas
        if t.grad_accum_steps is not None and per_step * t.grad_accum_steps != t.global_batch_size:
            problems.append(
                f"train.global_batch_size: {t.global_batch_size} contradicts micro {t.micro_batch_size} × "
                f"accumulation {t.grad_accum_steps} × {replicas_words(world, sp)} = {per_step * t.grad_accum_steps}; "
                "set only one of grad_accum_steps and global_batch_size")
        else:
            problems += batch_split_problems(t.global_batch_size, t.micro_batch_size, world, sp)
    if t.warmup_steps >= t.max_steps and t.warmup_steps:
        problems.append(f"train.warmup_steps: {t.warmup_steps} must be less than train.max_steps ({t.max_steps})")
    if cfg.data.eval_path and cfg.data.eval_fraction:
        problems.append("data.eval_fraction: set either data.eval_path or data.eval_fraction, not both")
    problems += eval_data_problems(cfg.data)
    if cfg.launch.backend == "torchrun" and cfg.launch.rdzv_endpoint and ":" not in cfg.launch.rdzv_endpoint:
        problems.append(f"launch.rdzv_endpoint: {cfg.launch.rdzv_endpoint!r} must be host:port")
    script_lines = {**{f"slurm.setup[{i}]": line for i, line in enumerate(cfg.slurm.setup)},
                    **{f"slurm.extra_sbatch[{i}]": line for i, line in enumerate(cfg.slurm.extra_sbatch)}}
    problems += secret_problems(cfg.launch.env, script_lines)
    literal = {"slurm.partition": cfg.slurm.partition, "slurm.account": cfg.slurm.account, "slurm.qos": cfg.slurm.qos,
               "slurm.constraint": cfg.slurm.constraint, "slurm.job_name": cfg.slurm.job_name,
               **{f"slurm.extra_sbatch[{i}]": line for i, line in enumerate(cfg.slurm.extra_sbatch)}}
    for name, value in literal.items():
        if value and any(ch in value for ch in "$`\n"):
            problems.append(f"{name}: {value!r} is not allowed: #SBATCH lines are not expanded by SLURM, so "
                            "they must be literal (no $, backquotes or newlines)")
    if t.resume not in ("auto", "never") and not t.resume.strip():
        problems.append("train.resume: must be auto, never or a checkpoint path")
    return problems


def eval_data_problems(d: DataConfig) -> list[str]:
    """Evaluation that would read the rows the run trains on (its loss then measures memorization, not held-out
    loss, and looks better than it is), and hub-only fields given for local data."""
    problems = []
    if not d.eval_path:
        problems += [f"data.{name}: {getattr(d, name)!r} applies to a hub dataset in data.eval_path, which is not set"
                     for name in ("eval_split", "eval_subset", "eval_revision") if getattr(d, name) is not None]
    reads = d.reads()
    for read in reads:
        if _looks_local(read.path):
            problems += [f"{read.field(what)}: {getattr(read.owner, read.keys[what])!r} applies to a hub dataset, "
                         f"and {read.field('path')} is {read.path}" for what in ("subset", "revision")
                         + (() if read.trained else ("split",)) if getattr(read.owner, read.keys[what]) is not None]
    evaluated = reads[-1] if d.eval_path else None
    for read in reads[:-1] if evaluated else ():
        if _absolute_if_local(read.path) != _absolute_if_local(evaluated.path):
            continue
        if _looks_local(evaluated.path):
            problems.append(f"data.eval_path: {d.eval_path} is also {read.field('path')}: evaluation would score rows "
                            f"the run trains on; give held-out rows, or hold some out with data.eval_fraction")
        elif (read.split, read.subset) == (evaluated.split, evaluated.subset):
            problems.append(f"data.eval_split: {evaluated.split!r} is the split {read.field('path')} ({read.path}) "
                            f"trains on: evaluation would score rows the run trains on; name a held-out split of it "
                            f"(e.g. test), or hold some out with data.eval_fraction")
    return problems


def read_yaml(path: str | Path) -> dict:
    """Raw YAML mapping from a file, with a ConfigError for missing files and YAML syntax errors."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"config file {str(p)!r} does not exist"])
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([f"{p}: invalid YAML: {exc}"]) from None
    return raw


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read, override and validate a run config; relative local paths become absolute."""
    raw = apply_overrides(read_yaml(path), list(overrides))
    return resolve_paths(validate_config(raw))


def _absolute_if_local(value: Optional[str]) -> Optional[str]:
    """Local paths become absolute (the trainer may start elsewhere); hub ids stay as they are."""
    if value is None or value == "chatml" or not _looks_local(value):
        return value
    return os.path.abspath(Path(value).expanduser())


def _looks_local(value: str) -> bool:
    """A path on this host, not a hub id: written as a path or a data file, or there."""
    return (value.startswith((".", "/", "~")) or any(ch in value for ch in "*?[")
            or value.endswith((".jsonl", ".json", ".parquet", ".csv", ".yaml")) or Path(value).expanduser().exists())


def resolve_paths(cfg: RunConfig) -> RunConfig:
    cfg.output_dir = str(Path(cfg.output_dir).expanduser().resolve())
    cfg.model.name_or_path = _absolute_if_local(cfg.model.name_or_path)
    cfg.model.tokenizer = _absolute_if_local(cfg.model.tokenizer)
    cfg.data.path = _absolute_if_local(cfg.data.path)
    for src in cfg.data.mix:
        src.path = _absolute_if_local(src.path)
    cfg.data.eval_path = _absolute_if_local(cfg.data.eval_path)
    for attr in ("cache_dir",):
        value = getattr(cfg.data, attr)
        if value:
            setattr(cfg.data, attr, str(Path(value).expanduser().resolve()))
    if cfg.zero.config:
        cfg.zero.config = str(Path(cfg.zero.config).expanduser().resolve())
    if cfg.train.resume not in ("auto", "never"):
        cfg.train.resume = str(Path(cfg.train.resume).expanduser().resolve())
    return cfg


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML, loadable again by load_config."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def attribute_docstrings(cls: type) -> dict[str, str]:
    """The string literal under each annotated attribute in cls's own body."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {field.target.id: after.value.value for field, after in zip(body, body[1:])
            if isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name)
            and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)}


def field_docs(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, doc) for every field: the README's config reference is generated from it."""
    rows = []
    docs = attribute_docstrings(model)
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(field_docs(ann, dotted + "."))
            continue
        default = "required" if field.is_required() else f"default {field.get_default(call_default_factory=True)!r}"
        rows.append((dotted, default, " ".join(docs.get(name, "").split())))  # docstrings may wrap
    return rows


def fields_markdown() -> str:
    """The README's config reference table (`python -m launcher.contract.config` prints it)."""
    rows = ["| field | default | what it does |", "|---|---|---|"]
    for name, default, doc in field_docs():
        shown = "**required**" if default == "required" else f"`{default[len('default '):]}`"
        rows.append(f"| `{name}` | {shown} | {' '.join(doc.split()).replace('|', '/')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(fields_markdown())
