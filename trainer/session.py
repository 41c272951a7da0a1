"""One training run on one rank: the objects the loop needs and the steps around it.

setup (config, data, process group) -> build (model, engine, loop) -> resume -> [loop] -> finish
(final checkpoint, Hugging Face export, summary) -> close. Each step is a short method, so the
entry point reads as the list above.
"""
from __future__ import annotations

import gc
import logging
import os
import socket
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch

from launcher.backends import owner
from launcher.contract.config import RunConfig, validate_config
from launcher.contract.errors import UserError
from launcher.contract.run_dir import HF, RunDir
from launcher.planning.checkpoint_size import DiskNeed, disk_need
from launcher.planning.compile_choice import EXPERTS_NOT_VERIFIED
from launcher.planning.memory_plan import host_need, recurring_pinned_bytes
from launcher.planning.model_files import absent_weights
from launcher.planning.model_size import parameter_count, read_model_config
from launcher.planning.moe_settings import compile_problem
from trainer import activation_memory, checkpoint, host_memory, moe, nonfinite, ops, separation, sequence_parallel
from trainer.checkpoint_io import Manifests, engine_loads
from trainer.control import StopRequest
from trainer.data.collate import Separation, pad_id_of
from trainer.data.prepare import Prepared, check_vocabulary, load_tokenizer, prepare
from trainer.data.sampler import GlobalBatchSampler
from trainer.data.show import format_data_summary, summary_metrics
from trainer.distributed import Dist, barrier, broadcast_object, init_distributed
from trainer.export import export_engine
from trainer.faults import FaultHooks
from trainer.flops import model_flops_of
from trainer.loop import Loop, TrainState, held_out_loss
from trainer.loss import LossFn, full_logits_loss, prepare_loss
from trainer.mapped_loads import mapped_files
from trainer.metrics import Window
from trainer.model import (
    causal_lm_class,
    compile_model,
    flash_attention_usable,
    gather_layers_whole,
    load_model,
    lr_lambda,
    model_attention,
    release_zero3_init,
    set_training,
)
from trainer.preflight import run_preflight
from trainer.shard_writer import ShardWriter
from trainer.summary import end_of_run_summary
from trainer.tracking import NullTracker, make_tracker
from trainer.watchdog import ATTEMPT, Heartbeat, IOProgress, NoHeartbeat


def setup_logging(is_main: bool) -> None:
    """Rank 0 speaks; other ranks only report errors (a quiet log at 1,000 GPUs is a readable one)."""
    level = logging.WARNING if is_main else logging.ERROR
    # DeepSpeed calls torch.distributed functions torch has deprecated; one warning per call is noise.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    for name in ("DeepSpeed", "deepspeed", "transformers", "datasets", "torch.distributed"):
        logging.getLogger(name).setLevel(level)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity(level)
    hf_logging.disable_progress_bar()


def failure_reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


def record_failure(run_dir: RunDir, rank: int, reason: str) -> None:
    """This rank's failure in the run's event log, where the launcher's post-mortem finds why the job ended.

    The log, not rank 0's stderr, is what always reaches the user: once one rank has exited, torchrun kills the
    others, rank 0 included, maybe before its own message is out."""
    try:
        run_dir.record_event({"rank": rank, "host": socket.gethostname(), "pid": os.getpid(), "attempt": ATTEMPT,
                              "event": "failed", "reason": reason})
    except OSError:
        pass


def _rank_env() -> int:
    return int(os.environ.get("RANK", "0"))


class Session:
    """One rank's run: the objects the loop needs, and the steps before and after it."""

    def __init__(self, run_dir: RunDir, cfg: RunConfig, ds_config: dict, tokenizer, data: Optional[Prepared],
                 dist: Dist):
        self.run_dir, self.cfg, self.ds_config = run_dir, cfg, ds_config
        self.tokenizer, self.data, self.dist = tokenizer, data, dist
        self.tracker: NullTracker = make_tracker(dist.is_main, run_dir, cfg.train.max_steps)
        self.heartbeat: NoHeartbeat = NoHeartbeat()
        self.faults = FaultHooks(dist.rank)
        self.stop = StopRequest(run_dir)
        self.engine = None
        self.loop: Optional[Loop] = None
        self.resume_from: Optional[Path] = None
        """The complete checkpoint this launch continues from (None: the pretrained weights)."""
        self.load_tag: Optional[Path] = None
        """Where DeepSpeed loads it from: the checkpoint itself, or its universal copy on a new world size."""
        self.manifests = Manifests()
        """Both, as verified by every rank: what each file a load reads is checked against."""
        self.separation: Separation = "positions"
        self.sp = sequence_parallel.SequenceParallel()
        self.loss: LossFn = full_logits_loss
        self.pad_id: Optional[int] = None
        self.writer = None
        """The checkpoint engine every save goes through (trainer/shard_writer.py), installed in build()."""
        self.pending: Optional[checkpoint.PendingSave] = None
        """A checkpoint being written in the background (train.async_save), not yet committed."""
        self.last_saved_step = -1
        self.last_checkpoint: Optional[Path] = None
        self.stopped: Optional[str] = None  # why the run stopped before max_steps: "signal" or "request"
        self.finished = False
        """The run ended normally (completed or stopped on request): its directory is free again."""
        self.peak: dict = {"tflops": None, "source": "none"}
        """The device peak MFU is computed against, from preflight (configured, data sheet or probed)."""

    @classmethod
    def from_run_dir(cls, path: Path, preflight_only: bool = False) -> Session:
        """Config and data before the process group: a bad row fails here, before any GPU waits on a peer."""
        run_dir = RunDir(path.resolve())
        cfg = validate_config(run_dir.read_config())
        ds_config = run_dir.read_ds_config()
        tokenizer = data = None
        if not preflight_only:
            torch.manual_seed(cfg.train.seed)
            missing = absent_weights(cfg.model.name_or_path)
            if missing:  # a dry run's snapshot: before the tokenizer, whose files it lacks too
                raise UserError(f"model.name_or_path: {cfg.model.name_or_path} {missing}")
            tokenizer = load_tokenizer(cfg)
            data = prepare(cfg, tokenizer, log=(lambda _msg: None) if _rank_env() else print)
            check_vocabulary(cfg, tokenizer, data)
        ops.wait_for_builds()
        return cls(run_dir, cfg, ds_config, tokenizer, data, init_distributed(cfg.launch.collective_timeout_s))

    def preflight(self) -> dict:
        """Start this rank's watchdog, then check the job's ranks together before anything heavy loads."""
        launch = self.cfg.launch
        self.heartbeat = Heartbeat(self.run_dir, self.dist.rank, launch.stall_timeout_s,
                                   launch.startup_timeout_s).start()
        host = host_need(self.cfg, read_model_config(self.cfg.model.name_or_path), self.ds_config)
        result = run_preflight(self.run_dir, self.dist, launch.world_size, self.tracker.message, self.ds_config,
                               self.cfg.train.precision, launch.peak_tflops, self.disk_need(),
                               self.cfg.model.name_or_path, host)
        self.tracker.preflight_result(result)
        self.peak = result["peak"]
        self.own_run_dir()
        return result

    def disk_need(self) -> Optional[DiskNeed]:
        """The run's checkpoints and export on its filesystem, as `plan` sized them; None for a model whose
        config.json cannot be read or sized."""
        model_cfg = read_model_config(self.cfg.model.name_or_path)
        params = parameter_count(model_cfg)
        return None if params is None else disk_need(self.cfg, params, model_cfg, self.run_dir)

    def own_run_dir(self) -> None:
        """One job per run directory: rank 0 claims it for this job (requeues and restarts are the same job)."""
        holder = owner.claim(self.run_dir, self.tracker.message) if self.dist.is_main else None
        holder = broadcast_object(holder)
        if holder is not None:
            raise checkpoint.CheckpointError(f"{self.run_dir.path} is in use by {owner.describe(holder)}; this job "
                                             f"does not start (stop the other one, or use another output_dir)")
        t = self.cfg.train
        if t.resume == "never":
            previous = [p.name for p in self.run_dir.previous_results()] if self.dist.is_main else None
            previous = broadcast_object(previous)
            if previous and not t.overwrite:
                raise checkpoint.CheckpointError(f"train.resume: never, but {self.run_dir.path} holds an earlier "
                                                 f"run's results ({', '.join(previous)}); set train.overwrite: true "
                                                 f"to move them aside, or use another output_dir")
            if previous and self.dist.is_main:
                self.tracker.message(f"train.overwrite: moved the earlier run's results to {self.run_dir.set_aside()}")
            barrier()

    def build(self) -> None:
        """Find the checkpoint to resume from first: a different world size changes how DeepSpeed must load it."""
        import deepspeed
        from torch.optim.lr_scheduler import LambdaLR

        cfg, t = self.cfg, self.cfg.train
        recurring = recurring_pinned_bytes(cfg, read_model_config(cfg.model.name_or_path), self.ds_config)
        if (line := host_memory.limit_pinned_rounding(self.dist.device, recurring)) is not None:  # before any pinning
            self.tracker.message(line)
        ops.build_once_per_node(self.ds_config, self.dist, self.heartbeat.beat, self.tracker.message)
        self.resume_from = checkpoint.find_resume(self.run_dir, t.resume, self.dist, self.tracker.message,
                                                  self.manifests)
        self.load_tag = self.resume_from
        if self.resume_from is not None:
            saved_world = checkpoint.manifest(self.resume_from)["world_size"]
            if saved_world != self.dist.world and self.ds_config["zero_optimization"]["stage"] > 0:
                self.tracker.message(f"{self.resume_from.name} was written by {saved_world} ranks, resuming on "
                                     f"{self.dist.world}: loading it through DeepSpeed's universal checkpoint format")
                self.load_tag = checkpoint.universal_copy(self.resume_from, self.tracker.message, self.heartbeat.beat,
                                                          into=self.run_dir.checkpoints)
                with IOProgress(self.heartbeat, "verify checkpoint"):
                    checkpoint.verify_universal_copy(self.load_tag, self.resume_from, self.dist,
                                                     self.tracker.message, self.manifests)
                self.ds_config["checkpoint"] = {"load_universal": True}
        self.sp = sequence_parallel.setup(cfg, self.dist, flash_attention_usable(cfg, self.dist.device))
        with IOProgress(self.heartbeat, "load model"):
            packs = any(d is not None and d.packs_samples for d in (self.data.train, self.data.eval))
            attention = self.sp.attention or model_attention(cfg, self.dist.device, packs)
            model = load_model(cfg, self.ds_config, self.dist.device, attention)
            native = causal_lm_class(cfg) is not None
            self.separation = separation.separation_for(attention, self.sp.size, native)
            if self.separation == "positions":
                separation.install_mask_builder(model)
            if self.sp.size > 1:
                sequence_parallel.require_split_attention(model, self.sp)
            self.loss = prepare_loss(model, t.chunked_loss, self.tracker.message)
            offload = activation_memory.install(model, cfg, self.tracker.message)
            stage = self.ds_config["zero_optimization"]["stage"]
            # DeepSpeed reads ZeRO-3 leaf flags inside initialize: set them between building and initialize.
            blocks = (moe.register_leaf_modules(model, cfg.model.moe_leaf_modules) if stage == 3
                      else moe.moe_block_classes(model))
            if blocks and (problem := compile_problem(cfg)) is not None:
                raise UserError(problem)  # a model the plan could not size
            compiling = t.compile is True or (t.compile == "auto" and not blocks)
            if compiling and stage == 3 and not gather_layers_whole(model):
                compiling = False
                self.tracker.message(f"train.compile -> false: {type(model).__name__} has no decoder layers "
                                     "(get_decoder().layers) to compile one at a time at ZeRO-3")
            router_aux = moe.router_aux_loss(model, cfg.model.router_aux_loss_coef, self.dist.world)
            if (line := moe.describe(blocks, router_aux, stage)) is not None:
                self.tracker.message(line)
            ops.skip_unused_muon(self.ds_config)
            self.engine, _, _, _ = deepspeed.initialize(
                model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                config=self.ds_config, lr_scheduler=lambda opt: LambdaLR(opt, lr_lambda(cfg)), mpu=self.sp.mpu)
            host_memory.release_freed_pinned(self.dist.device)
            # from_pretrained returns the model in eval mode, and DeepSpeed leaves it there: without this it trained
            # with activation checkpointing inert (transformers checkpoints only in training mode), dropout off and
            # the `kernels` library's inference kernels. The one real mode switch (it re-kernelizes for training):
            # later evaluations flip only the flags (set_training).
            self.engine.train()
            form = self.verify_packing(model, native) if packs and self.sp.size == 1 else None
            self.tracker.message(separation.describe(attention, self.separation, form, remote=not native))
        if t.compile == "auto" and blocks:
            self.tracker.message(f"train.compile=auto -> false: {EXPERTS_NOT_VERIFIED}")
        if compiling:
            how = compile_model(self.engine, self.dist.device, stage)
            self.tracker.message(f"train.compile: {how}; the first steps include compiling it")
        self.tracker.log_with_next({"compiled": compiling})
        nonfinite.install_guard(self.engine)
        self.writer = ShardWriter(self.engine._config, snapshot_first=t.async_save)
        self.engine.checkpoint_engine = self.writer
        self.pad_id = pad_id_of(self.tokenizer)
        # A compiled model sees one batch shape: otherwise every packed width and mask/no-mask variant recompiles.
        self.width = cfg.data.seq_len if compiling else None
        # The first metrics row says what MFU is measured against.
        self.tracker.log_with_next({"peak_tflops": self.peak["tflops"], "peak_tflops_source": self.peak["source"]})
        window = Window(self.dist, model_flops_of(self.engine.module, self.engine.module.config), self.peak["tflops"],
                        recompute=t.recomputes)
        self.loop = Loop(
            engine=self.engine, data=self.data.train, dist=self.dist, micro_batch_size=t.micro_batch_size,
            sampler=GlobalBatchSampler(len(self.data.train), t.global_batch_size, t.seed, cfg.data.shuffle),
            pad_id=self.pad_id, separation=self.separation, max_steps=t.max_steps, log_every=t.log_every,
            max_bad_steps=t.max_bad_steps, window=window, on_log=self.on_log, on_step_end=self.on_step_end,
            heartbeat=self.heartbeat, faults=self.faults,
            skip_judge=nonfinite.SkipJudge(nonfinite.dynamic_loss_scaler(self.engine)), router_aux=router_aux,
            loss=self.loss, sp=self.sp, activation_offload=offload, width=self.width)

    def verify_packing(self, model, native: bool) -> str:
        """Measure that packed samples stay apart before the first step (trainer/separation.py): a model transformers
        implements in the form chosen for it, remote code in the first form that works (its batches then carry
        that form). Stops before training, naming data.packing, when none does."""
        config = model.config.get_text_config().to_dict()
        forms = ((self.separation,) if native
                 else separation.remote_forms(self.separation, config, self.cfg.data.seq_len))
        dtype = model.get_input_embeddings().weight.dtype
        set_training(self.engine, False)
        with torch.no_grad():
            found = separation.verify_form(model, lambda inputs: self.engine(**inputs).logits, self.dist.device,
                                           dtype, forms)
        set_training(self.engine, True)
        form, distances = broadcast_object(found)  # one decision for every rank's batches
        if form is None:
            tried = ", ".join(f"{separation.FORM_NAMES[name]} {distance:.2f}" for name, distance in distances.items())
            if native:
                why = (": some of its layers carry state along the row, which no mask stops (recurrent, "
                       "linear-attention or state-space layers)")
            else:
                why = " in every form shardtune can hand it (remote code)"
                if forms == ("positions",):
                    why += ("; masks are not tried: they would override a sliding window that samples of "
                            "data.seq_len tokens can outgrow")
            raise UserError(
                f"data.packing: true, but {type(model).__name__} lets the samples packed into one row attend to each "
                f"other{why}. Each sample's logits strayed from that sample's alone by {tried}, as a fraction of "
                f"how far they stray with nothing keeping the samples apart (at most {separation.agreement(dtype):.2g} "
                f"passes in {str(dtype).removeprefix('torch.')}). "
                "Set data.packing: false to train one sample per row")
        if form == "additive":
            separation.install_additive_mask(model, dtype)
        if form == "positions":
            self.separation = "positions"
        return form

    def on_log(self, step: int, metrics: dict) -> None:
        self.tracker.log(step, metrics)
        self.tracker.progress(step, {"loss": f"{metrics['loss']:.4f}" if metrics.get("loss") is not None else "skipped",
                                     "tok/s": f"{metrics['tokens_per_sec']:,.0f}"})

    def resume(self) -> TrainState:
        state = TrainState()
        ckpt = self.resume_from
        if ckpt is not None:
            self.writer.manifests = self.manifests
            self.faults.verified(ckpt, self.dist.rank)
            with (IOProgress(self.heartbeat, "load checkpoint"),
                  engine_loads(self.manifests, self.writer.mapped, self.engine.optimizer)):
                loaded, _ = self.engine.load_checkpoint(str(self.load_tag.parent), tag=self.load_tag.name,
                                                        load_optimizer_states=True, load_lr_scheduler_states=True)
            if loaded is None:
                raise checkpoint.CheckpointError(f"{ckpt}: DeepSpeed loaded nothing from it; refusing to train on the "
                                                 f"pretrained weights under its step counter")
            self.writer.mapped.take_states(self.engine.optimizer)
            self.warn_of_mapped_files()
            saved = checkpoint.read_state(ckpt)
            checkpoint.check_fingerprint(ckpt, saved.pop("fingerprint", None),
                                         checkpoint.state_fingerprint(self.engine, self.dist))
            state = TrainState.from_json(saved)
            same_world = checkpoint.manifest(ckpt)["world_size"] == self.dist.world
            if same_world:
                checkpoint.restore_rng(ckpt, self.dist)
            self.last_saved_step = state.step
            self.tracker.message(f"resumed from {ckpt} at step {state.step}"
                                 + ("" if same_world else " (new world size: RNG streams start fresh)"))
        elif self.cfg.train.resume == "auto":
            self.tracker.message("no complete checkpoint in this run directory: starting from the pretrained weights")
        self.tracker.start(self.cfg, state.step, state.wandb_run_id)
        self.tracker.message(format_data_summary(self.data.summary))
        self.tracker.log_with_next(summary_metrics(self.data.summary))
        state.wandb_run_id = self.tracker.run_id
        self.stop.listen()
        self.tracker.status("running", state.step)
        return state

    def warn_of_mapped_files(self) -> None:
        """A checkpoint file still mapped after the resume is one DeepSpeed kept a tensor of, unforeseen: its disk
        space would outlive its deletion (train.keep_last) until the run ends."""
        gc.collect()  # the loaded states DeepSpeed dropped may sit in reference cycles
        left = [path for ckpt in dict.fromkeys([self.resume_from.parent, self.load_tag.parent])
                for path in mapped_files(ckpt)]
        if left:
            print(f"shardtune: warning: rank {self.dist.rank} still maps {len(left)} checkpoint file(s) after "
                  f"resuming ({', '.join(left[:3])}): their disk space is not freed when they are deleted, until "
                  f"this run ends", file=sys.stderr, flush=True)

    def on_step_end(self, state: TrainState) -> bool:
        """Eval and periodic saves; a stop request (signal, STOP file, train.stop_at_step) saves and ends."""
        t = self.cfg.train
        self.tracker.progress(state.step)
        if self.pending is not None and checkpoint.durable_everywhere(self.writer, self.dist):
            self.commit_pending()
        if self.data.eval is not None and t.eval_every and state.step % t.eval_every == 0:
            self.tracker.log(state.step, self.eval_held_out())
        stop = self.stop.agreed(self.dist)
        if stop is None and t.stop_at_step is not None and state.step >= t.stop_at_step:
            stop = "request"
        if stop and state.step < t.max_steps:
            self.save(state)
            self.stop.clear(self.dist)
            self.stopped = stop
            self.tracker.message(f"stopped at step {state.step} on {'a signal' if stop == 'signal' else 'request'}; "
                                 f"relaunch to continue from {self.last_checkpoint}")
            return True
        if t.save_every and state.step % t.save_every == 0 and state.step < t.max_steps:
            if t.async_save:
                self.begin_save(state)
            else:
                self.save(state)
        return False

    def eval_held_out(self) -> dict:
        self.heartbeat.beat("eval")
        return held_out_loss(self.engine, self.data.eval, self.dist, self.cfg.train.micro_batch_size, self.pad_id,
                             self.separation, self.loss, self.sp, self.heartbeat, self.width)

    def _write_extras(self, ckpt: Path, write_file) -> None:
        checkpoint.write_hf_metadata(ckpt, self.engine.module, self.tokenizer, write_file)

    def _save_progress(self, step: int):
        def progress(nbytes: int) -> None:
            self.heartbeat.beat("save")
            self.faults.writing(step, nbytes)

        return progress

    def saved_state(self, state: TrainState) -> dict:
        """The trainer's counters, and the fingerprint a resume checks the loaded state against."""
        return {**state.to_json(), "fingerprint": checkpoint.state_fingerprint(self.engine, self.dist)}

    def begin_save(self, state: TrainState) -> None:
        """Start writing a checkpoint in the background; it is committed at a later step end once durable."""
        self.commit_pending()
        self.heartbeat.beat("save")
        self.pending = checkpoint.begin_save(self.engine, self.writer, self.run_dir.checkpoints, state.step,
                                             self.saved_state(state), self.dist, self._write_extras,
                                             self._save_progress(state.step), self.heartbeat.beat, background=True)
        self.last_saved_step = state.step

    def commit_pending(self) -> None:
        """Wait for the background save (if any) to be durable on every rank, then make it the one in charge."""
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        self.heartbeat.beat("save")
        measured = checkpoint.commit(pending, self.writer, self.run_dir.checkpoints, self.dist,
                                     self.cfg.train.keep_last, self.tracker.message, self.heartbeat.beat, self.faults)
        self.tracker.log_with_next(measured)
        self.last_checkpoint = pending.ckpt

    def save(self, state: TrainState) -> Path:
        """Write and commit a checkpoint now (stop requests, the end, and every save without async_save)."""
        self.commit_pending()
        self.heartbeat.beat("save")
        ckpt, measured = checkpoint.save(self.engine, self.writer, self.run_dir.checkpoints, state.step,
                                         self.saved_state(state), self.dist, self.cfg.train.keep_last,
                                         self._write_extras,
                                         self.tracker.message, self._save_progress(state.step), self.heartbeat.beat,
                                         self.faults)
        self.tracker.log_with_next(measured)
        self.last_saved_step = state.step
        self.last_checkpoint = ckpt
        return ckpt

    def finish(self, state: TrainState, started: float) -> int:
        if self.stopped:
            self.tracker.flush(state.step)
            self.tracker.status("stopped", state.step, self.last_checkpoint, stopped_by=self.stopped)
            self.finished = True
            return 0
        if self.data.eval is not None:
            self.tracker.log(state.step, self.eval_held_out())
        ckpt = self.run_dir.checkpoint(state.step)
        self.commit_pending()
        if self.last_saved_step != state.step:
            ckpt = self.save(state)
        self.tracker.flush(state.step)
        self.tracker.end_progress()
        # Every rank takes part in the export (each parameter is gathered once, rank 0 writes it), so no rank
        # waits at a collective for longer than the work it waits for.
        self.faults.exporting()
        self.heartbeat.beat("export")
        release_zero3_init()  # the export's model skeleton must be built whole, not partitioned by zero.Init
        export_engine(self.engine, ckpt / HF, self.run_dir.final, self.dist.is_main, dtype="auto",
                      max_shard_size=self.cfg.train.export_max_shard_size,
                      progress=lambda n: (self.heartbeat.beat("export"), self.faults.export_written(n)),
                      trust_remote_code=self.cfg.model.trust_remote_code)
        if self.dist.is_main:
            self.tracker.message(end_of_run_summary(self.run_dir, started, self.run_dir.final, ckpt))
        self.tracker.status("completed", state.step, ckpt)
        self.finished = True
        if self.dist.is_main and self.cfg.train.sample_prompt:
            self.sample_reply(self.cfg.train.sample_prompt)
        return 0

    def sample_reply(self, prompt: str) -> None:
        """The exported model's answer to `train.sample_prompt`, on rank 0's CPU, after the run is complete: an
        extra that must not fail (or, at 70B, outlast the watchdog) a run whose model is already written."""
        from trainer.generation import generate_reply

        self.heartbeat.stop("completed")  # CPU generation gives no beats between tokens
        try:
            self.faults.sampling()
            reply = generate_reply(str(self.run_dir.final), prompt, max_new_tokens=64, dtype="auto",
                                   trust_remote_code=self.cfg.model.trust_remote_code)
        except Exception as exc:  # noqa: BLE001 - reported; the run stays completed
            self.tracker.message(f"sample: not generated ({type(exc).__name__}: {exc}); the run is complete")
            return
        self.tracker.message(f"sample: {prompt!r}\n    -> {reply!r}")

    def fail(self, exc: BaseException) -> None:
        """Record why the run ended, pointing at the checkpoint a relaunch would resume from."""
        last = self.last_checkpoint or (self.run_dir.complete_checkpoints() or [None])[0]
        hint = f"; the last good checkpoint is {last}" if last else "; there is no checkpoint yet"
        self.tracker.message(f"training stopped: {exc}{hint}")
        self.tracker.status("failed", None, last, reason=str(exc))
        reason = failure_reason(exc)
        self.heartbeat.stop("failed", reason)
        record_failure(self.run_dir, self.dist.rank, reason)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.dist.is_main and self.finished:
            owner.release(self.run_dir)
        self.heartbeat.stop()
        self.faults.exiting()
        self.tracker.finish()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
