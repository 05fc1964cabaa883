import json

import pytest
import torch
import torch.nn.functional as F

from saap.pipeline.cli import main
from saap.pipeline.finetune import IGNORE, FinetuneSettings, finetune
from saap.pipeline.finetune.distill import Distiller, parent_source
from saap.runtime.checkpoint import load_checkpoint
from saap.runtime.errors import SaapError
from saap.runtime.models import load_model
from tests.conftest import make_model, make_tokenizer


@pytest.fixture
def pruned(hf_dir, text_file, tmp_path, capsys):
    """A tiny GQA model pruned by `saap prune`, so its saap.json records the dense source."""
    out = tmp_path / "pruned"
    args = ["--model", str(hf_dir), "--ratio", "0.278", "--align", "32", "--calibration", str(text_file)]
    assert (
        main(
            [
                "prune",
                *args,
                "--num-samples",
                "4",
                "--seq-len",
                "16",
                "--allocation",
                "uniform-range",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    capsys.readouterr()
    return out


def settings(**overrides) -> FinetuneSettings:
    values = dict(max_steps=8, batch_size=4, lr=1e-2, seq_len=32, val_size=4, save_steps=4, logging_steps=1)
    return FinetuneSettings(**(values | {"teacher": "parent"} | overrides))


@torch.no_grad()
def kl_to(teacher, student, ids) -> float:
    t, s = teacher(input_ids=ids).logits, student(input_ids=ids).logits
    return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean").item()


def test_distiller_is_the_kl_and_mixes_in_the_lm_loss():
    torch.manual_seed(0)
    teacher, student = make_model(seed=0), make_model(seed=1)
    ids = torch.randint(0, 300, (2, 12))
    labels = ids.clone()
    labels[0, :5] = IGNORE  # masked positions are left out of both terms
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    assert Distiller(teacher, 1.0, 1.0, IGNORE)(teacher, batch).item() == pytest.approx(0.0, abs=1e-6)
    lm = student(**batch).loss.item()
    assert Distiller(teacher, 2.0, 0.0, IGNORE)(student, batch).item() == pytest.approx(lm, rel=1e-5)
    keep = labels[:, 1:] != IGNORE
    s, t = student(input_ids=ids).logits[:, :-1][keep], teacher(input_ids=ids).logits[:, :-1][keep]
    kl = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="batchmean")
    mixed = Distiller(teacher, 2.0, 0.5, IGNORE)(student, batch).item()
    assert mixed == pytest.approx(0.5 * 4 * kl.item() + 0.5 * lm, rel=1e-5)


def test_parent_is_found_through_the_recorded_source(pruned, hf_dir, tmp_path):
    meta = json.loads((pruned / "saap.json").read_text())
    assert parent_source(meta, str(pruned))["spec"] == str(hf_dir)
    moved = tmp_path / "elsewhere"
    hf_dir.rename(moved)
    with pytest.raises(SaapError, match="is not here any more"):
        parent_source(meta, str(pruned))


@pytest.mark.parametrize("method", ["full", "group-lora", "lora"])
def test_distillation_from_the_parent_moves_the_student_towards_it(method, pruned, hf_dir, text_file, tmp_path):
    out = tmp_path / "distilled"
    record = finetune(str(pruned), str(text_file), str(out), settings(method=method), progress=False)
    assert record["teacher"]["source"]["path"] == str(hf_dir) and record["method"] == method
    loaded = load_model(str(hf_dir))
    dense = loaded.model
    ids = loaded.tokenizer(text_file.read_text(), return_tensors="pt")["input_ids"][:, :96]  # the text it trained on
    before, after = load_checkpoint(pruned)[0], load_checkpoint(out)[0]
    assert kl_to(dense, after, ids) < kl_to(dense, before, ids)
    assert record["trainable_params"] > 0 and not (tmp_path / "distilled.partial").exists()


def test_finetuned_checkpoint_still_finds_the_dense_parent(pruned, hf_dir, text_file, tmp_path):
    first = tmp_path / "lm"
    finetune(str(pruned), str(text_file), str(first), settings(teacher=None, max_steps=2), progress=False)
    meta = json.loads((first / "saap.json").read_text())
    assert parent_source(meta, str(first))["spec"] == str(hf_dir)


def test_a_teacher_with_another_vocabulary_is_one_line_exit_2(capsys, pruned, text_file, tmp_path):
    other = tmp_path / "other-vocab"
    make_model(vocab_size=320).save_pretrained(other)
    make_tokenizer(320).save_pretrained(other)
    out = tmp_path / "o"
    argv = ["finetune", "--model", str(pruned), "--data", str(text_file), "--out", str(out), "--teacher", str(other)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "same tokenizer" in err and not out.exists()


def test_several_text_files_are_joined_and_recorded(pruned, text_file, tmp_path):
    second = tmp_path / "more.jsonl"
    second.write_text("\n".join(json.dumps({"text": f"Line {i} of the second file."}) for i in range(40)))
    out = tmp_path / "two"
    record = finetune(str(pruned), [str(text_file), str(second)], str(out), settings(max_steps=2), progress=False)
    assert [f["path"] for f in record["data"]["files"]] == [str(text_file), str(second)]
    with pytest.raises(SaapError, match="mix Alpaca records and plain text"):
        alpaca = tmp_path / "a.json"
        alpaca.write_text(json.dumps([{"instruction": "x", "output": "y"}]))
        finetune(str(pruned), [str(text_file), str(alpaca)], str(tmp_path / "x"), settings(), progress=False)


def test_distillation_trains_all_kept_weights_unless_told_otherwise():
    assert FinetuneSettings(teacher="parent").method == "full" and FinetuneSettings().method == "group-lora"
    assert FinetuneSettings(teacher="parent", method="lora").rank == 8


def test_the_parent_shares_the_students_embedding_instead_of_holding_a_copy(pruned, hf_dir):
    from saap.pipeline.finetune.distill import load_teacher

    loaded = load_model(str(pruned))
    teacher, record = load_teacher("parent", loaded.metadata, str(pruned), loaded.model)
    shared = loaded.model.get_input_embeddings().weight
    assert teacher.get_input_embeddings().weight is shared and teacher.get_output_embeddings().weight is shared
    assert record["params"] == sum(p.numel() for p in load_model(str(hf_dir)).model.parameters())
