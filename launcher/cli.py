"""`shardtune` command line: each command is a few lines that call into the launcher's modules.

Commands that need torch (prepare, export, eval, ...) import the trainer inside the command, so
`plan` and `launch` stay instant on a login node.
"""
from __future__ import annotations

import functools
import json as _json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

import fire

from launcher import slurm
from launcher.config import dump_config, load_config
from launcher.errors import ConfigError
from launcher.estimate import estimate_command
from launcher.prepare_cmd import prepare_command
from launcher.plan import build_plan, format_plan
from launcher.torchrun import rdzv_endpoint


def plan(config: str, *overrides: str, json: bool = False) -> None:
    """Show world size, batch arithmetic, the final DeepSpeed config and the launch command."""
    p = build_plan(load_config(config, [str(o) for o in overrides]))
    print(_json.dumps(p.to_json(), indent=2) if json else format_plan(p))


def write_run_files(p) -> Path:
    """resolved_config.yaml, ds_config.json and launch.sh or launch.sbatch in the run directory."""
    run_dir = Path(p.config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "resolved_config.yaml").write_text(dump_config(p.config))
    (run_dir / "ds_config.json").write_text(_json.dumps(p.deepspeed, indent=2) + "\n")
    script = run_dir / ("launch.sbatch" if p.config.launch.backend == "slurm" else "launch.sh")
    script.write_text(p.script)
    script.chmod(0o755)
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
    """Write the run files and start training: here (torchrun), per node by hand, or as a SLURM job."""
    p = build_plan(load_config(config, [str(o) for o in overrides]))
    run_dir = write_run_files(p)
    print(format_plan(p).split("deepspeed config")[0].rstrip())
    print(f"wrote {run_dir}/resolved_config.yaml, ds_config.json, {Path(p.command[-1]).name if p.config.launch.backend == 'slurm' else 'launch.sh'}")
    if dry_run:
        return
    if p.config.launch.backend == "slurm":
        return submit_job(run_dir, wait)
    if p.config.launch.nodes > 1:
        print(f"start `bash {run_dir}/launch.sh` on each of the {p.config.launch.nodes} nodes "
              f"(they meet at {rdzv_endpoint(p.config)})")
        return
    code = run_foreground(["bash", str(run_dir / "launch.sh")])
    if code:
        print(f"shardtune: training exited with code {code}; logs above, run directory {run_dir}", file=sys.stderr)
        raise SystemExit(code)


def submit_job(run_dir: Path, wait: bool) -> None:
    try:
        job_id = slurm.submit(run_dir / "launch.sbatch")
    except (OSError, RuntimeError) as exc:
        print(f"shardtune: could not submit: {exc}", file=sys.stderr)
        raise SystemExit(1)
    slurm.record_job(run_dir, job_id)
    print(f"submitted job {job_id}\n  follow it:  tail -f {run_dir}/slurm-{job_id}.out\n  status:     shardtune status {run_dir}")
    if wait:
        state = slurm.wait_for(job_id)
        if state != "COMPLETED":
            print(f"shardtune: job {job_id} ended {state}; see {run_dir}/slurm-{job_id}.out", file=sys.stderr)
            raise SystemExit(1)


def preflight(config: str, *overrides: str, wait: bool = True) -> None:
    """Run the start-up checks of a job (versions, shared run directory, collectives, bandwidth) without training.

    It runs as its own small job in OUTPUT_DIR/preflight: on this machine, or on SLURM like the real run.
    """
    cfg = load_config(config, [str(o) for o in overrides])
    cfg.output_dir = str(Path(cfg.output_dir) / "preflight")
    cfg.slurm.max_requeues = 0
    p = build_plan(cfg, trainer_args=("--preflight",))
    run_dir = write_run_files(p)
    (run_dir / "preflight.json").unlink(missing_ok=True)
    if p.config.launch.backend == "slurm":
        submit_job(run_dir, wait=True)
    elif p.config.launch.nodes > 1:
        print(f"start `bash {run_dir}/launch.sh` on each of the {p.config.launch.nodes} nodes")
        return
    else:
        code = run_foreground(["bash", str(run_dir / "launch.sh")])
        if code:
            print(f"shardtune: preflight failed (exit {code}); messages above", file=sys.stderr)
            raise SystemExit(code)
    result = _json.loads((run_dir / "preflight.json").read_text())
    hosts = sorted({r["host"] for r in result["ranks"]})
    print(f"preflight passed: {len(result['ranks'])} ranks on {', '.join(hosts)}; "
          f"all-reduce bus bandwidth {result['bandwidth']['busbw_gbps']:.2f} GB/s")


def export(checkpoint: str, out_dir: str, dtype: str = "auto") -> None:
    """Write a Hugging Face model directory from a checkpoint (a step directory, or a run directory for its newest)."""
    from trainer.export import export_checkpoint, resolve_checkpoint  # needs torch: imported only for this command

    try:
        ckpt = resolve_checkpoint(checkpoint)
    except FileNotFoundError as exc:
        raise ConfigError([str(exc)], title="cannot export") from None
    print(f"exported {ckpt} -> {export_checkpoint(ckpt, out_dir, dtype)}")


def convert(checkpoint: str, workers: int | None = None) -> None:
    """Convert a checkpoint (a step directory, or a run directory for its newest) to DeepSpeed's universal format.

    A run that resumes on a different number of GPUs needs it; converting ahead of the job (e.g. on a CPU
    node) saves that time on the GPUs. The job finds and reuses the result.
    """
    from trainer.checkpoint import universal_copy, verify
    from trainer.export import resolve_checkpoint

    try:
        ckpt = resolve_checkpoint(checkpoint)
    except FileNotFoundError as exc:
        raise ConfigError([str(exc)], title="cannot convert") from None
    problems = verify(ckpt, None)
    if problems:
        raise ConfigError([f"{ckpt} fails verification: {p}" for p in problems[:5]], title="cannot convert")
    print(f"{ckpt} -> {universal_copy(ckpt, print, workers=workers)}")


def eval(target: str, data: str, json: bool = False, out: str | None = None, compare_to: str | None = None,
         max_new_tokens: int = 48) -> None:
    """Greedy exact match and assistant-token loss of a model (or a run's final/) on a messages file."""
    from trainer.chat import model_dir_of
    from trainer.evaluate import evaluate_model, format_report

    result = evaluate_model(str(model_dir_of(target)), data, max_new_tokens=max_new_tokens)
    if compare_to:
        result = {"before": _json.loads(Path(compare_to).read_text()), "after": result}
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(_json.dumps(result, indent=2) + "\n")
    print(_json.dumps(result, indent=2) if json else format_report(result))


def generate(target: str, prompt: str, system: str | None = None, max_new_tokens: int = 256) -> None:
    """One answer to one prompt, for scripts."""
    from trainer.chat import generate as generate_reply

    print(generate_reply(target, prompt, system, max_new_tokens))


def chat(target: str, system: str | None = None, max_new_tokens: int = 256) -> None:
    """Talk to a model (or a run's final/) in the terminal, with its chat template."""
    from trainer.chat import chat as chat_loop

    chat_loop(target, system, max_new_tokens)


def status(run_dir: str, json: bool = False) -> None:
    """Job state, restarts, last step, loss and throughput, and the newest complete checkpoint of a run."""
    from launcher.status import collect, format_status

    path = Path(run_dir)
    if not path.is_dir():
        raise ConfigError([f"{run_dir}: no such run directory"], title="cannot show status")
    info = collect(path)
    print(_json.dumps(info, indent=2) if json else format_status(info))


def report(run_dir: str) -> None:
    """PNG plots of loss, lr, throughput and memory from metrics.jsonl, and a short summary (no wandb needed)."""
    from trainer.report import format_summary, read_rows, summarize, write_plots

    if not (Path(run_dir) / "metrics.jsonl").exists():
        raise ConfigError([f"{run_dir}: no metrics.jsonl (has the run logged a step yet?)"], title="cannot report")
    print(format_summary(summarize(read_rows(Path(run_dir)))))
    for path in write_plots(Path(run_dir)):
        print(f"wrote {path}")


def stop(run_dir: str) -> None:
    """Ask a running job to save a checkpoint and stop (every rank sees the STOP file within a step)."""
    from launcher.layout import STOP_FILE

    (Path(run_dir) / STOP_FILE).touch()
    print(f"asked {run_dir} to stop; it saves a checkpoint first (status.json will say 'stopped')")


def _exits(command: Callable[..., int]) -> Callable[..., None]:
    """Adapt a command that returns an exit code: fire would print the number instead of exiting with it."""
    @functools.wraps(command)
    def run(*args, **kwargs) -> None:
        code = command(*args, **kwargs)
        if code:
            raise SystemExit(code)

    return run


COMMANDS = {"plan": plan, "launch": launch, "estimate": _exits(estimate_command), "export": export, "convert": convert,
            "eval": eval, "generate": generate, "chat": chat, "status": status, "stop": stop,
            "prepare": prepare_command, "report": report, "preflight": preflight}


# fire reads the word after a bare `--json` as its value, so `plan c.yaml --json train.lr=1` would lose
# the override; spelling switches out as `--json=True` keeps every key=value an override.
SWITCHES = {"--json", "--dry_run", "--wait"}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `shardtune` console script."""
    argv = [f"{a}=True" if a in SWITCHES else a for a in (sys.argv[1:] if argv is None else argv)]
    try:
        fire.Fire(COMMANDS, command=argv, name="shardtune")
    except ConfigError as exc:
        print(f"shardtune: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `shardtune plan ... | head` is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except SystemExit as exc:  # fire's own exits (usage errors, --help) and commands' exit codes
        return exc.code if isinstance(exc.code, int) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
