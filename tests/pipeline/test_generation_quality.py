import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saap.pipeline.cli import main
from saap.pipeline.generation_quality import (
    LOOP_THRESHOLD,
    PACKAGED_PROMPTS,
    REPORT_PROMPTS,
    distinct_n,
    first_divergence,
    generation_quality,
    greedy_continuations,
    load_prompts,
    repeated_ngram_rate,
    summary,
)
from saap.runtime.checkpoint import save_checkpoint
from tests.conftest import make_model

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["The quick brown fox", "A pruned model keeps", "Edge devices such as laptops and Jetson boards read"]


def test_repeated_ngrams_distinct_n_and_divergence_on_known_sequences():
    assert repeated_ngram_rate([1, 2, 3, 4, 5, 6]) == 0.0
    assert repeated_ngram_rate([7] * 10) == 6 / 7  # 7 four-grams, all but the first repeat it
    assert repeated_ngram_rate([1, 2, 3, 4, 1, 2, 3, 4]) == 1 / 5  # 1234 comes back once among five
    assert repeated_ngram_rate([1, 2, 3]) == 0.0  # no 4-gram at all
    assert distinct_n([1, 2, 1, 2], 1) == 0.5 and distinct_n([1, 2, 1, 2], 2) == 2 / 3
    assert first_divergence([1, 2, 3, 9], [1, 2, 3, 4]) == 3
    assert first_divergence([1, 2], [1, 2, 3]) == 2 and first_divergence([5], [6]) == 0


def test_a_prompt_loops_above_the_threshold_and_means_count_each_prompt_once():
    rows = [{"prompt": "a", "ids": [7] * 20, "repeated_4gram": repeated_ngram_rate([7] * 20)},
            {"prompt": "b", "ids": list(range(40)), "repeated_4gram": 0.0}]  # fmt: skip
    result = summary(rows)
    assert result["looping"] == 1 and result["looping_prompts"] == ["a"]
    assert math.isclose(result["repeated_4gram"], (16 / 17) / 2)
    assert math.isclose(result["distinct_1"], (1 / 20 + 1) / 2)


def test_batched_greedy_continuations_equal_one_prompt_at_a_time(tokenizer):
    model = make_model(heads=4, kv_heads=2)
    batched = greedy_continuations(model, tokenizer, PROMPTS, new_tokens=12, batch_size=3, progress=False)
    for prompt, ids in zip(PROMPTS, batched, strict=True):
        prompt_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(input_ids=prompt_ids, max_new_tokens=12, do_sample=False, pad_token_id=2, eos_token_id=2)
        alone = out[0, prompt_ids.shape[1] :].tolist()
        assert ids == alone[: alone.index(2) + 1] if 2 in alone else ids == alone


def test_a_model_that_always_predicts_one_token_loops_and_agrees_with_itself_fully(tokenizer):
    model = make_model(heads=4, kv_heads=2, tied=False)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[5] = 0.0  # every logit equal: greedy takes token 0 every step
    quality = generation_quality(model, tokenizer, PROMPTS, new_tokens=16, progress=False)
    assert all(r["ids"] == [0] * 16 for r in quality["per_prompt"])
    assert quality["looping"] == 3 and math.isclose(quality["repeated_4gram"], 12 / 13)
    assert quality["repeated_4gram"] > LOOP_THRESHOLD
    again = generation_quality(model, tokenizer, PROMPTS, new_tokens=16, reference=quality, progress=False)
    assert again["first_divergence"] == 16
    assert math.isclose(again["reference_logprob"], -math.log(tokenizer.vocab_size), rel_tol=1e-4)  # uniform


def test_agreement_with_a_different_model_is_measured_against_its_continuations(tokenizer):
    dense, other = make_model(seed=0), make_model(seed=1)
    reference = generation_quality(dense, tokenizer, PROMPTS, new_tokens=10, progress=False)
    mine = generation_quality(dense, tokenizer, PROMPTS, new_tokens=10, reference=reference, progress=False)
    theirs = generation_quality(other, tokenizer, PROMPTS, new_tokens=10, reference=reference, progress=False)
    assert mine["first_divergence"] == sum(len(r["ids"]) for r in reference["per_prompt"]) / 3
    assert theirs["first_divergence"] < mine["first_divergence"]
    assert theirs["reference_logprob"] < mine["reference_logprob"]  # the dense tokens are its own argmax


def test_the_prompt_set_is_dev_text_and_is_what_its_script_writes(tmp_path):
    prompts = load_prompts()
    assert len(prompts) == 64 and tuple(prompts[:4]) == REPORT_PROMPTS and len(set(prompts)) == 64
    rows = [json.loads(line) for line in PACKAGED_PROMPTS.read_text().splitlines()]
    assert {r["source"] for r in rows} == {"report", "wikipedia_articles.txt"}  # dev text, no test split
    before = PACKAGED_PROMPTS.read_bytes()
    subprocess.run([sys.executable, str(ROOT / "scripts/make_generation_prompts.py")], check=True, capture_output=True)
    assert PACKAGED_PROMPTS.read_bytes() == before


def test_saap_eval_generate_measures_loops_and_agreement_with_a_reference(tokenizer, tmp_path, capsys):
    save_checkpoint(make_model(seed=0), tokenizer, tmp_path / "dense", {})
    save_checkpoint(make_model(seed=1), tokenizer, tmp_path / "other", {})
    argv = ["eval", "--generate", "--generate-tokens", "8", "--quiet"]
    assert main([*argv, "--model", str(tmp_path / "dense"), "--out", str(tmp_path / "dense.json")]) == 0
    reference = ["--generate-reference", str(tmp_path / "dense.json")]
    assert main([*argv, *reference, "--model", str(tmp_path / "other"), "--out", str(tmp_path / "o.json")]) == 0
    result = json.loads((tmp_path / "o.json").read_text())
    quality = result["generation_quality"]
    assert quality["prompts"] == 64 and quality["new_tokens"] == 8 and "first_divergence" in quality
    assert [g["prompt"] for g in result["generations"]] == list(REPORT_PROMPTS)
    assert "tokens before first divergence" in (tmp_path / "o.md").read_text()
    assert "repeated 4-grams" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--generate-reference", "missing.json"], "cannot read reference generations"),
        (["--generate-tokens", "0"], "--generate-tokens must be at least 1"),
        (["--engine", "gguf", "--generate-reference", "d.json"], "measured on the torch engine, not gguf"),
    ],
)
def test_bad_generation_flags_are_one_line_and_exit_2(tokenizer, tmp_path, capsys, extra, message):
    save_checkpoint(make_model(), tokenizer, tmp_path / "m", {})
    assert main(["eval", "--model", str(tmp_path / "m"), "--generate", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
