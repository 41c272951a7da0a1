"""A model given as a hub id is resolved to one commit and downloaded once, where `launch` runs, and every rank
loads that commit from disk.

The hub is FakeHub (tests/fake_hub.py), an HTTP stand-in for the internet this machine does not have; the test
names say so. Everything else is real: huggingface_hub downloads from it, `shardtune` runs as the console script,
and the run trains under torchrun with the hub gone. The judge of which files a run needs is transformers
itself: from_pretrained and AutoTokenizer, pointed at the same fake hub with an empty cache, fetch a set of
files, and `launch` must fetch all of them and no other weights.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fake_hub import FakeHub

from launcher.contract.run_dir import MANIFEST, RunDir, tag_for
from launcher.planning.model_files import files_read

from conftest import shardtune, tiny_config

REPO = "org/tiny-llama"
CHATS = "org/chats"
TINY_CHAT = Path(__file__).parent.parent / "examples" / "data" / "tiny_chat.jsonl"


@pytest.fixture(scope="module")
def release(tiny_model, tmp_path_factory) -> dict[str, bytes]:
    """The tiny model as a hub repository holds a release: sharded safetensors with their index, the tokenizer,
    and weights no loader reads here: a Llama-style `original/` copy, a Mistral-style consolidated file and a
    pickle of the same weights."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("release")
    AutoModelForCausalLM.from_pretrained(tiny_model).save_pretrained(out, max_shard_size="200KB")
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    files.update({p.name: p.read_bytes() for p in tiny_model.iterdir() if p.name.startswith(("tokenizer", "special"))
                  or p.name.endswith(".jinja")})
    assert sum(n.endswith(".safetensors") for n in files) > 1 and "model.safetensors.index.json" in files
    files["original/consolidated.00.pth"] = os.urandom(3_000_000)
    files["original/params.json"] = b"{}"
    files["consolidated.safetensors"] = os.urandom(1_000_000)
    files["pytorch_model.bin"] = os.urandom(1_000_000)
    files["README.md"] = b"# tiny"
    return files


@pytest.fixture()
def hub(monkeypatch, tmp_path):
    hub = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield hub
    hub.close()


def transformers_fetches(hub: FakeHub, repo: str, hf_home: Path) -> set[str]:
    """The files transformers' own loaders download for this repository, with an empty cache (in a subprocess:
    huggingface_hub reads HF_HOME once, at import)."""
    script = ("import sys\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
              "AutoModelForCausalLM.from_pretrained(sys.argv[1]); AutoTokenizer.from_pretrained(sys.argv[1])\n")
    before = len(hub.requests)
    done = subprocess.run([sys.executable, "-c", script, repo], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HOME": str(hf_home)})
    assert done.returncode == 0, done.stderr[-3000:]
    prefix = f"/{repo}/resolve/"
    return {p[len(prefix):].split("/", 1)[1] for m, p in hub.requests[before:] if m == "GET" and p.startswith(prefix)}


def fails_at_start_naming(run_dir: Path, missing) -> None:
    """The run's torchrun script, on a host that does not see `missing`: it stops before training, naming it."""
    run = RunDir(run_dir)
    proc = subprocess.run(["bash", str(run.script("torchrun"))], capture_output=True, text=True, timeout=300)
    said = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"model.name_or_path: {missing}: no such directory on {os.uname().nodename}: every node must see it" \
        in said, said[-3000:]
    assert not run.metrics_file.exists()


def resolved_model(run_dir: Path) -> dict:
    return yaml.safe_load(RunDir(run_dir).config_file.read_text())["model"]


def test_plan_sizes_a_hub_model_from_its_config_alone_fake_hub(hub, release, tiny_model, tmp_path):
    """`plan` reads config.json from the hub (one small file, no weights) and plans the model's memory."""
    from transformers import AutoModelForCausalLM

    commit = hub.publish(REPO, release)
    proc = shardtune("plan", str(tiny_config(tmp_path, REPO)), "--json")
    plan = json.loads(proc.stdout)
    assert plan["memory"]["params"] == AutoModelForCausalLM.from_pretrained(tiny_model).num_parameters()
    assert any(f"{REPO} at main is commit {commit[:12]}" in n for n in plan["notes"]), plan["notes"]
    assert hub.downloaded(REPO) == {"config.json"}


def test_launch_downloads_what_transformers_reads_once_pins_the_commit_and_trains_offline_fake_hub(
        hub, release, tmp_path):
    commit = hub.publish(REPO, release)
    needed = transformers_fetches(hub, REPO, tmp_path / "judge_home")
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json"} <= needed
    hub.requests.clear()

    hub.publish("datasets/" + CHATS, {"data/train.jsonl": TINY_CHAT.read_bytes()})
    config = tiny_config(tmp_path, REPO, data={"path": CHATS}, launch={"procs_per_node": 1},
                         train={"max_steps": 2, "grad_accum_steps": 1, "warmup_steps": 1})
    # A dry run pins the commit and says what launch would download, downloading none of it.
    proc = shardtune("launch", str(config), "--dry_run")
    model = resolved_model(tmp_path / "run")
    snapshot = Path(model["name_or_path"])
    assert snapshot.parts[-2:] == ("snapshots", commit) and model["revision"] == commit
    # The weight index is read to size the shards it names, outside the cache (a snapshot holding it without
    # them would be a model with missing shards).
    assert hub.downloaded(REPO) == {"config.json", "model.safetensors.index.json"}
    assert {p.name for p in snapshot.iterdir()} == {"config.json"} and not hub.downloaded("datasets/" + CHATS)
    to_download = sum(len(release[n]) for n in needed - {"config.json"})
    assert f"{to_download / 1e6:,.1f} MB not downloaded by a dry run: `shardtune launch` downloads it" in proc.stdout
    assert "left on the hub: 4 files" in proc.stdout
    # Its run files, started by hand, stop before anything loads and say what to do.
    started = subprocess.run([sys.executable, "-m", "trainer", str(tmp_path / "run")], capture_output=True,
                             text=True, timeout=300)
    assert started.returncode == 1 and "Traceback" not in started.stderr, started.stderr[-3000:]
    assert f"model.name_or_path: {snapshot} holds no weight files" in started.stderr
    assert "`shardtune download CONFIG`" in started.stderr
    prepared = shardtune("prepare", str(RunDir(tmp_path / "run").config_file), check=False)
    assert prepared.returncode == 1 and "Traceback" not in prepared.stderr, prepared.stderr[-3000:]
    assert (f"model.name_or_path: {snapshot}: transformers cannot load a tokenizer from it" in prepared.stderr
            and "the directory holds no weight files" in prepared.stderr)

    downloading = shardtune("download", str(config))
    assert f"({to_download / 1e6:,.1f} MB downloaded now)" in downloading.stdout
    assert f"dataset {CHATS} at commit" in downloading.stdout
    proc = shardtune("launch", str(config), "--dry_run")
    assert "(all in the cache already); every rank loads them from there" in proc.stdout
    fetched = hub.downloaded(REPO)
    assert needed <= fetched, f"transformers also reads {sorted(needed - fetched)}"
    weights = {n for n in fetched if n.endswith((".safetensors", ".bin", ".pth"))}
    assert weights == {n for n in needed if n.endswith((".safetensors", ".bin", ".pth"))}
    assert not any(n.startswith("original/") for n in fetched)
    for name in fetched:
        assert hashlib.sha256((snapshot / name).read_bytes()).digest() == hashlib.sha256(release[name]).digest()
    assert f"{REPO} at main is commit {commit[:12]}" in proc.stdout and "left on the hub: 4 files" in proc.stdout

    # main moves on; the planned run still names the commit it was planned with.
    moved = {**release, "config.json": release["config.json"].replace(b"{", b'{"x": 1, ', 1)}
    newer = hub.publish(REPO, moved)
    assert newer != commit and resolved_model(tmp_path / "run")["name_or_path"] == str(snapshot)

    # A second launch from the cache alone, offline: nothing is downloaded again.
    hub.requests.clear()
    again = tmp_path / "again"
    again.mkdir()
    shardtune("launch", str(tiny_config(again, REPO)), "--dry_run", "model.revision=" + commit,
              env={"HF_HUB_OFFLINE": "1"})
    assert resolved_model(again / "run")["name_or_path"] == str(snapshot) and not hub.requests

    # The nodes: no hub and no network, and a shell without the launching shell's HF_HOME (a torchrun started over
    # ssh). They train from the snapshot the run config names, and read the dataset's rows from the cache the run's
    # script names (nothing was prepared ahead).
    hub.close()
    run = RunDir(tmp_path / "run")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HOME", "HF_HUB_CACHE")}
    env.update({"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9",
                "SHARDTUNE_CACHE": str(tmp_path / "node-cache")})
    done = subprocess.run(["bash", str(run.script("torchrun"))], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    assert sorted(run.losses()) == [1, 2] and any((tmp_path / "node-cache").iterdir())

    # Launched again to continue from its checkpoint, after the model's and the dataset's main moved on: the run
    # keeps the commits it started from.
    assert run.complete_checkpoints()
    data_commit = yaml.safe_load(run.config_file.read_text())["data"]["revision"]
    later = FakeHub()
    try:
        later.publish(REPO, release)
        later.publish(REPO, moved)
        later.publish("datasets/" + CHATS, {"data/train.jsonl": TINY_CHAT.read_bytes()})
        later.publish("datasets/" + CHATS, {"data/train.jsonl": TINY_CHAT.read_bytes()[:5000]})
        proc = shardtune("launch", str(config), "--dry_run", env={"HF_ENDPOINT": later.endpoint})
    finally:
        later.close()
    assert resolved_model(run.path) == {**model, "revision": commit}
    assert yaml.safe_load(run.config_file.read_text())["data"]["revision"] == data_commit
    assert f"stays at commit {commit[:12]}, which this run started from" in proc.stdout
    assert f"dataset {CHATS} stays at commit {data_commit[:12]}" in proc.stdout


def test_a_node_without_the_cache_fails_at_start_naming_the_directory_fake_hub(hub, release, tmp_path):
    """HF_HOME must be on a filesystem every node mounts; a node that does not see the snapshot says so at job
    start, before it loads anything (here the cache is moved away after launch); `plan` warns of it."""
    hub.publish(REPO, release)
    shardtune("launch", str(tiny_config(tmp_path, REPO)), "--dry_run")
    snapshot = resolved_model(tmp_path / "run")["name_or_path"]
    shutil.move(tmp_path / "hf_home", tmp_path / "elsewhere")
    fails_at_start_naming(tmp_path / "run", snapshot)
    plan = shardtune("plan", str(tiny_config(tmp_path, snapshot)))
    assert f"model.name_or_path: {snapshot}: no such directory on this host, so the plan has no model shape" in \
        plan.stdout


def test_each_hub_problem_fails_launch_naming_the_field_and_what_to_do_fake_hub(hub, release, tmp_path):
    hub.publish(REPO, release)
    hub.publish("org/gated", release, gated=True)
    hub.publish("org/not-a-model", {"README.md": b"# data"})
    hub.publish("org/huge", release, claimed_sizes={"model.safetensors.index.json": 10**18})
    cases = {
        "org/gated": "model.name_or_path: org/gated is gated: accept its terms at",
        "org/absent": "model.name_or_path: org/absent is not a path here, and the hub has no model repository",
        "org/not-a-model": "model.name_or_path: org/not-a-model at main has no config.json",
        "org/huge": "model.name_or_path: org/huge needs 1,000,000,000.",
    }
    for i, (repo, expected) in enumerate(cases.items()):
        (tmp_path / str(i)).mkdir()
        proc = shardtune("launch", str(tiny_config(tmp_path / str(i), repo)), "--dry_run", check=False)
        assert proc.returncode == 2 and expected in proc.stderr, (repo, proc.stderr[-2000:])
        assert not (tmp_path / str(i) / "run").exists()
    assert not hub.downloaded("org/huge") - {"config.json", "model.safetensors.index.json"}

    proc = shardtune("launch", str(tiny_config(tmp_path, REPO)), "--dry_run", "model.revision=v9", check=False)
    assert proc.returncode == 2 and f"model.revision: 'v9' is not a branch, tag or commit of {REPO}" in proc.stderr

    dead = {"HF_ENDPOINT": "http://127.0.0.1:9"}
    proc = shardtune("launch", str(tiny_config(tmp_path, REPO)), "--dry_run", env=dead, check=False)
    assert proc.returncode == 2 and "cannot be reached from this host" in proc.stderr, proc.stderr[-2000:]
    assert "hf download org/tiny-llama" in proc.stderr
    plan = shardtune("plan", str(tiny_config(tmp_path, REPO)), env=dead)
    assert "cannot be reached from this host" in plan.stdout and "planned without the model's shape" in plan.stdout


def test_files_read_keeps_one_form_of_the_weights_of_published_layouts():
    """Top-level names of two published repositories (Llama 3.1 70B, Mistral 7B v0.3, as listed on the hub):
    the expected sets are what those model cards' transformers instructions load."""
    llama = ([f"model-{i:05d}-of-00030.safetensors" for i in range(1, 31)] +
             [f"original/consolidated.{i:02d}.pth" for i in range(8)] +
             ["original/params.json", "original/tokenizer.model", ".gitattributes", "LICENSE", "README.md",
              "USE_POLICY.md", "config.json", "generation_config.json", "model.safetensors.index.json",
              "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"])
    index = {"weight_map": {f"w{i}": f"model-{i:05d}-of-00030.safetensors" for i in range(1, 31)}}
    assert files_read(llama, {}, index) == sorted(n for n in llama if not n.startswith("original/"))
    mistral = ["consolidated.safetensors", "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
               "model-00003-of-00003.safetensors", "model.safetensors.index.json", "params.json", "config.json",
               "generation_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
               "tokenizer.model.v3", "tokenizer_config.json", "README.md", ".gitattributes"]
    index = {"weight_map": {f"w{i}": f"model-{i:05d}-of-00003.safetensors" for i in range(1, 4)}}
    assert files_read(mistral, {}, index) == sorted(set(mistral) - {"consolidated.safetensors"})


def test_a_hub_dataset_is_pinned_so_its_new_version_is_read_not_hidden_by_the_cache_fake_hub(
        hub, tiny_model, tmp_path):
    """The data cache is keyed by a hub dataset's name and split; without the commit in the key, a dataset
    updated on the hub kept being read from the cache of its old version."""
    lines = TINY_CHAT.read_bytes().splitlines(keepends=True)
    first = hub.publish("datasets/" + CHATS, {"data/train.jsonl": b"".join(lines[:100])})
    config = str(tiny_config(tmp_path, tiny_model, data={"path": CHATS}))

    def prepare(*overrides: str) -> dict:
        return json.loads(shardtune("prepare", config, "--json", *overrides).stdout)

    assert (prepare()["rows_read"], prepare()["cache_hit"]) == (100, True)
    second = hub.publish("datasets/" + CHATS, {"data/train.jsonl": b"".join(lines[:150])})
    now = prepare()
    assert (now["rows_read"], now["cache_hit"]) == (150, False)
    old = prepare(f"data.revision={first}")
    assert (old["rows_read"], old["cache_hit"]) == (100, True)
    shardtune("launch", config, "--dry_run")
    assert yaml.safe_load(RunDir(tmp_path / "run").config_file.read_text())["data"]["revision"] == second


def test_hub_eval_data_is_a_held_out_split_read_at_a_pinned_commit_fake_hub(hub, tiny_model, tmp_path):
    """`data.eval_path` on the hub. The training dataset itself: evaluation read `data.split`, the very rows the run
    trains on, and its loss measured memorization; that default is now refused and `data.eval_split` names the
    held-out split. Another dataset: unpinned, the data cache hid its new version, as it hid data.path's."""
    lines = TINY_CHAT.read_bytes().splitlines(keepends=True)
    hub.publish("datasets/" + CHATS, {"data/train.jsonl": b"".join(lines[:100]),
                                      "data/test.jsonl": b"".join(lines[100:120])})
    config = str(tiny_config(tmp_path, tiny_model, data={"path": CHATS, "eval_path": CHATS}))
    refused = shardtune("launch", config, "--dry_run", check=False)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert f"data.eval_split: 'train' is the split data.path ({CHATS}) trains on" in refused.stderr
    assert not (tmp_path / "run").exists()
    held_out = json.loads(shardtune("prepare", config, "--json", "data.eval_split=test").stdout)
    assert (held_out["rows_read"], held_out["eval"]["rows_read"]) == (100, 20)

    def evaluated(*overrides: str) -> tuple[int, bool]:
        out = json.loads(shardtune("prepare", config, "--json", "data.eval_path=org/evals", *overrides).stdout)
        return out["eval"]["rows_read"], out["cache_hit"]

    first = hub.publish("datasets/org/evals", {"data/train.jsonl": b"".join(lines[200:210])})
    assert evaluated() == (10, False)
    second = hub.publish("datasets/org/evals", {"data/train.jsonl": b"".join(lines[200:230])})
    assert evaluated() == (30, False)
    assert evaluated(f"data.eval_revision={first}") == (10, True)
    shardtune("launch", config, "data.eval_path=org/evals", "--dry_run")
    assert yaml.safe_load(RunDir(tmp_path / "run").config_file.read_text())["data"]["eval_revision"] == second


NODE_PREPARE = """import sys
from launcher.contract.config import load_config
from trainer.data.prepare import load_tokenizer, prepare
cfg = load_config(sys.argv[1], sys.argv[2:])
prepare(cfg, load_tokenizer(cfg))
"""
"""What a rank does with the run config: prepare its data without launch's checks."""

CARD = b"""---
configs:
- config_name: default
  data_files:
  - split: train_sft
    path: data/train_sft-*
  - split: test_sft
    path: data/test_sft-*
  - split: train_gen
    path: data/train_gen-*
dataset_info:
  splits:
  - name: train_sft
    num_bytes: 60000
    num_examples: 100
  - name: test_sft
    num_bytes: 12000
    num_examples: 20
  - name: train_gen
    num_bytes: 90000
    num_examples: 150
---
# chats
"""


def test_launch_downloads_a_hub_datasets_files_so_nodes_read_it_without_the_hub_fake_hub(hub, tiny_model, tmp_path):
    """A dataset whose card names its splits, as most chat datasets' do (HuggingFaceH4/ultrachat_200k's four).
    `launch` downloads the files of the splits read at the pinned commit (not the other split, nor the rest of the
    repository), and a host without the hub then reads the same rows from the cache; before, it had to reach the
    hub and failed with datasets' traceback. A split the dataset does not have is refused at launch, not on the
    nodes after the queue."""
    lines = TINY_CHAT.read_bytes().splitlines(keepends=True)
    files = {"README.md": CARD, "data/train_sft-00000.jsonl": b"".join(lines[:60]),
             "data/train_sft-00001.jsonl": b"".join(lines[60:100]),
             "data/test_sft-00000.jsonl": b"".join(lines[100:120]), "raw/scrape.jsonl": b"".join(lines),
             "data/train_gen-00000.jsonl": b"".join(lines[:150])}
    commit = hub.publish("datasets/" + CHATS, files)
    config = str(tiny_config(tmp_path, tiny_model, data={"path": CHATS, "split": "train_sft", "eval_path": CHATS,
                                                          "eval_split": "test_sft"}))
    refused = shardtune("launch", config, "data.split=train", "--dry_run", check=False)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert f"data.split: 'train' is not a split of {CHATS} at commit" in refused.stderr
    assert "it has test_sft, train_gen, train_sft" in refused.stderr and not (tmp_path / "run").exists()

    # Named only after the subset datasets reads by default is recorded: the same rows as training.
    same = shardtune("launch", config, "data.eval_subset=default", "data.eval_split=train_sft", "--dry_run",
                     check=False)
    assert same.returncode == 2 and "data.eval_split: 'train_sft' is the split data.path" in same.stderr, same.stderr
    assert not (tmp_path / "run").exists()

    dry = shardtune("launch", config, "--dry_run")
    assert hub.downloaded("datasets/" + CHATS) == {"README.md"}  # a dry run reads the card alone
    assert dry.stdout.count(f"dataset {CHATS} at main is commit {commit[:12]}") == 1, dry.stdout  # eval's: same
    shardtune("download", config)
    assert hub.downloaded("datasets/" + CHATS) == set(files) - {"raw/scrape.jsonl", "data/train_gen-00000.jsonl"}
    # Launched again where the hub cannot be reached either: `main` is the commit the cache recorded for it.
    hub.requests.clear()
    shardtune("launch", config, f"output_dir={tmp_path / 'offline'}", "--dry_run", env={"HF_HUB_OFFLINE": "1"})
    again = yaml.safe_load(RunDir(tmp_path / "offline").config_file.read_text())["data"]
    assert (again["revision"], again["eval_revision"]) == (commit, commit) and not hub.requests
    # ... but a split the cache lacks (only the splits read were fetched) is refused there, not on the nodes.
    lacking = shardtune("launch", config, f"output_dir={tmp_path / 'lacking'}", "data.eval_split=train_gen",
                        "--dry_run", env={"HF_HUB_OFFLINE": "1"}, check=False)
    assert lacking.returncode == 2 and "Traceback" not in lacking.stderr, lacking.stderr[-3000:]
    assert (f"data.eval_split: split 'train_gen' of dataset {CHATS} at commit {commit[:12]} is not in the Hugging "
            f"Face cache") in lacking.stderr and not (tmp_path / "lacking").exists()
    hub.close()
    offline = {"HF_HUB_OFFLINE": "1", "SHARDTUNE_CACHE": str(tmp_path / "node-cache")}
    read = json.loads(shardtune(
        "prepare", str(RunDir(tmp_path / "run").config_file), "--json", env=offline).stdout)
    assert (read["rows_read"], read["eval"]["rows_read"], read["cache_hit"]) == (100, 20, False)
    assert not list((tmp_path / "hf_home").rglob("*.arrow"))  # read from the files, not from an Arrow copy of them
    # The offline launch's config names no subset (only a launch with the hub records it): the card's default.
    offline["SHARDTUNE_CACHE"] = str(tmp_path / "node-cache-2")
    read = json.loads(shardtune(
        "prepare", str(RunDir(tmp_path / "offline").config_file), "--json", env=offline).stdout)
    assert (read["rows_read"], read["eval"]["rows_read"]) == (100, 20)
    elsewhere = shardtune("prepare", config, f"data.revision={'f' * 40}", env=offline, check=False)
    assert elsewhere.returncode == 1 and "Traceback" not in elsewhere.stderr, elsewhere.stderr[-3000:]
    assert (f"hub dataset {CHATS} at {'f' * 40}, split train_sft: cannot read it from the hub (ConnectionError) on "
            f"{os.uname().nodename}") in elsewhere.stderr
    # The tokenized samples a prepare writes beside the data cache are gone after it, read or failed.
    assert not [p for cache in ("node-cache", "node-cache-2") for p in (tmp_path / cache).rglob("*")
                if p.name in ("samples", "ids.bin") or ".tmp-" in p.name]


def test_max_rows_fetches_only_the_files_that_hold_them_and_a_longer_read_is_refused_fake_hub(
        hub, tiny_model, tmp_path):
    """`data.max_rows` of a hub split: `launch` fetched the whole split, so a thousand-row trial of a multi-terabyte
    corpus downloaded all of it (or was refused for room). Now the files are fetched in reading order until they hold
    the rows. The cache then holds part of the split, which datasets alone would read as the split: a later read of
    more rows, where the hub cannot be reached, is refused at launch and on the node, not trained on part of the data.
    The rows read are judged against the same lines read from a local file."""
    lines = TINY_CHAT.read_bytes().splitlines(keepends=True)
    train = [f"data/train_sft-0000{i}.jsonl" for i in range(3)]
    files = {"README.md": CARD, **{name: b"".join(lines[40 * i:40 * i + 40]) for i, name in enumerate(train)},
             "data/test_sft-00000.jsonl": b"".join(lines[120:140]), "data/train_gen-00000.jsonl": lines[0]}
    commit = hub.publish("datasets/" + CHATS, files)
    config = str(tiny_config(tmp_path, tiny_model, data={"path": CHATS, "split": "train_sft", "eval_path": CHATS,
                                                          "eval_split": "test_sft", "max_rows": 50}))
    dry = shardtune("launch", config, "--dry_run")
    assert hub.downloaded("datasets/" + CHATS) == {"README.md"}, dry.stdout
    assert "split train_sft is read to its first 50 rows (data.max_rows): launch downloads its 3 files" in dry.stdout
    fetched = shardtune("download", config)
    assert hub.downloaded("datasets/" + CHATS) == {"README.md", *train[:2], "data/test_sft-00000.jsonl"}
    assert "split train_sft: only the first 2 of its 3 files, which hold the first 50 rows read" in fetched.stdout

    local = tmp_path / "local.jsonl"
    local.write_bytes(b"".join(lines[:120]))
    hub.close()
    offline = {"HF_HUB_OFFLINE": "1", "SHARDTUNE_CACHE": str(tmp_path / "node-cache")}
    as_local = (f"data.path={local}", "data.split=train", "data.eval_path=null", "data.eval_split=null")
    # Every row the two files hold, read offline: the same rows as the local file's first 80.
    got = json.loads(shardtune("prepare", config, "data.max_rows=80", "--json", env=offline).stdout)
    want = json.loads(shardtune("prepare", config, *as_local, "data.max_rows=80", "--json", env=offline).stdout)
    assert (got["rows_read"], got["eval"]["rows_read"]) == (80, 20)
    assert (got["tokens"], got["trained_tokens"]) == (want["tokens"], want["trained_tokens"])

    partly = (f"data.split: split 'train_sft' of dataset {CHATS} at commit {commit[:12]} is held in the Hugging Face "
              f"cache only in part, the first 2 of its 3 files (80 rows)")
    # (More rows than they hold, with a limit, is the Parquet test's.)
    refused = shardtune("launch", config, "data.max_rows=null", f"output_dir={tmp_path / 'more'}", "--dry_run",
                        env=offline, check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert partly in refused.stderr and "this one sets no data.max_rows" in refused.stderr, refused.stderr
    assert not (tmp_path / "more").exists()
    # A rank reading past them (a run config written by a launch with the hub, the limit since removed by hand):
    # named, not trained on the 80 rows the cache holds. The rank's own prepare, which launch's checks do not guard.
    node = subprocess.run([sys.executable, "-c", NODE_PREPARE, config, f"data.revision={commit}",
                           "data.max_rows=null"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **offline})
    assert node.returncode == 1, node.stderr[-3000:]
    assert (f"UserError: hub dataset {CHATS} at {commit}, split train_sft: the Hugging Face cache ("
            f"{tmp_path / 'hf_home'}") in node.stderr
    assert "holds only the first 2 of its 3 files (80 rows)" in node.stderr
    assert "and all 80 rows they hold were read" in node.stderr

    # With the hub again, the whole split: the third file alone is fetched, and the split is read whole offline.
    hub2 = FakeHub()
    hub2.publish("datasets/" + CHATS, files)
    online = {"HF_ENDPOINT": hub2.endpoint}
    shardtune("download", config, "data.max_rows=null", env=online)
    assert hub2.downloaded("datasets/" + CHATS) == {train[2]}
    hub2.close()
    whole = json.loads(shardtune("prepare", config, "data.max_rows=null", f"data.revision={commit}", "--json",
                                 env=offline).stdout)
    assert whole["rows_read"] == 120


def test_max_rows_of_a_split_whose_card_lists_its_files_reads_them_in_the_cards_order_fake_hub(
        hub, tiny_model, tmp_path):
    """A card may list a split's files by name, in an order that is not sorted. datasets reads them in the card's
    order, so the files that hold the first rows are the card's first: fetched alone, they are read offline as the
    same rows as a local file of the same lines in that order (and not the sorted one)."""
    lines = TINY_CHAT.read_bytes().splitlines(keepends=True)
    names = ["data/z.jsonl", "data/a.jsonl", "data/m.jsonl"]
    card = (b"---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path:\n" +
            b"".join(f"    - {n}\n".encode() for n in names) + b"---\n# chats\n")
    hub.publish("datasets/" + CHATS, {"README.md": card, **{n: b"".join(lines[40 * i:40 * i + 40])
                                                            for i, n in enumerate(names)}})
    config = str(tiny_config(tmp_path, tiny_model, data={"path": CHATS, "max_rows": 50}))
    shardtune("download", config)
    assert hub.downloaded("datasets/" + CHATS) == {"README.md", "data/z.jsonl", "data/a.jsonl"}
    hub.close()
    offline = {"HF_HUB_OFFLINE": "1", "SHARDTUNE_CACHE": str(tmp_path / "node-cache")}
    got = json.loads(shardtune("prepare", config, "--json", env=offline).stdout)
    local = tmp_path / "local.jsonl"
    local.write_bytes(b"".join(lines[:80]))
    want = json.loads(shardtune("prepare", config, f"data.path={local}", "--json", env=offline).stdout)
    assert got["rows_read"] == 50 and (got["tokens"], got["trained_tokens"]) == (want["tokens"], want["trained_tokens"])
    local.write_bytes(b"".join(lines[40:120]))  # a.jsonl and m.jsonl, the first files in sorted order: other rows
    assert json.loads(shardtune("prepare", config, f"data.path={local}", "--json", env=offline).stdout)[
        "tokens"] != got["tokens"]


def test_max_rows_of_a_parquet_split_counts_its_files_from_their_footers_fake_hub(hub, tiny_model, tmp_path):
    """Most hub datasets are Parquet (the hub converts uploads to it). A limit inside the second of three files of 30
    rows: two files are fetched, and the cache records the 60 rows they hold, so a later offline read of up to 60
    is known to find them."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from launcher.planning.held_splits import held_split

    rows = [json.loads(line) for line in TINY_CHAT.read_text().splitlines()[:90]]
    train = [f"data/train-0000{i}.parquet" for i in range(3)]
    files = {}
    for i, name in enumerate(train):
        out = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows[30 * i:30 * i + 30]), out)
        files[name] = out.getvalue()
    commit = hub.publish("datasets/" + CHATS, files)
    config = str(tiny_config(tmp_path, tiny_model, data={"path": CHATS, "max_rows": 40}))
    shardtune("download", config)
    assert hub.downloaded("datasets/" + CHATS) == set(train[:2])
    snapshot = tmp_path / "hf_home" / "hub" / f"datasets--{CHATS.replace('/', '--')}" / "snapshots" / commit
    held = held_split(snapshot, "default", "train")
    assert (held.files, held.present, held.rows) == (train, train[:2], 60)
    hub.close()
    offline = {"HF_HUB_OFFLINE": "1", "SHARDTUNE_CACHE": str(tmp_path / "node-cache")}
    assert json.loads(shardtune("prepare", config, "data.max_rows=60", "--json", env=offline).stdout)["rows_read"] == 60
    refused = shardtune("prepare", config, "data.max_rows=61", env=offline, check=False)
    assert refused.returncode == 2 and "the first 2 of its 3 files (60 rows)" in refused.stderr, refused.stderr
    assert "this one sets data.max_rows is 61" in refused.stderr, refused.stderr


def test_a_subset_of_a_hub_dataset_is_named_fetched_alone_and_read_offline_fake_hub(hub, tiny_model, tmp_path):
    """A dataset of several subsets and no default (as HuggingFaceTB/smoltalk, allenai/c4): datasets needs a subset
    name, which `data.subset` gives. Only that subset's files are fetched, and a host without the hub reads them:
    datasets alone, pointed at the partial snapshot, fails on the subsets it does not hold."""
    lines = TINY_CHAT.read_bytes().splitlines(keepends=True)
    card = (b"---\nconfigs:\n- config_name: small\n  data_files: small/*.jsonl\n- config_name: all\n  data_files:\n"
            b"  - split: train\n    path: data/train-*\n  - split: test\n    path: data/test-*\n---\n# chats\n")
    files = {"README.md": card, "data/train-0.jsonl": b"".join(lines[:100]),
             "data/test-0.jsonl": b"".join(lines[100:120]), "small/part-0.jsonl": b"".join(lines[120:150])}
    hub.publish("datasets/" + CHATS, files)
    config = str(tiny_config(tmp_path, tiny_model, data={"path": CHATS}))
    refused = shardtune("launch", config, "--dry_run", check=False)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "Config name is missing" in refused.stderr and "['small', 'all']" in refused.stderr
    assert "; name one in data.subset" in refused.stderr
    hub.publish("datasets/org/scripted", {"scripted.py": b"import datasets\n", "README.md": b"# a loading script"})
    scripted = shardtune("launch", config, "data.path=org/scripted", "--dry_run", check=False)
    assert scripted.returncode == 2 and "Traceback" not in scripted.stderr, scripted.stderr[-3000:]
    assert "data.path: datasets cannot read org/scripted at commit" in scripted.stderr

    shardtune("download", config, "data.subset=small")
    shardtune("launch", config, "data.subset=small", "--dry_run")
    assert hub.downloaded("datasets/" + CHATS) == {"README.md", "small/part-0.jsonl"}
    hub.close()
    offline = {"HF_HUB_OFFLINE": "1", "SHARDTUNE_CACHE": str(tmp_path / "node-cache")}
    read = json.loads(shardtune("prepare", str(RunDir(tmp_path / "run").config_file), "--json", env=offline).stdout)
    assert read["rows_read"] == 30


def test_a_card_whose_subset_has_a_data_dir_is_refused_at_launch_as_datasets_cannot_read_it_fake_hub(
        hub, tiny_model, tmp_path):
    """datasets 5.2 cannot read a card whose configuration has both `data_dir` and `data_files` from the hub: it
    infers the file format from the patterns at the repository's top, not under `data_dir`. Launch says so before
    anything is queued or downloaded, naming the field (before, it called this a failed download and asked about
    a quota). On the day datasets reads such cards this test fails: then check that a node reads the snapshot's
    files under `data_dir` once (hub_snapshot.subset_files passes both to load_dataset, which resolves the
    patterns under the directory; checked by hand on a local snapshot)."""
    lines = TINY_CHAT.read_bytes().splitlines(keepends=True)
    card = (b"---\nconfigs:\n- config_name: default\n  data_dir: chats\n  data_files:\n  - split: train\n"
            b"    path: train-*.jsonl\n  - split: test\n    path: test-*.jsonl\n---\n# chats\n")
    hub.publish("datasets/" + CHATS, {"README.md": card, "chats/train-0.jsonl": b"".join(lines[:100]),
                                      "chats/test-0.jsonl": b"".join(lines[100:120])})
    config = str(tiny_config(tmp_path, tiny_model, data={"path": CHATS}))
    refused = shardtune("launch", config, "--dry_run", check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert f"data.path: datasets cannot read {CHATS} at commit" in refused.stderr
    assert "No (supported) data files found" in refused.stderr and "quota" not in refused.stderr
    assert hub.downloaded("datasets/" + CHATS) <= {"README.md"}


def test_a_download_the_cache_cannot_hold_fails_with_what_to_do_not_a_traceback_fake_hub(hub, release, tmp_path):
    """A quota on the cache's filesystem is not in the free space it reports, so the download starts and a write
    fails part way. Simulated with a file-size limit (RLIMIT_FSIZE; Python ignores SIGXFSZ, so the write fails
    with EFBIG as a quota's fails with EDQUOT)."""
    import resource

    hub.publish(REPO, release)
    limit = 100_000
    assert max(len(v) for k, v in release.items() if k.startswith("model-")) > limit
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "shardtune"), "launch", str(tiny_config(tmp_path, REPO))],
        capture_output=True, text=True, timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"cannot download (1 problem):\n  - model.name_or_path: downloading {REPO} into the Hugging Face cache" \
        in proc.stderr
    assert "File too large" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_hub_tokenizer_is_fetched_without_weights_and_a_missing_model_dir_is_named_at_start_fake_hub(
        hub, release, tiny_model, tmp_path):
    """`model.tokenizer` from its own hub repository: only its tokenizer and config files are fetched. The model
    is a local directory removed after launch: with the tokenizer still there, the rank names the missing model
    directory and its host before anything loads (transformers would read the path as a malformed hub id)."""
    tokenizer_files = {n: b for n, b in release.items() if "/" not in n and not n.endswith((".safetensors", ".bin"))}
    v2 = hub.publish("org/tok", tokenizer_files, branch="v2")
    commit = hub.publish("org/tok", {**tokenizer_files, "model.safetensors": os.urandom(500_000)})

    # A model pinned to its commit and a tokenizer repository at its own revision: the model's commit is not one of
    # the tokenizer's, so it is not looked up there.
    model_commit = hub.publish(REPO, release)
    for tokenizer_at, expected in ((), commit), (("model.tokenizer_revision=v2",), v2):
        shardtune("launch", str(tiny_config(tmp_path, REPO)), f"model.revision={model_commit}",
                  "model.tokenizer=org/tok", *tokenizer_at, f"output_dir={tmp_path / 'pinned'}", "--dry_run")
        pinned = resolved_model(tmp_path / "pinned")
        assert Path(pinned["tokenizer"]).name == pinned["tokenizer_revision"] == expected
        assert Path(pinned["name_or_path"]).name == pinned["revision"] == model_commit

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model, model_dir)
    shardtune("download", str(tiny_config(tmp_path, model_dir)), "model.tokenizer=org/tok")
    shardtune("launch", str(tmp_path / "run.yaml"), "model.tokenizer=org/tok", "--dry_run")
    tokenizer = Path(resolved_model(tmp_path / "run")["tokenizer"])
    assert tokenizer.parts[-3:] == ("models--org--tok", "snapshots", commit)
    assert hub.downloaded("org/tok") == set(tokenizer_files)
    shardtune("launch", str(tmp_path / "run.yaml"), "model.tokenizer=org/tok", f"output_dir={tmp_path / 'offline'}",
              "--dry_run", env={"HF_HUB_OFFLINE": "1"})  # `main` from the cache, without the hub
    assert resolved_model(tmp_path / "offline")["tokenizer"] == str(tokenizer)

    # Launched again to continue (a checkpoint's manifest stands in for one here) after org/tok's main moved:
    # the tokenizer keeps the commit the run started from.
    ckpt = RunDir(tmp_path / "run").checkpoints / tag_for(1)
    ckpt.mkdir(parents=True)
    (ckpt / MANIFEST).write_text("{}")
    hub.publish("org/tok", {**tokenizer_files, "README.md": b"# moved"})
    proc = shardtune("launch", str(tmp_path / "run.yaml"), "model.tokenizer=org/tok", "--dry_run")
    assert resolved_model(tmp_path / "run")["tokenizer"] == str(tokenizer)
    assert f"model.tokenizer: org/tok stays at commit {commit[:12]}" in proc.stdout
    shutil.rmtree(ckpt)

    shutil.rmtree(model_dir)
    fails_at_start_naming(tmp_path / "run", model_dir)
