import math

import torch

from saap.pipeline.data import calibration_batches, perplexity_text, read_documents
from saap.pipeline.evaluate import perplexity
from tests.conftest import make_model


def test_perplexity_is_the_exponentiated_mean_token_loss(tokenizer, text_file):
    model = make_model()
    result = perplexity(model, tokenizer, str(text_file), seq_len=16, limit=5, batch_size=2, progress=False)
    ids = torch.tensor(tokenizer(text_file.read_text(), add_special_tokens=False)["input_ids"])[: 5 * 16].view(5, 16)
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss for w in ids]
    assert result["windows"] == 5 and result["tokens_scored"] == 5 * 15
    assert math.isclose(result["perplexity"], math.exp(torch.stack(losses).mean().item()), rel_tol=1e-4)


def test_wikitext_rows_are_joined_with_blank_lines(tmp_path):
    path = tmp_path / "wiki.test.raw"
    path.write_text(" = Title = \n\n Body text . \n")
    assert perplexity_text(path, "wikitext2") == " = Title = \n\n\n\n\n Body text . \n"
    assert perplexity_text(path, "ptb") == "= Title =\n\n\n\nBody text ."


def test_calibration_windows_are_seeded_and_sized(tokenizer, text_file):
    a = calibration_batches(tokenizer, text_file, num_samples=5, seq_len=16, batch_size=2, seed=1)
    b = calibration_batches(tokenizer, text_file, num_samples=5, seq_len=16, batch_size=2, seed=1)
    assert [t.shape for t in a] == [(2, 16), (2, 16), (1, 16)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_jsonl_documents_use_their_text_field(tmp_path):
    path = tmp_path / "c4.jsonl"
    path.write_text('{"text": "first doc", "url": "u"}\n\n{"text": "second doc"}\n')
    assert read_documents(path) == ["first doc", "second doc"]


def test_eval_on_the_gguf_engine_scores_the_exported_file_like_torch(tokenizer, text_file, tmp_path, capsys):
    import json

    from saap.export.gguf import export_gguf
    from saap.pipeline.cli import main
    from saap.runtime.checkpoint import save_checkpoint

    model = make_model(heads=6, kv_heads=2)
    save_checkpoint(model, tokenizer, tmp_path / "ckpt", {})
    gguf = export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", "f32", progress=False)["out"]
    reference = perplexity(model, tokenizer, str(text_file), seq_len=16, limit=3, progress=False)
    argv = ["eval", "--model", gguf, "--engine", "gguf", "--threads", "1", "--ppl", str(text_file)]
    argv += ["--seq-len", "16", "--ppl-windows", "3", "--generate", "--quiet", "--out", str(tmp_path / "e.json")]
    assert main(argv) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    scored = result["perplexity"][str(text_file)]
    assert scored["windows"] == 3 and scored["tokens_scored"] == 3 * 15
    assert math.isclose(scored["perplexity"], reference["perplexity"], rel_tol=1e-3)
    assert result["engine"] == "gguf" and len(result["generations"]) == 4
    assert "Evaluation of" in (tmp_path / "e.md").read_text()
    capsys.readouterr()
    assert main(["eval", "--model", gguf, "--engine", "gguf", "--tasks", "piqa"]) == 2
    assert "zero-shot tasks run on the torch engine" in capsys.readouterr().err
