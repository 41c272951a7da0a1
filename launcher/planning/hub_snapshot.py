"""Which snapshot of a hub model a run trains from: resolved to one commit and fetched once, where `launch` runs.

A hub id in `model.name_or_path` used to reach every rank as it was, and each rank called from_pretrained on it:
- every node downloaded the model (140 GB for a 70B model; per rank with a node-local cache), and compute
  nodes without internet, as on many clusters, could not start at all;
- a branch that moved between two nodes' downloads, or between a job and its requeue, trained ranks on
  different weights, and nothing said so;
- `plan` could not size the model, having no config.json to read.

So `launch` (and `preflight`, and `shardtune download` ahead of them) resolve the revision to its commit on the
launching host, download that commit's files that the run reads into the Hugging Face cache, and the run config
names the snapshot directory: every rank, node and requeue loads the same files from disk without the network, and
the weight-file checks of `plan` and of each node's preflight apply to it as to any local directory. Only the files
from_pretrained and the tokenizer read are fetched (model_files.files_read): many repositories also carry weights in
other forms, such as Llama's `original/` copy, as large as the model. `plan` fetches config.json alone, and plans
without the model's shape, with a note, when the hub cannot be reached and the file is not cached. `launch
--dry_run` checks and sizes what launch would download without downloading it (Fetch).

The cache is huggingface_hub's (HF_HOME, or HF_HUB_CACHE): it must be on a filesystem every node mounts, as a
home directory usually is; a node that does not see it fails its preflight, naming the directory.
Hub datasets are pinned to a commit as well (pin_hub_datasets), which the data cache key then includes, and their
data files are downloaded into the same cache (fetch_dataset); `prepare` and the nodes read them from there.

huggingface_hub is imported only for a hub id, so `plan` on a local directory stays instant.
"""
from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from launcher.contract.config import DataRead, RunConfig, eval_data_problems
from launcher.contract.errors import ConfigError
from launcher.contract.run_dir import RunDir
from launcher.planning.checkpoint_size import free_space, size_text
from launcher.planning.held_splits import held_split, record_split
from launcher.planning.model_files import WEIGHT_SUFFIXES, chosen_weights, files_read

COMMIT = re.compile(r"[0-9a-f]{40}")
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
"""A hub repository id, `name` or `owner/name` (huggingface_hub's own rule, less its length limit)."""

Fetch = Literal["config", "sizes", "all"]
"""How much of a hub model or dataset a command fetches. `config` (plan): the commit and a model's config.json.
`sizes` (launch --dry_run): every check launch makes, from the hub's listing and the small files that name the
others (config, weight index, dataset card), and the size of what launch would download; no weights or data files,
which for a 70B model are 140 GB that a user asking what a launch would do did not ask for. `all` (launch,
preflight, prepare, download): the files downloaded into the cache too."""


@dataclass
class Snapshot:
    """One commit of a hub repository as it sits in the local cache."""

    repo_id: str
    revision: str
    commit: str
    directory: Path
    files: list[str] = field(default_factory=list)
    size: int = 0
    fetched: int = 0
    left: dict[str, int] = field(default_factory=dict)
    """Files of the commit the run does not read, with their sizes: not downloaded."""
    downloaded: bool = True
    """False for a dry run (Fetch `sizes`): `fetched` is then what launch would download."""

    def note(self, what: str) -> str:
        pinned = "" if self.revision == self.commit else f" at {self.revision}"
        text = f"{what}: {self.repo_id}{pinned} is commit {self.commit[:12]}"
        if not self.files:
            return f"{text}; only its config.json is fetched to plan (launch downloads the rest)"
        text += _files_note(len(self.files), self.size, self.directory, self.fetched, self.downloaded, "every rank "
                            "loads them")
        if self.left:
            names = sorted({n.split("/")[0] + ("/" if "/" in n else "") for n in self.left})
            text += (f"; left on the hub: {len(self.left)} files ({size_text(sum(self.left.values()))}: "
                     f"{', '.join(names[:4])}{', ...' if len(names) > 4 else ''}) that the run does not read")
        return text


NOT_DOWNLOADED = ("not downloaded by a dry run: `shardtune launch` downloads it, or `shardtune download` on a host "
                  "with the hub ahead of it")


def _files_note(count: int, size: int, directory: Path, fetched: int, downloaded: bool, readers: str) -> str:
    if downloaded or not fetched:
        now = f"{size_text(fetched)} downloaded now" if downloaded else "all in the cache already"
        return f": {count} files, {size_text(size)} in {directory} ({now}); {readers} from there"
    return f": {count} files, {size_text(size)}, for {directory}; {size_text(fetched)} {NOT_DOWNLOADED}"


def is_hub_id(name: Optional[str]) -> bool:
    """True for a name transformers would look up on the hub: not a path on this host, shaped as a repo id."""
    if not name or name.startswith(("/", ".", "~")) or Path(name).expanduser().exists():
        return False
    return REPO_ID.fullmatch(name) is not None


def continued_run(cfg: RunConfig) -> Optional[dict]:
    """The resolved config a run directory's earlier launch wrote, when this launch continues it (it resumes, and
    there is a checkpoint to resume from); else None."""
    run_dir = RunDir(cfg.output_dir)
    if cfg.train.resume == "never" or not run_dir.complete_checkpoints() or not run_dir.config_file.is_file():
        return None
    return run_dir.read_config()


def pin_hub_models(cfg: RunConfig, fetch: Fetch, earlier: Optional[dict] = None) -> tuple[RunConfig, list[str]]:
    """A copy of the config whose hub ids (model, tokenizer) name snapshot directories in the local cache, with a
    note for each. `fetch` (Fetch): `config` (plan) fetches config.json only, and a hub out of reach is a note,
    not an error.
    The tokenizer is resolved first, at its own revision (ModelConfig.tokenizer_source); model.revision and
    model.tokenizer_revision then record the commits. `earlier`: the resolved config of the run this launch
    continues (continued_run), whose commits the model and tokenizer keep unless their revision names another
    commit: a branch that moved since must not change the config, tokenizer or data of a run half done."""
    cfg = cfg.model_copy(deep=True)
    m, notes = cfg.model, []
    tokenizer_revision = m.tokenizer_source()[1] if m.tokenizer else None
    model = (m.name_or_path, _earlier_commit(m.name_or_path, m.revision, *_earlier(earlier, "model", "name_or_path")))
    tokenizer = (m.tokenizer, _earlier_commit(m.tokenizer, tokenizer_revision,
                                              *_earlier(earlier, "model", "tokenizer")))
    for field_name, (repo_id, kept), revision_field in (("model.name_or_path", model, "model.revision"),
                                                        ("model.tokenizer", tokenizer, "model.tokenizer_revision")):
        if kept:
            notes.append(f"{field_name}: {repo_id} stays at commit {kept[:12]}, which this run started from (set "
                         f"{revision_field} to a commit to change it)")
    try:
        if fetch != "config" and is_hub_id(m.tokenizer):
            snap = fetch_repo(m.tokenizer, tokenizer[1] or tokenizer_revision, "model.tokenizer", weights=False,
                              revision_field="model.tokenizer_revision", download=fetch == "all")
            m.tokenizer, m.tokenizer_revision = str(snap.directory), snap.commit
            notes.append(snap.note("model.tokenizer"))
        if is_hub_id(m.name_or_path):
            snap = fetch_repo(m.name_or_path, model[1] or m.revision, "model.name_or_path",
                              weights=fetch != "config", download=fetch == "all")
            m.name_or_path, m.revision = str(snap.directory), snap.commit
            notes.append(snap.note("model.name_or_path"))
    except Unreachable as exc:
        if fetch != "config":
            raise ConfigError([str(exc)]) from None
        notes.append(f"{exc}; planned without the model's shape")
    return cfg, notes


def _earlier(earlier: Optional[dict], section: str, key: str, index: Optional[int] = None,
             revision_key: str = "revision") -> tuple[str, str]:
    """What the continued run's resolved config holds for a path field (of data.mix[index]), and its revision."""
    entry = (earlier or {}).get(section) or {}
    if index is not None:
        mix = entry.get("mix") or []
        entry = mix[index] if index < len(mix) else {}
    return str(entry.get(key) or ""), str(entry.get(revision_key) or "")


def _earlier_commit(repo_id: Optional[str], revision: Optional[str], then: str, then_revision: str) -> Optional[str]:
    """The commit the continued run read hub repository `repo_id` at, when this launch names no commit itself:
    a dataset keeps its id and records the commit as its revision; a model or tokenizer became the snapshot
    directory, whose name is the commit."""
    if not then or not is_hub_id(repo_id) or (revision and COMMIT.fullmatch(revision)):
        return None
    if then == repo_id:
        commit = then_revision
    else:
        found = re.search(rf"/models--{re.escape(repo_id.replace('/', '--'))}/snapshots/([0-9a-f]{{40}})$", then)
        commit = found.group(1) if found else ""
    return commit if COMMIT.fullmatch(commit) else None


def pin_hub_datasets(cfg: RunConfig, earlier: Optional[dict] = None,
                     fetch: Fetch = "config") -> tuple[RunConfig, list[str]]:
    """A copy of the config whose hub datasets' revisions are the commits they name now, with a note each. Rows
    of a hub dataset are read on the nodes (or by `prepare`), and the data cache is keyed by its name and split:
    unpinned, a dataset updated on the hub was hidden by the cache of its old version, and nodes reading at
    different times could read different versions. Pinned, the key and every reader name one commit.
    `earlier`: as for pin_hub_models, a continued run keeps the commits it started from. `fetch` `all` (launch,
    preflight, prepare, download): each pinned commit's data files are fetched into the Hugging Face cache too
    (fetch_dataset), where every reader finds them without the network; `sizes` (launch --dry_run): checked and
    sized, not downloaded. A hub out of reach: the commit the cache holds is read as it is (_dataset_commit)."""
    cfg = cfg.model_copy(deep=True)
    notes: list[str] = []
    pinned: dict[tuple[str, str, Optional[str]], list[DataRead]] = {}
    cached: set[tuple[str, str, Optional[str]]] = set()
    said: set[tuple[str, Optional[str]]] = set()
    for read in cfg.data.reads():
        if not is_hub_id(read.path):
            continue
        commit, note, from_cache = _dataset_commit(read, earlier)
        notes += [note] if note and (read.path, commit) not in said else []  # eval of data.path's commit: once
        said.add((read.path, commit))
        if commit is None:
            continue
        read.record("revision", commit)
        pinned.setdefault((read.path, commit, read.subset), []).append(read)
        if from_cache:
            cached.add((read.path, commit, read.subset))
    if fetch != "config":
        problems = []
        for key, reads in pinned.items():
            if key in cached:
                problems += _uncached_splits(reads)
                continue
            try:
                notes.append(fetch_dataset(reads, download=fetch == "all"))
            except Unreachable as exc:
                held = dataset_snapshot(reads[0].path, reads[0].revision) is not None
                notes.append(f"{exc}; " + ("its files in the Hugging Face cache are read as they are" if held else
                                           "it is not in the Hugging Face cache, so the nodes will need the hub"))
            except ConfigError as exc:
                problems += exc.problems
        # A subset recorded just now may make the eval read the training rows, which the written config would
        # then fail on every node.
        problems += [] if problems else eval_data_problems(cfg.data)
        if problems:
            raise ConfigError(problems)
    return cfg, notes


def _uncached_splits(reads: list[DataRead]) -> list[str]:
    """Reads of a dataset commit, found in the cache while the hub is out of reach, whose split is not there: an
    earlier launch fetched only the splits it read, and the nodes would fail on this one after the queue."""
    import datasets

    snapshot = dataset_snapshot(reads[0].path, reads[0].revision)
    problems = []
    for read in reads:
        try:
            builder = datasets.load_dataset_builder(str(snapshot), read.subset,
                                                    **subset_files(snapshot, read.subset, read.split))
            there = read.split in (builder.config.data_files or {})
        except (FileNotFoundError, ValueError, datasets.data_files.EmptyDatasetError):
            there = False
        held = held_split(snapshot, config_name(snapshot, read.subset), read.split)
        if held is not None and not held.whole:  # fetched for a row limit: enough for this read's?
            if read.max_rows is not None and read.max_rows <= (held.rows or 0):
                continue
            limit = f"{read.prefix}.max_rows is {read.max_rows:,}" if read.max_rows else f"no {read.prefix}.max_rows"
            what = (f"is held in the Hugging Face cache only in part, {held.describe()}, fetched for a run that read "
                    f"fewer rows (this one sets {limit})")
        elif there:
            continue
        else:
            what = "is not in the Hugging Face cache"
        problems.append(f"{read.field('split')}: split {read.split!r} of dataset {read.path}"
                        f"{f' subset {read.subset}' if read.subset else ''} at commit {str(read.revision)[:12]} "
                        f"{what} ({snapshot}), and the hub cannot be reached from this host: launch where it can, "
                        f"or run `shardtune download` there first")
    return problems


def hub_cache_env(cfg: RunConfig) -> dict[str, str]:
    """HF_HUB_CACHE for a job that reads a hub dataset: the cache `launch` downloaded it into, unless the job's
    environment names one. A model's snapshot is named by its path in the run config; a dataset only by its id and
    commit, which a node looks up in its own cache (dataset_snapshot): a node whose shell lacks the launching
    shell's HF_HOME, as a torchrun started there over ssh, looked in another cache and failed."""
    if not any(is_hub_id(read.path) for read in cfg.data.reads()):
        return {}
    from huggingface_hub import constants

    return {"HF_HUB_CACHE": str(Path(constants.HF_HUB_CACHE).resolve())}


def _dataset_commit(read: DataRead, earlier: Optional[dict]) -> tuple[Optional[str], str, bool]:
    """The commit a hub dataset read is pinned to, a note (or ""), and whether the hub was out of reach and the
    commit came from the cache. In order: the commit a continued run started from; the one the hub names for the
    revision now; without the hub, the one the cache holds for it (huggingface_hub's refs, which downloads here
    record too); else None, the revision left as it is: the nodes will need the hub."""
    then = _earlier(earlier, "data", read.keys["path"], read.mix_index, read.keys["revision"])
    kept = _earlier_commit(read.path, read.revision, *then)
    if kept:
        return kept, (f"{read.field('path')}: dataset {read.path} stays at commit {kept[:12]}, which this run "
                      f"started from (set {read.field('revision')} to a commit to change it)"), False
    asked = read.revision or "main"
    try:
        commit = dataset_commit(read.path, read.revision, read.field("path"), read.field("revision"))
    except Unreachable as exc:
        commit = cached_commit(read.path, "dataset", read.revision)
        if commit is None:
            return None, f"{exc}; {read.field('revision')} is left as it is, and the nodes will need the hub", False
        return commit, (f"{read.field('path')}: the hub cannot be reached from this host; dataset {read.path} at "
                        f"{asked} is commit {commit[:12]} in the Hugging Face cache, read as it is there"), True
    if commit == read.revision:
        return commit, "", False
    remember_ref(read.path, "dataset", asked, commit)
    return commit, (f"{read.field('path')}: dataset {read.path} at {asked} is commit {commit[:12]}: the run and "
                    f"its data cache read this commit"), False


def _repo_folder(repo_id: str, kind: str) -> Path:
    """A repository's folder in the Hugging Face cache (kind: model or dataset), as huggingface_hub lays it out."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / f"{kind}s--{repo_id.replace('/', '--')}"


def remember_ref(repo_id: str, kind: str, revision: str, commit: str) -> None:
    """Record in the cache that `revision` (a branch or tag) was `commit`, as huggingface_hub does for its own
    downloads by branch: downloads here are by commit, so a later launch without the hub could not tell which
    snapshot `main` was."""
    if revision == commit:
        return
    ref = _repo_folder(repo_id, kind) / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)


def cached_commit(repo_id: str, kind: str, revision: Optional[str]) -> Optional[str]:
    """The commit the cache holds for `revision` (a commit, or a branch or tag it recorded), when its snapshot
    directory is there (a dataset's with data files, not only the card datasets reads to resolve them); else None."""
    folder, revision = _repo_folder(repo_id, kind), revision or "main"
    ref = folder / "refs" / revision
    commit = revision if COMMIT.fullmatch(revision) else ref.read_text().strip() if ref.is_file() else ""
    if not commit or not (folder / "snapshots" / commit).is_dir():
        return None
    return commit if kind != "dataset" or _holds_data(folder / "snapshots" / commit) else None


def _holds_data(directory: Path) -> bool:
    return any(p.name != "README.md" for p in directory.rglob("*") if p.is_file())


def dataset_snapshot(repo_id: str, revision: Optional[str]) -> Optional[Path]:
    """The directory in the Hugging Face cache holding a hub dataset's commit, when `revision` is one and it is
    there (fetch_dataset put it there): the rows are read from it, on any host, without the network."""
    if not revision or not COMMIT.fullmatch(revision):
        return None
    return _repo_folder(repo_id, "dataset") / "snapshots" / revision if cached_commit(repo_id, "dataset",
                                                                                       revision) else None


def subset_files(directory: Path, subset: Optional[str], split: str) -> dict:
    """load_dataset's keyword arguments that point a dataset's snapshot directory at one subset's files of one
    split, as its card declares them. Needed because datasets resolves every configuration and split a local
    directory's card declares, and fails on one whose files were not downloaded (fetch_dataset fetches the splits
    read); {} for a card without configurations, whose splits datasets finds among the files present. No subset:
    the configuration datasets reads by default (marked `default`, else named so, else the only one)."""
    for config in _named_config(card_configs(directory), subset):
        files = config.get("data_files")
        if isinstance(files, list) and files and isinstance(files[0], dict):
            files = {entry["split"]: entry["path"] for entry in files}
        if isinstance(files, dict) and split in files:
            files = {split: files[split]}
        return {**({"data_dir": config["data_dir"]} if config.get("data_dir") else {}),
                **({"data_files": files} if files else {})}
    return {}


def _named_config(configs: list[dict], subset: Optional[str]) -> list[dict]:
    """The card's configuration datasets reads for `subset` (none named: the one marked `default`, else the one named
    so, else the only one), as a list of at most one."""
    if subset is not None:
        return [c for c in configs if c.get("config_name", "default") == subset][:1]
    return ([c for c in configs if c.get("default")] or
            [c for c in configs if c.get("config_name", "default") == "default"] or
            (configs if len(configs) == 1 else []))[:1]


def config_name(directory: Path, subset: Optional[str]) -> str:
    """The name of the configuration datasets reads from a snapshot for `subset`: the name held splits are
    recorded under (held_splits), the same for a launch that named the subset and a node that did not."""
    named = _named_config(card_configs(directory), subset)
    return subset or (named[0].get("config_name", "default") if named else "default")


def card_configs(directory: Path) -> list[dict]:
    """The configurations (subsets) a dataset card's metadata declares, datasets' manual configuration; [] if none."""
    readme = directory / "README.md"
    if not readme.is_file():
        return []
    from huggingface_hub import DatasetCard

    return list(DatasetCard.load(readme).data.to_dict().get("configs") or [])


def fetch_dataset(reads: list[DataRead], download: bool = True) -> str:
    """Download a hub dataset's data files at the pinned commit (those datasets resolves for the subset and splits
    read, and the card whose metadata names them) into the Hugging Face cache; a note. `reads`: the config entries
    reading this commit and subset; a split the subset lacks is refused, and when the card declares subsets and none
    is named, the one datasets reads by default is recorded (the nodes read the snapshot by that name). Nodes often
    have no network: before this every node read the dataset from the hub, or failed at start with a traceback after
    the job's wait in the queue. Only the splits read: evaluating on allenai/c4's `en` validation split must not
    download its 300 GB train split (the nodes point datasets at the split read, subset_files). `download` False (a
    dry run): the same checks and note, with the size launch would download."""
    import datasets
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.hf_api import RepoFile

    first = reads[0]
    repo_id, commit, subset, field_name = first.path, str(first.revision), first.subset, first.field("path")
    with _HubErrors(repo_id, commit, field_name, "dataset", first.field("revision")):
        try:
            builder = datasets.load_dataset_builder(repo_id, subset, revision=commit)
        except (datasets.exceptions.FileNotFoundDatasetsError, datasets.data_files.EmptyDatasetError, ValueError,
                RuntimeError) as exc:  # no such dataset or no files datasets can read; RuntimeError: a loading script
            hint = "; name one in " + first.field("subset") if "Config name is missing" in str(exc) else ""
            raise ConfigError([f"{first.field('subset') if subset else field_name}: datasets cannot read {repo_id}"
                               f"{f' subset {subset}' if subset else ''} at commit {commit[:12]}: "
                               f"{' '.join(str(exc).split()) or type(exc).__name__}{hint}"]) from None
        data_files = builder.config.data_files or {}
        missing = [f"{read.field('split')}: {read.split!r} is not a split of {repo_id}"
                   f"{f' subset {subset}' if subset else ''} at commit {commit[:12]}; it has "
                   f"{', '.join(sorted(data_files)) or 'none'}" for read in reads if read.split not in data_files]
        if missing:
            raise ConfigError(missing)
        prefix = f"hf://datasets/{repo_id}@{commit}/"
        files_of = {read.split: [str(f)[len(prefix):] for f in data_files[read.split] if str(f).startswith(prefix)]
                    for read in reads}
        limits = _row_limits(reads)
        listing = {f.path: f.size for f in HfApi().list_repo_tree(repo_id, revision=commit, repo_type="dataset",
                                                                 recursive=True) if isinstance(f, RepoFile)}
        wanted = sorted({n for split, names in files_of.items() if split not in limits for n in names})
        wanted += ["README.md"] if "README.md" in listing else []
        directory = _repo_folder(repo_id, "dataset") / "snapshots" / commit
        size = sum(listing.get(n, 0) for n in wanted)
        fetched = sum(listing.get(n, 0) for n in wanted if not _present(directory / n, listing.get(n, -1)))
        _check_room(fetched, Path(constants.HF_HUB_CACHE), repo_id, field_name)
        held, limited = len(wanted), []
        if download:
            if wanted:
                snapshot_download(repo_id, repo_type="dataset", revision=commit, allow_patterns=wanted)
            for split in files_of.keys() - limits.keys():
                record_split(directory, builder.config.name, split, files_of[split], None)
        for split, (need, field) in limits.items():
            names = files_of[split]
            if not download:
                limited.append(f"split {split} is read to its first {need:,} rows ({field}): launch downloads its "
                               f"{len(names)} files ({size_text(sum(listing.get(n, 0) for n in names))}) in order only "
                               f"until they hold them")
                continue
            held_now = held_split(directory, builder.config.name, split)
            if held_now is not None and (held_now.whole or (held_now.rows or 0) >= need):  # counted by a fetch
                got, rows, more = held_now.present, held_now.rows, 0
            else:
                got, rows, more = _fetch_rows(repo_id, commit, subset, split, names, need, listing, field_name)
                record_split(directory, builder.config.name, split, names, rows)
            held, size, fetched = held + len(got), size + sum(listing.get(n, 0) for n in got), fetched + more
            limited.append(f"split {split}: only the first {len(got)} of its {len(names)} files, which hold the "
                           f"first {need:,} rows read ({field})" if rows is not None else
                           f"split {split}: its first {need:,} rows ({field}) take all {len(names)} of its files")
    declared = bool(card_configs(directory))
    if subset is None and declared:
        for read in reads:
            read.record("subset", builder.config.name)
    named = f" subset {builder.config.name}" if declared else ""
    return (f"{field_name}: dataset {repo_id}{named} at commit {commit[:12]}"
            + _files_note(held, size, directory, fetched, download, "every reader reads them")
            + "".join(f"; {text}" for text in limited))


def _row_limits(reads: list[DataRead]) -> dict[str, tuple[int, str]]:
    """Splits of which every read takes only the first rows: the most rows any of them reads, and its field."""
    limits: dict[str, tuple[int, str]] = {}
    whole = {read.split for read in reads if read.max_rows is None}
    for read in reads:
        if read.split not in whole and read.max_rows > limits.get(read.split, (0, ""))[0]:
            limits[read.split] = (read.max_rows, f"{read.prefix}.max_rows")
    return limits


def _fetch_rows(repo_id: str, commit: str, subset: Optional[str], split: str, names: list[str], need: int,
                listing: dict[str, int], field_name: str) -> tuple[list[str], Optional[int], int]:
    """Download a split's files in reading order until they hold `need` rows. Returns the files held, the rows they
    hold (None when that took every file) and the bytes downloaded. Room is checked file by file, before each. Each
    file's rows are all counted, so that a later run reading up to that many is known to find them offline: from a
    Parquet footer, else as the readers count them, datasets streaming the file."""
    import datasets
    import pyarrow.parquet as pq
    from huggingface_hub import constants, hf_hub_download

    directory = _repo_folder(repo_id, "dataset") / "snapshots" / commit
    rows = fetched = 0
    for count, name in enumerate(names, 1):
        if not _present(directory / name, listing.get(name, -1)):
            _check_room(listing.get(name, 0), Path(constants.HF_HUB_CACHE), repo_id, field_name)
            hf_hub_download(repo_id, name, repo_type="dataset", revision=commit)
            fetched += listing.get(name, 0)
        if name.endswith(".parquet"):
            rows += pq.ParquetFile(directory / name).metadata.num_rows
        else:
            rows += sum(1 for _ in datasets.load_dataset(str(directory), subset, split=split, streaming=True,
                                                         data_files={split: [name]}))
        if rows >= need:
            return names[:count], rows if count < len(names) else None, fetched
    return names, None, fetched


def dataset_commit(repo_id: str, revision: Optional[str], path_field: str, revision_field: str) -> str:
    from huggingface_hub import HfApi

    with _HubErrors(repo_id, revision or "main", path_field, "dataset", revision_field):
        return HfApi().dataset_info(repo_id, revision=revision).sha


class Unreachable(Exception):
    """The hub cannot be reached from this host and the files are not in the cache."""


def fetch_repo(repo_id: str, revision: Optional[str], field_name: str, weights: bool,
               revision_field: str = "model.revision", download: bool = True) -> Snapshot:
    """Of `revision`'s commit: config.json alone (a model, weights False), or every file the run reads (a model's
    weights too; a tokenizer's files only), downloaded into the cache unless already there, or only listed and
    sized (`download` False, a dry run; a weight index is then read outside the cache, whose snapshot would
    otherwise look like a model with missing shards). Raises ConfigError naming the field, or Unreachable."""
    from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
    from huggingface_hub.hf_api import RepoFile

    revision = revision or "main"
    errors = _HubErrors(repo_id, revision, field_name, revision_field=revision_field)
    commit, offline = None, None
    try:
        with errors:  # one request without retries, so a host without the hub finds out at once
            commit = HfApi().model_info(repo_id, revision=revision).sha
    except Unreachable as exc:
        offline = exc
    config_file = None
    if field_name == "model.name_or_path":
        try:
            with errors:
                config_file = Path(hf_hub_download(repo_id, "config.json", revision=commit or revision,
                                                   local_files_only=commit is None))
        except Unreachable:
            if offline is None:
                raise
            raise offline from None
        if not weights:
            return Snapshot(repo_id, revision, config_file.parent.name, config_file.parent)
        if commit is None:
            return _cached(repo_id, revision, config_file.parent, field_name)
    elif commit is None:
        cached = cached_commit(repo_id, "model", revision)
        if cached is None:
            raise offline
        return _cached(repo_id, revision, _repo_folder(repo_id, "model") / "snapshots" / cached, field_name)
    remember_ref(repo_id, "model", revision, commit)
    with errors:
        listing = {f.path: f.size for f in HfApi().list_repo_tree(repo_id, revision=commit, recursive=True)
                   if isinstance(f, RepoFile)}
        config = json.loads(config_file.read_text()) if config_file else None
        chosen = chosen_weights(listing, config) if weights else None
        index = None
        if chosen and chosen.endswith(".index.json") and chosen in listing:
            with tempfile.TemporaryDirectory() as elsewhere:
                index = json.loads(Path(hf_hub_download(repo_id, chosen, revision=commit,
                                                        local_dir=None if download else elsewhere)).read_text())
        wanted = files_read(listing if weights else [n for n in listing if not n.endswith(WEIGHT_SUFFIXES)],
                            config, index)
        absent = sorted(set(wanted) - set(listing))
        if absent:
            raise ConfigError([f"{field_name}: {repo_id} at commit {commit[:12]} lacks {', '.join(absent[:3])}, "
                               f"which its own config or index names: an incomplete upload?"])
        directory = _repo_folder(repo_id, "model") / "snapshots" / commit
        fetched = sum(listing[n] for n in wanted if not _present(directory / n, listing[n]))
        _check_room(fetched, Path(constants.HF_HUB_CACHE), repo_id, field_name)
        if download:
            directory = Path(snapshot_download(repo_id, revision=commit, allow_patterns=wanted))
    return Snapshot(repo_id, revision, commit, directory, wanted, sum(listing[n] for n in wanted), fetched,
                    {n: s for n, s in listing.items() if n not in set(wanted)}, downloaded=download)


def _present(file: Path, size: int) -> bool:
    try:
        return file.stat().st_size == size
    except OSError:
        return False


def _check_room(need: int, cache: Path, repo_id: str, field_name: str) -> None:
    """Refuse before downloading what the cache's filesystem has no room for: a download that fills a shared
    filesystem stops other users' jobs too. (free_space: what an unprivileged user may still write there; a
    filesystem that does not say is not refused.)"""
    found = free_space(cache)
    free = found[1] if found else None
    if free is not None and need > free:
        raise ConfigError([f"{field_name}: {repo_id} needs {need / 1e9:,.2f} GB more in the Hugging Face cache "
                           f"{cache}, whose filesystem has {free / 1e9:,.2f} GB free: set HF_HOME (or HF_HUB_CACHE) "
                           f"to a filesystem with room that every node mounts"])


def _cached(repo_id: str, revision: str, directory: Path, field_name: str) -> Snapshot:
    """The commit's snapshot as the cache holds it, when the hub cannot be listed. A model's is usable once it holds
    the weights from_pretrained starts from (the weight-file check then looks at each of them); a tokenizer's
    (field model.tokenizer) as it is."""
    names = [p.name for p in directory.iterdir()]
    config = json.loads((directory / "config.json").read_text()) if field_name == "model.name_or_path" else None
    if config is not None and chosen_weights([n for n in names if (directory / n).exists()], config) is None:
        raise ConfigError([f"{field_name}: {repo_id} is only partly in the Hugging Face cache ({directory} has no "
                           f"weights) and the hub cannot be reached from this host: launch where the hub can be "
                           f"reached, or download it there (`hf download {repo_id}`) and give its directory"])
    files = sorted(names)
    size = sum((directory / n).stat().st_size for n in files)
    return Snapshot(repo_id, revision, directory.name, directory, files, size, 0)


class _HubErrors:
    """huggingface_hub's errors as the config errors a user can act on, naming the field."""

    def __init__(self, repo_id: str, revision: str, field_name: str, kind: str = "model",
                 revision_field: str = "model.revision"):
        self.repo_id, self.revision, self.field = repo_id, revision, field_name
        self.kind, self.revision_field = kind, revision_field

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None or isinstance(exc, (ConfigError, Unreachable)):
            return False
        from huggingface_hub import constants
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        repo, title = self.repo_id, "invalid config"
        where = f"{constants.ENDPOINT}/{'datasets/' if self.kind == 'dataset' else ''}{repo}"
        if isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled)) or _is_connection(exc) or (
                isinstance(exc, HfHubHTTPError) and exc.response is not None and exc.response.status_code >= 500):
            unreachable = f"the hub ({constants.ENDPOINT}) cannot be reached from this host ({_first_line(exc)})"
            if self.kind == "dataset":
                raise Unreachable(f"{self.field}: dataset {repo} at {self.revision}: {unreachable}") from None
            raise Unreachable(
                f"{self.field}: {repo} at {self.revision} is not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
                f" and {unreachable}: launch where it can, such as the login node, or download it there "
                f"(`hf download {repo}`) and give its directory") from None
        if isinstance(exc, GatedRepoError):
            message = (f"{self.field}: {repo} is gated: accept its terms at {where}, then log in on this host "
                       f"(`hf auth login`, or set HF_TOKEN)")
        elif isinstance(exc, RepositoryNotFoundError):
            message = (f"{self.field}: {repo} is not a path here, and the hub has no {self.kind} repository by that "
                       f"name you can read (a private one needs `hf auth login` or HF_TOKEN)")
        elif isinstance(exc, RevisionNotFoundError):
            message = f"{self.revision_field}: {self.revision!r} is not a branch, tag or commit of {repo}"
        elif isinstance(exc, EntryNotFoundError):
            message = f"{self.field}: {repo} at {self.revision} has no config.json: not a transformers model"
        elif isinstance(exc, HfHubHTTPError):
            message = f"{self.field}: the hub refused {repo} at {self.revision}: {_first_line(exc)}"
        elif isinstance(exc, OSError):
            title = "cannot download"
            message = (f"{self.field}: downloading {repo} into the Hugging Face cache {constants.HF_HUB_CACHE} failed: "
                       f"{_first_line(exc)}. A quota (which the free space a filesystem reports does not show)? "
                       f"Set HF_HOME (or HF_HUB_CACHE) to a filesystem with room that every node mounts; launching "
                       f"again resumes the download")
        else:
            return False
        raise ConfigError([message], title=title) from None


def _is_connection(exc: BaseException) -> bool:
    """A network failure, by the class names of httpx (huggingface_hub 1 and later) and requests (before)."""
    names = {c.__name__ for c in type(exc).__mro__}
    return bool(names & {"ConnectError", "TimeoutException", "ConnectionError", "Timeout", "ProxyError"})


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
