"""SLURM: the rendered script, and real jobs on the local 2-node cluster (slurm/local-cluster/up).

Jobs run 2 nodes × 1 process with gloo on this host; their per-step losses must equal a local
2-process run of the same config, including after a preemption and requeue.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import time

import pytest

from launcher.backends import slurm
from launcher.contract.config import apply_overrides, validate_config
from launcher.contract.errors import ConfigError
from launcher.contract.run_dir import SCRIPTS, RunDir
from launcher.planning.plan import build_plan

from conftest import REPO, losses, shardtune, tiny_config

CLUSTER = REPO / "slurm" / "local-cluster"
SLURM = {"backend": "slurm", "nodes": 2, "procs_per_node": 1, "device": "cpu"}


def rendered(*overrides: str) -> str:
    raw = {"model": {"name_or_path": "/m"}, "data": {"path": "/d.jsonl", "format": "messages", "seq_len": 64},
           "train": {"max_steps": 5, "grad_accum_steps": 1, "lr": 1e-3, "seed": 0},
           "launch": {"backend": "slurm", "nodes": 4, "procs_per_node": 8},
           "slurm": {"partition": "gpu", "account": "proj", "setup": ["module load cuda", "source /env/bin/activate"]},
           "output_dir": "/scratch/run"}
    return build_plan(validate_config(apply_overrides(raw, list(overrides)))).script


def test_script_is_valid_bash_with_literal_sbatch_lines(tmp_path):
    script = rendered()
    path = tmp_path / SCRIPTS["slurm"]
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    sbatch = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert sbatch and not [line for line in sbatch if "$" in line]
    for option in ("--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=gpu", "--account=proj",
                   "--requeue", "--signal=B:USR1@300", "--open-mode=append"):
        assert f"#SBATCH {option}" in sbatch, option
    assert not re.search(r"@@[A-Z_]+@@", script) and "module load cuda" in script


def test_node_rank_is_evaluated_on_each_node():
    script = rendered()
    srun = script[script.index("srun "):script.index("SRUN_PID=")]
    assert '\\$SLURM_NODEID' in srun, "the node rank must be escaped so each node expands its own"
    assert "--nnodes=$SLURM_JOB_NUM_NODES" in srun and "--rdzv_id=$SLURM_JOB_ID" in srun
    assert "--kill-on-bad-exit=1" in srun and "--ntasks-per-node=1" in srun


def test_variables_in_sbatch_values_are_refused():
    with pytest.raises(ConfigError, match=r"slurm.partition: '\$PART' is not allowed: #SBATCH lines are not expanded"):
        rendered("slurm.partition=$PART")
    with pytest.raises(ConfigError, match=r"slurm.extra_sbatch\[0\]"):
        rendered("slurm.extra_sbatch=['--comment=$USER']")


def test_fewer_gpus_than_processes_per_node_is_refused_before_queueing():
    """Ranks from local rank gpus_per_node on would fail to find a GPU only after the job waited in the queue."""
    with pytest.raises(ConfigError, match=r"slurm.gpus_per_node: 4 GPUs per node for launch.procs_per_node 8 "):
        rendered("slurm.gpus_per_node=4", "launch.device=cuda")
    with pytest.raises(ConfigError, match=r"slurm.gpus_per_node: 0 GPUs per node"):
        rendered("slurm.gpus_per_node=0", "launch.device=cuda")
    own = rendered("slurm.gpus_per_node=0", "launch.device=cuda", "slurm.extra_sbatch=['--gres=gpu:h100:8']")
    assert "#SBATCH --gres=gpu:h100:8" in own and "--gpus-per-node" not in own
    assert "#SBATCH --gpus-per-node=8" in rendered("slurm.gpus_per_node=8", "launch.device=cuda")


@pytest.fixture(scope="module")
def cluster():
    """The local 2-node cluster; stopped again afterwards if this fixture started it."""
    default_conf = "/tmp/shardtune-slurm/slurm.conf"
    was_running = False
    if os.path.exists(default_conf) and shutil.which("scontrol"):
        was_running = subprocess.run(["scontrol", "ping"], capture_output=True,
                                     env={**os.environ, "SLURM_CONF": default_conf}).returncode == 0
    proc = subprocess.run([str(CLUSTER / "up")], capture_output=True, text=True)
    if proc.returncode == 3:
        # CI runs as root on Linux, where the cluster can always be started: there a skip would hide a failure.
        if os.environ.get("SHARDTUNE_REQUIRE_SLURM") == "1":
            pytest.fail(f"SHARDTUNE_REQUIRE_SLURM=1 but the local SLURM cluster did not start: {proc.stderr.strip()}")
        pytest.skip(f"no local SLURM cluster: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    conf = re.search(r"export SLURM_CONF=(\S+)", proc.stdout).group(1)
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    yield conf
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    if not was_running:
        subprocess.run([str(CLUSTER / "down")], capture_output=True)


STEPS = 30


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model):
    """The same run as the jobs, on 2 local processes."""
    tmp = tmp_path_factory.mktemp("local")
    shardtune("launch", str(tiny_config(tmp, tiny_model, train={"max_steps": STEPS, "save_every": 5})))
    return losses(tmp / "run")


def job_config(tmp_path, model, **train):
    return tiny_config(tmp_path, model, train={"max_steps": STEPS, "save_every": 5, **train}, launch=SLURM,
                       slurm={"time": "10", "max_requeues": 2})


def submitted_job(run_dir) -> str:
    return RunDir(run_dir).read_jobs()[-1]["job_id"]


@contextlib.contextmanager
def rendezvous_ports_taken_but(spared: int):
    """Something listens on every rendezvous port of this host but `spared`, as other jobs sharing a head node
    would (a job's port used to be 29400 + job id % 500, whoever else was listening there)."""
    held = []
    try:
        for port in slurm.RDZV_PORTS:
            if port != spared:
                sock = socket.socket()
                try:
                    sock.bind(("0.0.0.0", port))
                    sock.listen()
                    held.append(sock)
                except OSError:
                    sock.close()  # taken already
        yield
    finally:
        for sock in held:
            sock.close()


def test_two_node_job_matches_a_local_run(tmp_path, tiny_model, cluster, reference):
    sentinel = "3b8d2f71c9e04a6b5d1f8e2c7a94b06d3e5f1c28"  # a credential in the submitting environment
    spared = slurm.free_rdzv_port(os.getpid())
    with rendezvous_ports_taken_but(spared):
        proc = shardtune("launch", str(job_config(tmp_path, tiny_model)), "--wait",
                         env={"WANDB_API_KEY": sentinel})
    assert "submitted job" in proc.stdout and "COMPLETED" in proc.stdout
    run = tmp_path / "run"
    assert losses(run) == reference
    leaked = [p for p in run.rglob("*") if p.is_file() and sentinel.encode() in p.read_bytes()]
    assert not leaked, f"the credential was written into the run directory: {leaked}"
    log = RunDir(run).slurm_log(submitted_job(run)).read_text(errors="replace")
    assert re.search(r"^0: == node 0 \(n1\) starting torchrun", log, re.M)
    assert re.search(r"^1: == node 1 \(n2\) starting torchrun", log, re.M)
    assert f"rendezvous at n1:{spared}" in log
    status = shardtune("status", str(run)).stdout
    assert "COMPLETED" in status and f"step {STEPS}/{STEPS}" in status and "step_00000030" in status


def wait_for_step(run_dir, step: int, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(s >= step for s in losses(run_dir)) if RunDir(run_dir).metrics_file.exists() else False:
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} never logged")


def test_the_plan_reads_the_partitions_preemption_from_scontrol(cluster):
    """The local cluster's debug partition (slurm/local-cluster/up): PreemptMode=REQUEUE, GraceTime=120. The
    preempting partition keeps the default GraceTime 0, which says nothing about preemption."""
    assert slurm.partition_preemption(None) == slurm.Preemption("debug", "REQUEUE", 120)
    assert slurm.partition_preemption("debug") == slurm.Preemption("debug", "REQUEUE", 120)
    assert slurm.partition_preemption("preempting") is None


def test_preempted_job_saves_requeues_resumes_and_completes(tmp_path, tiny_model, cluster, reference):
    """With slurm.max_requeues 0: a preemption whose attempt saved progress does not count against it (it used to
    count every requeue, so a long run gave up after a few time limits)."""
    run = tmp_path / "run"
    cfg = job_config(tmp_path, tiny_model, max_steps=STEPS)
    shardtune("launch", str(cfg), "slurm.max_requeues=0")
    job = submitted_job(run)
    wait_for_step(run, 3)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    state = slurm.wait_for(job, poll_s=1.0, on_change=lambda _: None)
    info = slurm.job_info(job)
    log = (run / f"slurm-{job}.out").read_text(errors="replace")
    assert state == "COMPLETED", log[-3000:]
    assert info["Restarts"] == "1"
    assert "caught USR1" in log and "it saved progress" in log and "run state 'stopped'" in log
    assert re.search(r"resumed from .*step_\d+ at step \d+", log)
    assert losses(run) == reference


def test_slurm_preemption_lets_a_save_longer_than_torchruns_30_s_finish(tmp_path, tiny_model, cluster, reference):
    """SLURM's own preemption (the local cluster's `preempting` partition outranks `debug`: PreemptMode=REQUEUE,
    GraceTime=120) sends SIGTERM to every process of the job, torchrun's agents included. The agents used to
    SIGKILL their workers 30 s later (torch's default shutdown timeout), in the middle of the save the SIGTERM
    asked for. Before that, the batch script read the trainer's clean stop as a user's `shardtune stop` (the
    batch shell itself gets no signal) and ended the job COMPLETED at the preempted step, so a job whose save
    finished within the grace time was over. Here every save takes 35 s (`stall_save`): the one at step 5 also keeps
    the run from finishing its 30 fast steps before SLURM gets round to preempting it (a busy machine's scheduler
    once took longer than those steps)."""
    run = tmp_path / "run"
    cfg = tiny_config(tmp_path, tiny_model, train={"max_steps": STEPS, "save_every": 5}, launch=SLURM,
                      slurm={"time": "10", "max_requeues": 0})
    shardtune("launch", str(cfg), "launch.env={SHARDTUNE_FAULTS: 'stall_save@-1:0=35'}")
    job = submitted_job(run)
    wait_for_step(run, 3)
    urgent = subprocess.run(["sbatch", "--parsable", "--partition=preempting", "--nodes=2", "--output=/dev/null",
                             "--wrap=true"], capture_output=True, text=True, check=True).stdout.strip()
    state = slurm.wait_for(job, poll_s=1.0, on_change=lambda _: None)
    log = RunDir(run).slurm_log(job).read_text(errors="replace")
    assert state == "COMPLETED", log[-3000:]
    assert slurm.wait_for(urgent, poll_s=1.0, on_change=lambda _: None) == "COMPLETED"
    assert "the trainer stopped on a signal to the training processes" in log, log[-3000:]
    assert int(slurm.job_info(job)["Restarts"]) >= 1 and "it saved progress" in log
    assert "0 attempts in a row ended without a newer checkpoint" in shardtune("status", str(run)).stdout
    resumed = re.search(r"resumed from .*step_\d+ at step (\d+)", log)
    assert resumed and int(resumed.group(1)) >= 3, log[-3000:]
    assert losses(run) == reference


def test_stop_on_request_ends_the_job_in_a_directory_named_with_spaces(tmp_path, tiny_model, cluster):
    """`shardtune stop` saves and ends the job: it used to requeue like a preemption, and the requeued attempt
    resumed and trained on (train.stop_at_step stopped, requeued and resumed one step per attempt). The run
    directory's space and % would split or expand unquoted #SBATCH lines."""
    run = tmp_path / "my runs 100%" / "run"
    cfg = tiny_config(tmp_path, tiny_model, train={"max_steps": STEPS, "save_every": 5}, launch=SLURM,
                      slurm={"time": "10", "max_requeues": 2}, output_dir=str(run))
    shardtune("launch", str(cfg))
    job = submitted_job(run)
    wait_for_step(run, 3)
    shardtune("stop", str(run))
    state = slurm.wait_for(job, poll_s=1.0, on_change=lambda _: None)
    log = RunDir(run).slurm_log(job).read_text(errors="replace")
    assert state == "COMPLETED", log[-3000:]
    assert slurm.job_info(job)["Restarts"] == "0"
    assert "stopped on request" in log and "requeueing" not in log and "caught" not in log
    status = RunDir(run).read_status()
    assert status["state"] == "stopped" and 3 <= status["step"] < STEPS
    assert RunDir(run).checkpoint(status["step"]).is_dir()


def test_deterministic_crash_stops_after_max_requeues(tmp_path, tiny_model, cluster):
    """The first attempt saves steps 2 and 4 before its crash at step 5, so it is requeued even with
    slurm.max_requeues 0; the second resumes at step 4 and crashes at 5 again without a newer checkpoint."""
    cfg = tiny_config(tmp_path, tiny_model, train={"max_steps": STEPS, "save_every": 2}, launch=SLURM,
                      slurm={"time": "10", "max_requeues": 0})
    proc = shardtune("launch", str(cfg), "launch.env={SHARDTUNE_FAULTS: 'crash@5:0'}", "--wait", check=False)
    assert proc.returncode != 0 and "FAILED" in proc.stdout + proc.stderr
    run = tmp_path / "run"
    job = submitted_job(run)
    log = (run / f"slurm-{job}.out").read_text(errors="replace")
    assert log.count("resumed from") == 1, "the second attempt should resume from the periodic checkpoint"
    assert "giving up: attempt 1 ended" in log and "slurm.max_requeues=0" in log
    assert "1 attempt in a row ended without a newer checkpoint" in log and "step 4" in log
    status = shardtune("status", str(run)).stdout
    assert "restarts 1" in status and "1 attempt in a row ended without a newer checkpoint (slurm.max_requeues 0)" \
        in status, status
    assert slurm.job_info(job)["Restarts"] == "1"


def test_two_torchrun_agents_from_the_rendered_multi_node_command(tmp_path, tiny_model, reference):
    port = 29500 + os.getpid() % 300
    cfg = tiny_config(tmp_path, tiny_model, train={"max_steps": STEPS, "save_every": 5},
                      launch={"nodes": 2, "procs_per_node": 1, "device": "cpu", "rdzv_endpoint": f"127.0.0.1:{port}"})
    out = shardtune("launch", str(cfg)).stdout
    assert "on each of the 2 nodes" in out
    script = RunDir(tmp_path / "run").script("torchrun")
    agents = [subprocess.Popen(["bash", str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    codes = [a.wait(timeout=300) for a in agents]
    assert codes == [0, 0], [a.stderr.read()[-2000:] for a in agents]
    assert losses(tmp_path / "run") == reference


def test_preflight_on_two_slurm_nodes(tmp_path, tiny_model, cluster):
    out = shardtune("preflight", str(job_config(tmp_path, tiny_model))).stdout
    assert "COMPLETED" in out and "preflight passed: 2 ranks" in out and "GB/s" in out


def test_two_node_job_survives_an_end_of_run_export_slower_than_a_minute(tmp_path, tiny_model, cluster):
    """`srun --wait=60` used to kill a node 60 s after the other node's ranks exited: for exports longer than
    that (a 70B model), no final/, status 'running', a requeue that resumed at max_steps. Here rank 0 enters
    the export 70 s after the others (they wait for it at the export's first gather), so the run's last 70 s are
    one working node; the run must complete with its export (tests/test_gpu_paths.py checks srun has no
    --wait)."""
    cfg = tiny_config(tmp_path, tiny_model, train={"max_steps": 3}, launch=SLURM,
                      slurm={"time": "10", "max_requeues": 0})
    proc = shardtune("launch", str(cfg), "--wait", env={"SHARDTUNE_FAULTS": "slow_export@0:0=70"}, timeout=900)
    assert "COMPLETED" in proc.stdout
    run = tmp_path / "run"
    status = RunDir(run).read_status()
    assert status["state"] == "completed" and status["step"] == 3
    assert (RunDir(run).final / "config.json").is_file() and list((RunDir(run).final).glob("*.safetensors"))
    log = RunDir(run).slurm_log(submitted_job(run)).read_text(errors="replace")
    assert "attempt 0" in log and "attempt 1" not in log
