"""Prompt files streamed and sharded: text, PartiPrompts' TSV, DiffusionDB's Parquet."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlds.config import ConfigError
from rlds.data.sources import FileSource, PromptShard, first_prompts, prompt_id, read_prompts, unique_prompts


def diffusiondb_like(path, n=3000, repeats=500, row_group_size=700):
    """A metadata.parquet with DiffusionDB's columns, `repeats` prompts appearing twice."""
    prompts = [f"a painting of castle number {i}, trending on artstation" for i in range(n)]
    prompts += prompts[:repeats] + ["", "   "]
    table = pa.table({"image_name": [f"{i}.png" for i in range(len(prompts))], "prompt": prompts,
                      "seed": np.arange(len(prompts), dtype=np.int64)})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def test_parquet_tsv_and_text_stream_their_prompts(tmp_path):
    source = FileSource(str(diffusiondb_like(tmp_path / "metadata.parquet")))
    assert sum(1 for _ in read_prompts(source)) == 3500  # empty prompts skipped, repeats kept
    assert len(list(unique_prompts(source, "train"))) == 3000
    tsv = tmp_path / "PartiPrompts.tsv"
    tsv.write_text("Prompt\tCategory\tChallenge\nA red apple\tFood\tColors\nbird\tAnimals\tBasic\n\t\t\n")
    assert list(read_prompts(FileSource(str(tsv)))) == ["A red apple", "bird"]
    txt = tmp_path / "p.txt"
    txt.write_text("# comment\na cat\n\n a dog \n")
    assert list(read_prompts(FileSource(str(txt)))) == ["a cat", "a dog"]
    with pytest.raises(ValueError, match=r"line 1 has no column 'Text' .*Prompt, Category"):
        list(read_prompts(FileSource(str(tsv), column="Text")))
    with pytest.raises(ValueError, match=r"no column 'caption' \(columns: image_name, prompt, seed\)"):
        list(read_prompts(FileSource(str(tmp_path / "metadata.parquet"), column="caption")))


def test_shards_split_the_unique_training_prompts_and_the_split_is_fixed_by_the_text(tmp_path):
    source = FileSource(str(diffusiondb_like(tmp_path / "m.parquet")), heldout_share=0.1, validation_share=0.05)
    parts = {p: set(unique_prompts(source, p)) for p in ("train", "validation", "heldout")}
    assert sum(map(len, parts.values())) == 3000
    assert 200 < len(parts["heldout"]) < 400 and 80 < len(parts["validation"]) < 220
    shards = [set(unique_prompts(source, "train", i, 3)) for i in range(3)]
    assert set.union(*shards) == parts["train"] and sum(map(len, shards)) == len(parts["train"])
    # another file with the same prompts in another order: the same split
    other = FileSource(str(tmp_path / "o.txt"), heldout_share=0.1, validation_share=0.05)
    (tmp_path / "o.txt").write_text("\n".join(sorted(parts["heldout"] | parts["train"])) + "\n")
    assert set(unique_prompts(other, "heldout")) == parts["heldout"]
    assert first_prompts(source, "validation", 5) == [p for p in unique_prompts(source, "validation")][:5]
    assert prompt_id("a cat") == prompt_id("a cat") != prompt_id("a dog") and 0 <= prompt_id("a cat") < 2 ** 63


def test_a_shard_made_at_a_position_continues_exactly_there_across_epochs(tmp_path):
    source = FileSource(str(diffusiondb_like(tmp_path / "m.parquet", n=300, repeats=50)))
    shard = PromptShard(source, "train", 1, 2, seed=7, shuffle_buffer=64)
    first = shard.draw(100)
    size = len(set(unique_prompts(source, "train", 1, 2)))
    assert len(set(first)) == 100 and first != sorted(first)  # shuffled, no repeats within an epoch
    position = shard.position
    ahead = shard.draw(size)  # runs into the next epoch
    assert shard.position == (1, 100)
    assert set(ahead[:size - 100]) | set(first) == set(unique_prompts(source, "train", 1, 2))
    resumed = PromptShard(source, "train", 1, 2, seed=7, position=position, shuffle_buffer=64)
    assert resumed.draw(size) == ahead
    assert PromptShard(source, "train", 1, 2, seed=8, shuffle_buffer=64).draw(100) != first
    (tmp_path / "one.txt").write_text("a cat\n")
    one = FileSource(str(tmp_path / "one.txt"))
    empty = next(i for i in range(4) if not list(unique_prompts(one, "train", i, 4)))
    with pytest.raises(ValueError, match=rf"shard {empty} of 4 has no train prompts .*too few prompts"):
        PromptShard(one, "train", empty, 4, seed=0).draw(1)


def test_prompt_files_and_generated_sets_are_checked_and_never_handed_whole_to_the_samplers(tiny_config, tmp_path):
    from rlds.trainer import Trainer

    path = diffusiondb_like(tmp_path / "metadata.parquet")
    config = tiny_config("prompts.items=[]", f"prompts.file={path}", "prompts.heldout_share=0.1")
    trainer = Trainer(config, progress=False)
    assert trainer.prompts == [[]] and trainer.sources[0].path == str(path)
    generated = Trainer(tiny_config("prompts.items=[]", "prompts.generated=relations"), progress=False)
    assert generated.prompts == [[]] and generated.sources[0].kind == "relations"  # 26,466 prompts, streamed
    with pytest.raises(ConfigError, match=r"prompts\.heldout_share: must be in \[0, 1\)"):
        tiny_config("prompts.items=[]", f"prompts.file={path}", "prompts.heldout_share=1.5")
    with pytest.raises(ConfigError, match=r"prompts: column, heldout_share and validation_share are for prompts\.file"):
        tiny_config("prompts.column=text")
    empty = tmp_path / "empty.tsv"
    empty.write_text("Prompt\tCategory\n")
    with pytest.raises(ConfigError, match=r"no training prompts in .*empty\.tsv"):
        Trainer(tiny_config("prompts.items=[]", f"prompts.file={empty}"), progress=False)
    bad = tmp_path / "prompts.csv"
    bad.write_text("a cat\n")
    with pytest.raises(ConfigError, match=r"prompts\.file: .*prompts\.csv: read as text, tsv or parquet"):
        tiny_config("prompts.items=[]", f"prompts.file={bad}")


@pytest.mark.timeout(300)
def test_a_run_streams_its_shards_and_resumes_each_where_it_stopped(ray_local, tiny_config, tmp_path):
    from rlds.trainer import Trainer

    path = diffusiondb_like(tmp_path / "metadata.parquet", n=400, repeats=40)
    run = tmp_path / "run"
    common = ("prompts.items=[]", f"prompts.file={path}", f"run_dir={run}", "checkpoint_every=2")
    Trainer(tiny_config(*common, "iterations=2"), progress=False).run()
    state = json.loads((run / "checkpoints" / "iter_000002" / "state.json").read_text())
    saved = state["prompt_positions"]
    assert saved["samplers"] == 2 and sum(d for _, _, _, d in saved["positions"]) >= 16  # 2 x 8 trained
    assert {i for i, *_ in saved["positions"]} <= {0, 1}
    Trainer(tiny_config(*common, "iterations=4", f"resume={run / 'checkpoints' / 'iter_000002'}"),
            progress=False).run()
    later = json.loads((run / "checkpoints" / "iter_000004" / "state.json").read_text())["prompt_positions"]
    before = {(i, t): (e, d) for i, t, e, d in saved["positions"]}
    after = {(i, t): (e, d) for i, t, e, d in later["positions"]}
    # each shard goes on from where it stopped (a sampler that restarted its shard would be behind);
    # which sampler made the resumed iterations' batches is the scheduler's choice, so one may not move
    assert all(after[k] >= before[k] for k in before) and any(after[k] > before[k] for k in before)
    assert sum(d for _, _, _, d in later["positions"]) >= 32
