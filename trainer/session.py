"""One training run on one rank: the objects the loop needs and the steps around it.

setup (config, data, process group) -> build (model, engine, loop) -> resume -> [loop] -> finish
(final checkpoint, Hugging Face export, summary) -> close. Each step is a short method, so the
entry point reads as the list above.
"""
from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
import yaml

from launcher.config import RunConfig, validate_config
from trainer import checkpoint, faults, nonfinite, ops
from trainer.control import StopRequest, write_status
from trainer.data.prepare import Prepared, load_tokenizer, prepare
from trainer.data.sampler import GlobalBatchSampler
from trainer.data.show import format_summary, summary_metrics
from trainer.distributed import Dist, init_distributed
from trainer.export import export_checkpoint, write_hf_metadata
from trainer.flops import model_flops_of, peak_tflops
from trainer.loop import Loop, TrainState, evaluate
from trainer.model import attention_implementation, load_model, lr_lambda, release_zero3_init
from trainer.preflight import run_preflight
from trainer.report import run_summary
from trainer.tracking import NullTracker, make_tracker
from trainer.watchdog import Heartbeat, NoHeartbeat


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


def device_name(device: torch.device) -> str:
    """The accelerator's marketing name (for the peak-FLOPs table), e.g. 'NVIDIA H100 80GB HBM3'."""
    backend = getattr(torch, device.type, None)
    try:
        return backend.get_device_name(device) if hasattr(backend, "get_device_name") else device.type
    except Exception:  # noqa: BLE001 - only used to look up a peak; unknown means no MFU
        return device.type


def _rank_env() -> int:
    return int(os.environ.get("RANK", "0"))


class Session:
    def __init__(self, run_dir: Path, cfg: RunConfig, ds_config: dict, tokenizer, data: Prepared, dist: Dist):
        self.run_dir, self.cfg, self.ds_config = run_dir, cfg, ds_config
        self.tokenizer, self.data, self.dist = tokenizer, data, dist
        self.tracker: NullTracker = make_tracker(dist.is_main, run_dir, cfg.train.max_steps)
        self.engine = None
        self.loop: Optional[Loop] = None
        self.last_saved_step = -1
        self.last_checkpoint: Optional[Path] = None
        self.stopped = False
        self.heartbeat = NoHeartbeat()

    @classmethod
    def from_run_dir(cls, run_dir: Path, preflight_only: bool = False) -> "Session":
        """Config and data before the process group: a bad row fails here, before any GPU waits on a peer."""
        run_dir = run_dir.resolve()
        cfg = validate_config(yaml.safe_load((run_dir / "resolved_config.yaml").read_text()))
        ds_config = json.loads((run_dir / "ds_config.json").read_text())
        tokenizer = data = None
        if not preflight_only:
            torch.manual_seed(cfg.train.seed)
            tokenizer = load_tokenizer(cfg)
            data = prepare(cfg, tokenizer, log=(lambda _msg: None) if _rank_env() else print)
        return cls(run_dir, cfg, ds_config, tokenizer, data, init_distributed(cfg.launch.collective_timeout_s))

    def preflight(self) -> dict:
        """Start this rank's watchdog, then check the job's ranks together before anything heavy loads."""
        launch = self.cfg.launch
        self.heartbeat = Heartbeat(self.run_dir, self.dist.rank, launch.stall_timeout_s, launch.startup_timeout_s).start()
        result = run_preflight(self.run_dir, self.dist, launch.nodes * launch.procs_per_node, self.tracker.message,
                               self.ds_config)
        if self.dist.is_main:
            checkpoint.atomic_write(self.run_dir / "preflight.json", json.dumps(result, indent=1) + "\n")
        return result

    def build(self) -> None:
        """Find the checkpoint to resume from first: a different world size changes how DeepSpeed must load it."""
        import deepspeed
        from torch.optim.lr_scheduler import LambdaLR

        cfg = self.cfg
        ops.build_once_per_node(self.ds_config, self.dist, self.heartbeat.beat, self.tracker.message)
        self.resume_from = checkpoint.find_resume(self.run_dir, cfg.train.resume, self.dist, self.tracker.message)
        self.load_tag = self.resume_from
        if self.resume_from is not None:
            saved_world = checkpoint.manifest(self.resume_from)["world_size"]
            if saved_world != self.dist.world and self.ds_config["zero_optimization"]["stage"] > 0:
                self.tracker.message(f"{self.resume_from.name} was written by {saved_world} ranks, resuming on "
                                     f"{self.dist.world}: loading it through DeepSpeed's universal checkpoint format")
                self.load_tag = checkpoint.universal_copy(self.resume_from, self.tracker.message, self.heartbeat.beat)
                self.ds_config["checkpoint"] = {"load_universal": True}
        model = load_model(cfg, self.ds_config, self.dist.device)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=self.ds_config,
            lr_scheduler=lambda opt: LambdaLR(opt, lr_lambda(cfg)))
        nonfinite.install_guard(self.engine)
        flops = model_flops_of(self.engine.module, self.engine.module.config)
        peak = peak_tflops(device_name(self.dist.device), cfg.train.precision, cfg.launch.peak_tflops)
        t = cfg.train
        self.separation = "varlen" if attention_implementation(cfg, self.dist.device) == "flash_attention_2" else "mask"
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        sampler = GlobalBatchSampler(len(self.data.train), t.global_batch_size, t.seed, cfg.data.shuffle)
        self.loop = Loop(self.engine, self.data.train, sampler, self.dist, t.micro_batch_size, self.pad_id,
                         self.separation, t.max_steps, t.log_every, t.max_bad_steps, self.on_log, self.on_step_end,
                         flops, peak, t.activation_checkpointing is True, self.heartbeat.beat,
                         nonfinite.SkipJudge(nonfinite.dynamic_loss_scaler(self.engine)))

    def on_log(self, step: int, metrics: dict) -> None:
        self.tracker.log(step, metrics)
        self.tracker.progress(step, {"loss": f"{metrics['loss']:.4f}" if metrics.get("loss") is not None else "skipped",
                                     "tok/s": f"{metrics['tokens_per_sec']:,.0f}"})

    def resume(self) -> TrainState:
        state = TrainState()
        ckpt = self.resume_from
        if ckpt is not None:
            self.engine.load_checkpoint(str(self.load_tag.parent), tag=self.load_tag.name, load_optimizer_states=True,
                                        load_lr_scheduler_states=True)
            state = TrainState.from_json(checkpoint.read_state(ckpt))
            same_world = checkpoint.manifest(ckpt)["world_size"] == self.dist.world
            if same_world:
                checkpoint.restore_rng(ckpt, self.dist)
            self.last_saved_step = state.step
            self.tracker.message(f"resumed from {ckpt} at step {state.step}"
                                 + ("" if same_world else " (new world size: RNG streams start fresh)"))
        elif self.cfg.train.resume == "auto":
            self.tracker.message("no complete checkpoint in this run directory: starting from the pretrained weights")
        self.tracker.start(self.cfg, state.step, state.wandb_run_id)
        self.tracker.message(format_summary(self.data.summary))
        self.tracker.log_with_next(summary_metrics(self.data.summary))
        state.wandb_run_id = self.tracker.run_id
        self.stop = StopRequest(self.run_dir)
        write_status(self.run_dir, self.dist, "running", state.step)
        return state

    def on_step_end(self, state: TrainState) -> bool:
        """Eval and periodic saves; a stop request (signal, STOP file, train.stop_at_step) saves and ends."""
        t = self.cfg.train
        self.tracker.progress(state.step)
        if self.data.eval is not None and t.eval_every and state.step % t.eval_every == 0:
            self.tracker.log(state.step, self.evaluate())
        stop = self.stop.agreed(self.dist) or (t.stop_at_step is not None and state.step >= t.stop_at_step)
        if stop and state.step < t.max_steps:
            self.save(state)
            self.stop.clear(self.dist)
            self.stopped = True
            self.tracker.message(f"stopped at step {state.step} on request; relaunch to continue from {self.last_checkpoint}")
            return True
        if t.save_every and state.step % t.save_every == 0 and state.step < t.max_steps:
            self.save(state)
        return False

    def evaluate(self) -> dict:
        self.heartbeat.beat("eval")
        return evaluate(self.engine, self.data.eval, self.dist, self.cfg.train.micro_batch_size, self.pad_id,
                        self.separation)

    def save(self, state: TrainState) -> Path:
        module = self.engine.module

        def extras(ckpt: Path) -> None:
            write_hf_metadata(ckpt, module.config, getattr(module, "generation_config", None), self.tokenizer)

        self.heartbeat.beat("save")
        ckpt = checkpoint.save(self.engine, self.run_dir / "checkpoints", state.step, state.to_json(), self.dist,
                               self.cfg.train.keep_last, extras, self.tracker.message)
        self.last_saved_step = state.step
        self.last_checkpoint = ckpt
        return ckpt

    def finish(self, state: TrainState, started: float) -> int:
        if self.stopped:
            write_status(self.run_dir, self.dist, "stopped", state.step, self.last_checkpoint)
            return 0
        if self.data.eval is not None:
            self.tracker.log(state.step, self.evaluate())
        ckpt = self.run_dir / "checkpoints" / checkpoint.tag_for(state.step)
        if self.last_saved_step != state.step:
            ckpt = self.save(state)
        self.tracker.end_progress()
        final = self.run_dir / "final"
        release_zero3_init()
        self.heartbeat.beat("export")
        if self.dist.is_main:
            faults.slow_down("slow_export", 0, self.dist.rank)
            export_checkpoint(ckpt, final)
            self.tracker.message(run_summary(self.run_dir, started, final, ckpt))
            if self.cfg.train.sample_prompt:
                from trainer.chat import generate

                self.tracker.message(f"sample: {self.cfg.train.sample_prompt!r}\n    -> {generate(str(final), self.cfg.train.sample_prompt, max_new_tokens=64)!r}")
        write_status(self.run_dir, self.dist, "completed", state.step, ckpt)
        return 0

    def fail(self, exc: BaseException) -> None:
        """Record why the run ended, pointing at the checkpoint a relaunch would resume from."""
        last = self.last_checkpoint or (checkpoint.complete_checkpoints(self.run_dir / "checkpoints") or [None])[0]
        hint = f"; the last good checkpoint is {last}" if last else "; there is no checkpoint yet"
        self.tracker.message(f"training stopped: {exc}{hint}")
        write_status(self.run_dir, self.dist, "failed", None, last, reason=str(exc))
        self.heartbeat.stop("failed")

    def close(self) -> None:
        self.heartbeat.stop()
        self.tracker.finish()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
