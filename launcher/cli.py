"""`shardtune` command line: one function per command, each a few lines calling into the layers below.

Commands that need torch (prepare, export, convert, eval, ...) import the trainer inside the command, so
`plan` and `launch` stay instant on a login node. Only the CLI writes run files and starts processes.
"""
from __future__ import annotations

import json as _json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from launcher.arguments import call
from launcher.backends import slurm
from launcher.backends.torchrun import rdzv_endpoint
from launcher.contract.config import RunConfig, dump_config, load_config
from launcher.contract.errors import ConfigError, UserError
from launcher.contract.run_dir import RunDir
from launcher.planning.estimate import estimate_command
from launcher.planning.hub_snapshot import Fetch, continued_run, pin_hub_datasets, pin_hub_models
from launcher.planning.plan import Plan, build_plan, format_plan


def plan(config: str, *overrides: str, json: bool = False) -> None:
    """Show world size, batch arithmetic, the final DeepSpeed config and the launch command."""
    p = planned(load_config(config, [str(o) for o in overrides]), fetch="config")
    print(_json.dumps(p.to_json(), indent=2) if json else format_plan(p))


def planned(cfg: RunConfig, fetch: Fetch, trainer_args: tuple[str, ...] = ()) -> Plan:
    """The plan of a config whose hub models and datasets are pinned to one commit in the local cache
    (hub_snapshot): `fetch` says how much of them is fetched (hub_snapshot.Fetch): config.json for `plan`, every
    check and size but no weights or data for `launch --dry_run`, every file the run reads for `launch` and
    `preflight`. A run continued from its checkpoints keeps the commits it started from. All but `plan` also
    reserve the checkpoints' bytes for a moment where the free space shows room (a quota it does not show)."""
    cfg, notes = pinned(cfg, fetch)
    p = build_plan(cfg, trainer_args=trainer_args, reserve=fetch != "config")
    p.notes[:0] = notes
    return p


def pinned(cfg: RunConfig, fetch: Fetch) -> tuple[RunConfig, list[str]]:
    """The config with its hub models and datasets pinned (hub_snapshot), and a note for each; a run continued
    from its checkpoints keeps the commits it started from."""
    earlier = continued_run(cfg)
    cfg, notes = pin_hub_models(cfg, fetch, earlier)
    cfg, data_notes = pin_hub_datasets(cfg, earlier, fetch)
    return cfg, notes + data_notes


def check_run_dir_free(cfg) -> None:
    """Refuse, before anything is written, to start a second job in a live run's directory, or a fresh run
    (train.resume: never) on top of an earlier run's results."""
    from launcher.backends.owner import describe, live_owner

    run_dir = RunDir(cfg.output_dir)
    owner = live_owner(run_dir)
    if owner is not None:
        raise ConfigError([f"output_dir: {run_dir.path} is in use by {describe(owner)}; stop it first (`shardtune "
                           f"stop {run_dir.path}`) or choose another output_dir"], title="cannot launch")
    previous = run_dir.previous_results()
    if cfg.train.resume == "never" and previous and not cfg.train.overwrite:
        raise ConfigError([f"train.resume: 'never', but output_dir {run_dir.path} holds an earlier run's results "
                           f"({', '.join(p.name for p in previous)}); set train.overwrite: true to move them aside "
                           f"(into replaced-TIME/), or choose another output_dir"], title="cannot launch")


def write_run_files(p: Plan) -> RunDir:
    """The run as planned (resolved config, DeepSpeed config, launch script) in its run directory."""
    run_dir = RunDir(p.config.output_dir)
    run_dir.write_plan(dump_config(p.config), p.deepspeed, p.config.launch.backend, p.script)
    return run_dir


def run_foreground(argv: list[str]) -> int:
    """Run a command in its own process group; Ctrl-C and SIGTERM are passed on, and we wait for it."""
    proc = subprocess.Popen(argv, start_new_session=True)

    def forward(signum, _frame):
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def launch(config: str, *overrides: str, dry_run: bool = False, wait: bool = False) -> None:
    """Write the run files and start training: here (torchrun), per node by hand, or as a SLURM job.

    A hub model and hub datasets are downloaded first. --dry_run writes the run files (naming the commits and
    snapshot directories) and makes every check, but downloads no weights or data: it says how much launch would
    download."""
    cfg = load_config(config, [str(o) for o in overrides])
    check_run_dir_free(cfg)
    p = planned(cfg, fetch="sizes" if dry_run else "all")
    run_dir = write_run_files(p)
    backend = p.config.launch.backend
    script = run_dir.script(backend)
    print(format_plan(p).split("deepspeed config")[0].rstrip())
    print(f"wrote {run_dir.config_file}, {run_dir.ds_config_file.name}, {script.name}")
    if dry_run:
        return
    if backend == "slurm":
        return submit_job(run_dir, wait)
    if p.config.launch.nodes > 1:
        print(f"start `bash {script}` on each of the {p.config.launch.nodes} nodes "
              f"(they meet at {rdzv_endpoint(p.config)})")
        return
    started = time.time()
    code = run_foreground(["bash", str(script)])
    status = run_dir.read_status() or {}
    if code and status.get("state") == "stopped" and status.get("time", 0) >= started:
        # a SIGTERM passed on to torchrun: its agent exits non-zero, while the ranks saved and stopped as asked
        print(f"shardtune: training stopped at step {status.get('step')} on a signal; launch again to continue from "
              f"{status.get('checkpoint')}", file=sys.stderr)
        return
    if code:
        reason = status.get("reason")
        print(f"shardtune: training exited with code {code}" + (f": {reason}" if reason else "; logs above")
              + f" (run directory {run_dir.path})", file=sys.stderr)
        raise SystemExit(code)


def submit_job(run_dir: RunDir, wait: bool) -> None:
    try:
        job_id = slurm.submit(run_dir.script("slurm"))
    except (OSError, RuntimeError) as exc:
        print(f"shardtune: could not submit: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    run_dir.record_job(job_id)
    log = run_dir.slurm_log(job_id)
    print(f"submitted job {job_id}\n  follow it:  tail -f {log}\n  status:     shardtune status {run_dir.path}")
    if wait:
        state = slurm.wait_for(job_id)
        if state != "COMPLETED":
            print(f"shardtune: job {job_id} ended {state}; see {log}", file=sys.stderr)
            raise SystemExit(1)


def preflight(config: str, *overrides: str, wait: bool = True) -> None:
    """Run the start-up checks of a job (versions, shared run directory, collectives, bandwidth) without training.

    It runs as its own small job in OUTPUT_DIR/preflight: on this machine, or on SLURM like the real run.
    """
    cfg = load_config(config, [str(o) for o in overrides])
    cfg.output_dir = str(Path(cfg.output_dir) / "preflight")
    cfg.slurm.max_requeues = 0
    p = planned(cfg, fetch="all", trainer_args=("--preflight",))
    run_dir = write_run_files(p)
    run_dir.preflight_file.unlink(missing_ok=True)
    if p.config.launch.backend == "slurm":
        submit_job(run_dir, wait=True)
    elif p.config.launch.nodes > 1:
        print(f"start `bash {run_dir.script('torchrun')}` on each of the {p.config.launch.nodes} nodes")
        return
    else:
        code = run_foreground(["bash", str(run_dir.script("torchrun"))])
        if code:
            print(f"shardtune: preflight failed (exit {code}); messages above", file=sys.stderr)
            raise SystemExit(code)
    result = _json.loads(run_dir.preflight_file.read_text())
    hosts = sorted({r["host"] for r in result["ranks"]})
    peak = result.get("peak") or {}
    flops = (f"; peak {peak['tflops'] * 1000:,.1f} GFLOP/s per device ({peak['source']})" if peak.get("tflops")
             else "; no peak FLOPs (no MFU)")
    print(f"preflight passed: {len(result['ranks'])} ranks on {', '.join(hosts)}; "
          f"all-reduce bus bandwidth {result['bandwidth']['busbw_gbps']:.2f} GB/s{flops}")


def download(config: str, *overrides: str) -> None:
    """Download what a run reads from the hub (model, tokenizer, datasets) into the Hugging Face cache.

    At the commits `launch` would pin, without planning or launching anything. For a host with the hub ahead of a
    launch from one without it, or to take a 140 GB download off the critical path (a login node's session limit,
    a data-transfer node). `launch` then finds every file there, and offline uses the commits the cache recorded
    for their branches."""
    _, notes = pinned(load_config(config, [str(o) for o in overrides]), "all")
    for note in notes:
        print(note)
    if not notes:
        print("nothing to download: the run's model, tokenizer and data are local paths")


def prepare(config: str, *overrides: str, json: bool = False, show: int = 0) -> None:
    """Tokenize, mask, pack and cache a run config's data ahead of a job; print the summary, or N sequences.

    Run it on a CPU node before a GPU job: the job's ranks then find the cache built (same key), and a bad
    row fails here instead of after a day in the queue. --show N prints the first N sequences of epoch 0
    exactly as the model will see them. --json: one JSON object (the summary); with --show N, N JSON lines
    instead (input_ids, labels with -100 where no loss is taken, position_ids, sample_lengths), and the
    summary goes to stderr.
    """
    cfg = load_config(config, [str(o) for o in overrides])
    cfg, notes = pin_hub_datasets(cfg, continued_run(cfg), fetch="all")
    for note in notes:
        print(note, file=sys.stderr)
    from trainer.data.collate import pad_id_of
    from trainer.data.prepare import check_vocabulary, load_tokenizer
    from trainer.data.prepare import prepare as prepare_data
    from trainer.data.show import first_in_training_order, format_data_summary, format_record, sequence_record

    tokenizer = load_tokenizer(cfg)
    prepared = prepare_data(cfg, tokenizer, log=lambda message: print(message, file=sys.stderr))
    check_vocabulary(cfg, tokenizer, prepared)
    summary = prepared.summary
    if not show:
        print(_json.dumps(summary, indent=2) if json else format_data_summary(summary))
        return
    print(format_data_summary(summary), file=sys.stderr if json else sys.stdout)
    color = sys.stdout.isatty()
    order = first_in_training_order(prepared.train, int(show), cfg.train.seed, cfg.data.shuffle)
    for n, k in enumerate(order, start=1):
        record = sequence_record(prepared.train, int(k), pad_id_of(tokenizer))
        print(_json.dumps(record) if json else "\n" + format_record(record, tokenizer, n, cfg.data.seq_len, color))


def export(checkpoint: str, out_dir: str, dtype: str = "auto", max_shard_size: str = "5GB",
           trust_remote_code: bool = False) -> None:
    """Write a Hugging Face model directory from a checkpoint (a step directory, or a run directory for its newest).

    It reads the checkpoint one tensor at a time and writes safetensors shards of at most --max_shard_size
    (e.g. 5GB, 200MB) as it goes, so memory stays at about one tensor whatever the model's size. A model with
    its own code (trained with model.trust_remote_code) is rebuilt by running the code the checkpoint carries,
    so it needs --trust_remote_code.
    """
    from trainer.tools.export import export_command  # needs torch: imported only for this command

    ckpt, out = export_command(checkpoint, out_dir, dtype, str(max_shard_size), trust_remote_code)
    print(f"exported {ckpt} -> {out}")


def convert(checkpoint: str, workers: int | None = None) -> None:
    """Convert a checkpoint (a step directory, or a run directory for its newest) to DeepSpeed's universal format.

    A run that resumes on a different number of GPUs needs it; converting ahead of the job (e.g. on a CPU
    node) saves that time on the GPUs. The job finds and reuses the result.
    """
    from trainer.checkpoint import universal_copy, verify
    from trainer.tools.export import resolve_checkpoint

    ckpt = resolve_checkpoint(checkpoint)
    problems = verify(ckpt, None)
    if problems:
        raise ConfigError([f"{ckpt} fails verification: {p}" for p in problems[:5]], title="cannot convert")
    print(f"{ckpt} -> {universal_copy(ckpt, print, workers=workers)}")


def eval(target: str, data: str, json: bool = False, out: str | None = None, compare_to: str | None = None,
         max_new_tokens: int = 48, trust_remote_code: bool = False) -> None:
    """Greedy exact match and assistant-token loss of a model (or a run's final/) on a messages file; an answer
    that calls tools is matched against the call as the chat template renders it. --trust_remote_code runs a
    model's own code (one trained with model.trust_remote_code)."""
    from trainer.tools.chat import model_dir_of
    from trainer.tools.exact_match import evaluate_model, format_report

    result = evaluate_model(str(model_dir_of(target)), data, max_new_tokens=max_new_tokens,
                            trust_remote_code=trust_remote_code)
    if compare_to:
        result = {"before": _json.loads(Path(compare_to).read_text()), "after": result}
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(_json.dumps(result, indent=2) + "\n")
    print(_json.dumps(result, indent=2) if json else format_report(result))


def generate(target: str, prompt: str, system: str | None = None, max_new_tokens: int = 256,
             trust_remote_code: bool = False) -> None:
    """One answer to one prompt, for scripts."""
    from trainer.tools.chat import generate as generate_reply

    print(generate_reply(target, prompt, system, max_new_tokens, trust_remote_code))


def chat(target: str, system: str | None = None, max_new_tokens: int = 256, trust_remote_code: bool = False) -> None:
    """Talk to a model (or a run's final/) in the terminal, with its chat template."""
    from trainer.tools.chat import chat as chat_loop

    chat_loop(target, system, max_new_tokens, trust_remote_code)


def status(run_dir: str, json: bool = False) -> None:
    """Job state, restarts, last step, loss and throughput, and the newest complete checkpoint of a run."""
    from launcher.backends.status import collect, format_status

    path = Path(run_dir)
    if not path.is_dir():
        raise ConfigError([f"{run_dir}: no such run directory"], title="cannot show status")
    info = collect(RunDir(path))
    print(_json.dumps(info, indent=2) if json else format_status(info))


def report(run_dir: str) -> None:
    """PNG plots of loss, lr, throughput and memory from metrics.jsonl, and a short summary (no wandb needed)."""
    from trainer.summary import format_run_summary, summarize
    from trainer.tools.report import write_plots

    run = RunDir(run_dir)
    if not run.metrics_file.exists():
        raise ConfigError([f"{run_dir}: no {run.metrics_file.name} (has the run logged a step yet?)"],
                          title="cannot report")
    print(format_run_summary(summarize(run.read_metrics())))
    for path in write_plots(run):
        print(f"wrote {path}")


def stop(run_dir: str) -> None:
    """Ask a running job to save a checkpoint and stop (every rank sees the STOP file within a step)."""
    run = RunDir(run_dir)
    run.request_stop()
    print(f"asked {run_dir} to stop; it saves a checkpoint first ({run.status_file.name} will say 'stopped')")


COMMANDS = {"plan": plan, "launch": launch, "estimate": estimate_command, "export": export, "convert": convert,
            "eval": eval, "generate": generate, "chat": chat, "status": status, "stop": stop,
            "prepare": prepare, "report": report, "preflight": preflight, "download": download}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `shardtune` console script: the command's exit code (estimate returns one)."""
    try:
        code = call(COMMANDS, sys.argv[1:] if argv is None else argv)
    except UserError as exc:
        print(f"shardtune: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    except BrokenPipeError:  # `shardtune plan ... | head` is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except SystemExit as exc:  # usage errors, --help, and commands' exit codes
        return exc.code if isinstance(exc.code, int) else 1
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
