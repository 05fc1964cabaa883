import json

import pytest

from saap.pipeline.cli import main
from saap.pipeline.finetune import FinetuneSettings, finetune
from saap.pipeline.finetune.data import read_data, tokenize_examples
from saap.pipeline.finetune.teacher_text import (
    RECORD_FILE,
    SAMPLES_FILE,
    SampleSettings,
    sample_teacher_text,
    start_ids,
)
from saap.runtime.errors import SaapError
from tests.conftest import FAMILY_EXTRAS, make_model
from tests.pipeline.finetune.test_distill import pruned  # noqa: F401  (fixture)


def samples(out) -> list[list[int]]:
    return [json.loads(line)["input_ids"] for line in (out / SAMPLES_FILE).read_text().splitlines()]


def test_sampling_is_seeded_and_starts_from_the_start_token(hf_dir, tokenizer, tmp_path):
    settings = SampleSettings(count=5, tokens=12, batch_size=2, seed=3)
    record = sample_teacher_text(str(hf_dir), tmp_path / "a", settings, progress=False)
    sample_teacher_text(str(hf_dir), tmp_path / "b", settings, progress=False)
    first = samples(tmp_path / "a")
    assert first == samples(tmp_path / "b")  # same seed, same text
    assert len(first) == 5 and record["sequences"] == 5
    assert all(s[0] == tokenizer.bos_token_id and 2 <= len(s) <= 13 for s in first)
    assert record["new_tokens"] == sum(len(s) - 1 for s in first)
    assert json.loads((tmp_path / "a" / RECORD_FILE).read_text())["settings"]["seed"] == 3
    other = sample_teacher_text(str(hf_dir), tmp_path / "c", SampleSettings(count=5, tokens=12, seed=4), False)
    assert samples(tmp_path / "c") != first and other["sequences"] == 5  # sampled, not greedy


def test_prefixes_come_from_the_documents_in_turn(tokenizer, tmp_path):
    docs = ["a", "one two three four five six seven eight nine", "alpha beta gamma delta epsilon zeta eta"]
    settings = SampleSettings(count=5, prefix_tokens=4, prefixes="docs.txt")
    starts = start_ids(tokenizer, docs, settings)
    long_docs = [tokenizer(d, add_special_tokens=False)["input_ids"][:4] for d in docs[1:]]
    assert [s[1:] for s in starts] == [long_docs[0], long_docs[1]] * 2 + [long_docs[0]]
    with pytest.raises(SaapError, match="no document of 40 tokens"):
        start_ids(tokenizer, docs, SampleSettings(prefix_tokens=40, prefixes="docs.txt"))


def test_token_id_data_is_read_whole_and_checked(tmp_path, tokenizer):
    path = tmp_path / "samples.jsonl"
    path.write_text('{"input_ids": [1, 5, 6, 7]}\n{"input_ids": [1, 8, 9]}\n')
    _, kind, records = read_data(str(path))
    assert kind == "tokens"
    examples, stats = tokenize_examples(kind, records, tokenizer, seq_len=3)
    assert examples == [{"input_ids": [1, 5, 6], "labels": [1, 5, 6]}, {"input_ids": [1, 8, 9], "labels": [1, 8, 9]}]
    assert stats["truncated"] == 1
    path.write_text('{"input_ids": [1, 5000]}\n')
    with pytest.raises(SaapError, match="not this model's"):
        tokenize_examples(*read_data(str(path))[1:], tokenizer, seq_len=8)
    path.write_text('{"input_ids": [1, "a"]}\n')
    with pytest.raises(SaapError, match="record 0's 'input_ids'"):
        read_data(str(path))


@pytest.mark.parametrize("family", list(FAMILY_EXTRAS))
def test_every_family_samples(family, tokenizer, tmp_path):
    model = make_model(family=family, heads=4, kv_heads=2, tied=family != "qwen2")
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    record = sample_teacher_text(str(tmp_path / "hf"), tmp_path / "out", SampleSettings(count=3, tokens=6), False)
    assert record["sequences"] == 3 and all(len(s) >= 2 for s in samples(tmp_path / "out"))


def test_the_student_distils_on_the_teachers_text(pruned, hf_dir, tmp_path):  # noqa: F811
    cache = tmp_path / "teacher-text"
    sample_teacher_text(str(hf_dir), cache, SampleSettings(count=40, tokens=24, batch_size=8), progress=False)
    settings = FinetuneSettings(
        teacher="parent", max_steps=6, batch_size=4, lr=1e-2, seq_len=32, val_size=4, eval_steps=3, logging_steps=1
    )
    record = finetune(str(pruned), str(cache / SAMPLES_FILE), str(tmp_path / "out"), settings, progress=False)
    assert record["data"]["format"] == "tokens" and record["data"]["train_examples"] == 36
    assert record["eval_loss"]["after"] < record["eval_loss"]["parent"]  # the KL to the teacher fell


def test_cli_bad_input_is_one_line(hf_dir, tmp_path, capsys):
    assert main(["sample", "--model", str(hf_dir), "--out", str(tmp_path / "o"), "--top-p", "0"]) == 2
    assert capsys.readouterr().err.strip().endswith("--top-p must be in (0, 1]")
    assert main(["sample", "--model", str(hf_dir), "--out", str(tmp_path / "o"), "--prefixes", "nope.txt"]) == 2
    assert "data file 'nope.txt' not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    args = ["sample", "--model", str(hf_dir), "--out", str(tmp_path / "o"), "--count", "2", "--tokens", "4"]
    assert main([*args, "--quiet"]) == 0
    assert "sampled 2 sequences" in capsys.readouterr().out
    assert main([*args, "--quiet"]) == 2  # exists: --overwrite replaces it
    assert "already exists" in capsys.readouterr().err
