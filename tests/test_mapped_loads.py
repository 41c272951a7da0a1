"""A resumed rank maps its checkpoint files and copies out only what the optimizer keeps (trainer/mapped_loads.py)."""
from __future__ import annotations

import torch

from launcher.planning.memory import Setup, estimate_memory
from launcher.planning.model_size import counts_from_path
from trainer.checkpoint_io import safe_load
from trainer.mapped_loads import COPY_CHUNK, MappedLoads, drop_pages, mapped_files

from test_memory import AS_ASKED, CONFIGS, bf16_run_config

TINY_LLAMA = {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8,
              "num_key_value_heads": 8, "vocab_size": 512, "tie_word_embeddings": False}


def test_a_resumed_rank_holds_no_second_copy_of_its_checkpoint(tmp_path):
    """DeepSpeed's own checkpoint engine reads each rank's files whole into host memory: the optimizer partition
    (fp32 master and two moments, 12 bytes per parameter of the rank's share) is all resident before the master is
    copied into place, so a rank peaks 4 bytes per parameter of its share above what it keeps (the moments, which
    torch's Optimizer.load_state_dict keeps as loaded when device and dtype match: offloaded, or on CPU); at
    stage 0 the module file's weights do the same. On an 8-GPU node resuming Llama-3-70B at ZeRO-3 with the
    optimizer offloaded that is 282 GB of host RAM beyond the run's own.

    shardtune's reader maps the files and copies the moments out of them a chunk at a time: measured on two real
    ranks (bench/resume_memory.py's, on a 26M-parameter Llama), the same states (bitwise), the same memory kept, a
    peak at most one chunk above it, and no checkpoint file left mapped (the disk space of a checkpoint
    train.keep_last deletes is freed)."""
    from bench.resume_memory import pair
    from launcher.planning.deepspeed_config import render_deepspeed_config

    overrides = [("zero.stage=2", "zero.offload_optimizer=cpu"), ("zero.stage=3", "zero.offload_optimizer=cpu"),
                 ("zero.stage=0",)]  # stage 1 loads as stage 2 does (stage_1_and_2.py)
    for i, override in enumerate(overrides):
        ds_config = render_deepspeed_config(bf16_run_config(tmp_path, *override, "train.precision=fp32"))
        ran = pair(tmp_path / str(i) / "step", ds_config, TINY_LLAMA, "save,deepspeed,shardtune",
                   tmp_path / f"{i}.store")
        for rank in range(2):
            ours, theirs = ran["shardtune"][rank], ran["deepspeed"][rank]
            # From first principles: fp32, Adam's two moments kept (8 bytes per parameter of the rank's share,
            # the whole model's at stage 0), and 4 more loaded beside them by DeepSpeed (its master or weights).
            share = theirs["params"] // (1 if override == ("zero.stage=0",) else 2)
            assert ours["states"] == theirs["states"], override
            assert abs(theirs["added"] - 8 * share) < 0.03 * 8 * share, (override, theirs)
            assert abs(ours["added"] - 8 * share) < 0.03 * 8 * share, (override, ours)
            assert abs(theirs["peak_over_kept"] - 4 * share) < 0.03 * 4 * share, (override, theirs)
            assert ours["peak_over_kept"] <= COPY_CHUNK + (2 << 20) < 0.25 * 4 * share, (override, ours)
            assert ours["mapped_after"] == 0 == theirs["mapped_after"], (override, ours, theirs)

    counts = counts_from_path(CONFIGS / "llama3_70b.json")
    node = Setup(stage=3, world_size=8, gpus_per_node=8, dtype="bf16", offload_optimizer=True)
    est = estimate_memory(counts, node, margins=AS_ASKED)
    assert est.host_total == est.host["process_runtime"] + est.host["offloaded_optimizer"]  # resuming adds nothing


def test_a_rank_resuming_on_another_world_size_does_not_hold_the_saving_ranks_optimizer_shard(tmp_path):
    """A resume on another world size reads DeepSpeed's universal format. At ZeRO-3 its converter writes the saving
    world's rank 0 optimizer shard whole into zero/optimizer_state.pt (12 bytes per parameter of that rank's
    share), and DeepSpeed's loader reads that file into every resuming rank for its step count and keeps it for
    the whole load: a 70B model saved by one 8-GPU node and resumed on four would put 106 GB on every rank, 847 GB
    on each node. shardtune's conversion (trainer.safe_convert) writes that file without the shard's tensors,
    which the loader never uses, and maps the checkpoint it reads, so the extract worker's copy of the shard is
    page cache the kernel can reclaim, not memory of its own; its loads map every file
    (checkpoint_io.guarded_loads).

    Measured on a one-rank ZeRO-3 checkpoint (26M parameters, fp32, optimizer offloaded), converted by DeepSpeed's
    own ds_to_universal and resumed by two real ranks with DeepSpeed's reader, and converted and resumed by
    shardtune's (bench/resume_memory.py's): the same optimizer states, bitwise, and no file left mapped; DeepSpeed's
    reader peaks at least the shard above what it keeps, shardtune's at most one parameter's file and one copy
    chunk above; both converters write the same files but that one, and the anonymous memory of shardtune's
    processes peaks at least half the shard below DeepSpeed's.

    Every rank loads a slice of every file of the copy. Hashing each file as it was loaded read the whole copy on
    every rank (12 bytes per parameter of the model, 840 GB per rank at 70B); the ranks now verify a share of it
    each, and a load finds its file unchanged since (checkpoint_io.identity) and does not read it again."""
    from bench.resume_memory import convert_universal, pair
    from launcher.planning.deepspeed_config import render_deepspeed_config

    stage = ("zero.stage=3", "zero.offload_optimizer=cpu", "train.precision=fp32")
    saved = tmp_path / "one-rank"
    pair(saved, render_deepspeed_config(bf16_run_config(tmp_path, *stage, "launch.procs_per_node=1")), TINY_LLAMA,
         "save", tmp_path / "save.store", world=1)
    converted = {"deepspeed": convert_universal(saved),
                 "shardtune": convert_universal(saved, tmp_path / "universal-shardtune", shardtune=True)}
    ds_config = render_deepspeed_config(bf16_run_config(tmp_path, *stage))
    ran = {reader: pair(done["folder"], ds_config, TINY_LLAMA, reader, tmp_path / f"{reader}.store")[reader]
           for reader, done in converted.items()}
    shard = (converted["deepspeed"]["folder"] / "zero" / "optimizer_state.pt").stat().st_size
    params = ran["deepspeed"][0]["params"]
    assert abs(shard - 12 * params) < 0.01 * 12 * params  # the one saving rank's whole optimizer, as described
    # The conversion: the same files but the shard's, and the saving rank's shard page cache in shardtune's.
    theirs, ours = (dict(converted[reader]["files"]) for reader in ("deepspeed", "shardtune"))
    assert ours.pop("zero/optimizer_state.pt")["size"] < 1e-3 * shard
    theirs.pop("zero/optimizer_state.pt")
    assert ours == theirs
    assert converted["shardtune"]["anon_peak"] < converted["deepspeed"]["anon_peak"] - 0.5 * shard, converted
    largest = 4 * TINY_LLAMA["hidden_size"] * TINY_LLAMA["intermediate_size"]  # an MLP matrix's fp32 file
    for rank in range(2):
        ours, theirs = ran["shardtune"][rank], ran["deepspeed"][rank]
        assert ours["states"] == theirs["states"]
        assert theirs["peak_over_kept"] >= shard, theirs
        assert ours["peak_over_kept"] <= largest + COPY_CHUNK + (2 << 20) < 0.1 * shard, ours
        assert ours["mapped_after"] == 0 == theirs["mapped_after"]
    # What each rank reads (through read(): verifying and parsing; a mapped file's pages are not counted):
    # DeepSpeed's reader every file of its copy whole, on every rank; shardtune's ranks half of theirs each, to
    # verify it, and no file whole again: they once hashed every file as they loaded it, reading the whole copy
    # and their half (1.5 copies each). Beyond that only the parse of each file (about 0.13 MB a file here).
    copy = {reader: sum(f.stat().st_size for f in converted[reader]["folder"].rglob("*") if f.is_file())
            for reader in converted}
    assert all(r["read"] >= copy["deepspeed"] for r in ran["deepspeed"]), (copy, ran["deepspeed"])
    assert sum(r["read"] for r in ran["shardtune"]) < 1.3 * copy["shardtune"], (copy, ran["shardtune"])
    assert all(r["read"] < 0.75 * copy["shardtune"] for r in ran["shardtune"]), (copy, ran["shardtune"])


def test_a_rank_resuming_on_another_world_size_at_zero_1_or_2_fills_its_optimizer_states_in_place(tmp_path):
    """At ZeRO-1/2 DeepSpeed's universal load clones each parameter's slice of both Adam moments and keeps the
    clones until every parameter is read, then copies them into one new flat buffer per moment
    (map_to_flat_opt_states) while the clones are still held: a rank peaks 4 bytes per parameter of its share above
    the state it keeps (and on a GPU the clones, 8 bytes per parameter of the share, sit in host memory).
    shardtune copies each parameter's slices into the flat moments as they are read
    (mapped_loads.universal_states_in_place) straight from the mapped files, cloning nothing, so the load peaks at
    the pages of the files being read.

    Measured on checkpoints saved by two ranks (26M parameters; ZeRO-2 in fp32 with the optimizer offloaded, and
    ZeRO-1 in bf16 with accumulation, which DeepSpeed runs with its BF16_Optimizer), converted by
    DeepSpeed's ds_to_universal and resumed on one rank (one rank: DeepSpeed's parameter all-gather after the load
    is skipped, whose gloo copy would otherwise set the peak), by DeepSpeed's reader and by shardtune's: the same
    optimizer states, bitwise, the same memory kept (two moments: 8 bytes per parameter), DeepSpeed's peak 4 bytes
    per parameter above it, shardtune's at most two of the largest parameter's files."""
    from bench.resume_memory import convert_universal, pair
    from launcher.planning.deepspeed_config import render_deepspeed_config

    largest = 4 * TINY_LLAMA["hidden_size"] * TINY_LLAMA["intermediate_size"]  # an MLP matrix's fp32 file
    # ZeRO-2 (DeepSpeedZeroOptimizer), and ZeRO-1 in bf16 with accumulation (BF16_Optimizer): both load this way.
    for i, stage in enumerate([("zero.stage=2", "zero.offload_optimizer=cpu", "train.precision=fp32"),
                               ("zero.stage=1",)]):
        saved = tmp_path / str(i) / "two-ranks"
        pair(saved, render_deepspeed_config(bf16_run_config(tmp_path, *stage)), TINY_LLAMA, "save",
             tmp_path / f"save{i}.store")
        copy = convert_universal(saved)["folder"]
        ds_config = render_deepspeed_config(bf16_run_config(tmp_path, *stage, "launch.procs_per_node=1"))
        ran = pair(copy, ds_config, TINY_LLAMA, "deepspeed,shardtune", tmp_path / f"load{i}.store", world=1)
        (ours,), (theirs,) = ran["shardtune"], ran["deepspeed"]
        params = theirs["params"]
        assert ours["states"] == theirs["states"], stage
        for reader in (ours, theirs):
            assert abs(reader["added"] - 8 * params) < 0.03 * 8 * params, (stage, reader)
        assert abs(theirs["peak_over_kept"] - 4 * params) < 0.03 * 4 * params, (stage, theirs)
        assert ours["peak_over_kept"] <= 2 * largest + (2 << 20) < 0.1 * 4 * params, (stage, ours)


def test_memory_of_its_own_is_never_dropped_and_a_mapped_tensor_reads_back_from_its_file(tmp_path):
    """Dropping pages is only safe on a file's private mapping: an untouched page comes back from the file. On memory
    a tensor owns it would zero the data, so a state read into memory (the legacy format, or a file read whole) is
    left alone, and a mapped one still holds its values after its pages are dropped."""
    values = torch.arange(1 << 20, dtype=torch.float32)
    torch.save({"mapped": values}, tmp_path / "zip.pt")
    torch.save({"read": values}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    loads = MappedLoads()
    mapped = loads.add(safe_load(tmp_path / "zip.pt", mmap=True))["mapped"]
    read = loads.add(safe_load(tmp_path / "legacy.pt"))["read"]  # dropping the first file's pages on the way
    assert str((tmp_path / "zip.pt").resolve()) in mapped_files(tmp_path)
    drop_pages(read.data_ptr(), read.nbytes)  # what add() is careful never to do: the proof the care matters
    assert (read == 0).float().mean() > 0.99  # all but the partial pages at either end
    read = safe_load(tmp_path / "legacy.pt")["read"]
    loads.add({"read": read})
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))])
    optimizer.state[optimizer.param_groups[0]["params"][0]] = {"mapped": mapped, "read": read}
    assert loads.take_states(optimizer) == 1
    state = next(iter(optimizer.state.values()))
    assert state["read"] is read and torch.equal(read, values) and torch.equal(state["mapped"], values)
    assert state["mapped"].untyped_storage().data_ptr() != mapped.untyped_storage().data_ptr()
    del mapped, state, optimizer
    assert mapped_files(tmp_path) == []
