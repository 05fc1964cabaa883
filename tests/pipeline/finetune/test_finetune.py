import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from saap.pipeline.cli import main
from saap.pipeline.finetune import FinetuneSettings, finetune, read_records, tokenize_examples
from saap.pipeline.finetune.group_lora import (
    GroupLoraLinear,
    apply_group_lora,
    dequantize_groups,
    load_quantized_weights,
    merge_group_lora,
    quantize_groups,
)
from saap.runtime.checkpoint import load_checkpoint, save_checkpoint
from saap.runtime.errors import SaapError
from saap.runtime.surgery import LayerShape, head_dim, layer_shapes, set_layer_shapes, shrink_layer
from tests.conftest import SAMPLE_TEXT, make_model, make_tokenizer

SENTENCES = [s.strip() + "." for s in SAMPLE_TEXT.split(".") if s.strip()][:4]


def pruned_tiny_model():
    """A tiny GQA model with per-layer widths: layer 1 without attention, layer 2 with a 96-wide MLP."""
    model = make_model(heads=4, kv_heads=2, layers=3, intermediate=128)
    hd, shapes = head_dim(model.config), layer_shapes(model.config)
    new = list(shapes)
    new[1] = shrink_layer(model.model.layers[1], shapes[1], hd, torch.arange(0), torch.arange(128))
    new[2] = shrink_layer(model.model.layers[2], shapes[2], hd, torch.arange(2), torch.arange(96))
    set_layer_shapes(model.config, new)
    assert new[1] == LayerShape(0, 0, 128) and new[2].intermediate_size == 96
    return model


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "tiny-pruned"
    save_checkpoint(pruned_tiny_model(), make_tokenizer(), path, {"kind": "pruned"})
    return path


@pytest.fixture
def alpaca(tmp_path):
    records = [
        {"instruction": f"Repeat sentence {i % 4}.", "input": "" if i % 2 else "fox", "output": SENTENCES[i % 4]}
        for i in range(40)
    ]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(records))
    return path


def tiny_settings(**overrides) -> FinetuneSettings:
    values = dict(max_steps=6, batch_size=4, lr=1e-2, seq_len=256, val_size=4, save_steps=2, logging_steps=1)
    return FinetuneSettings(**(values | overrides))


@pytest.mark.parametrize("bits,group_size", [(4, 32), (8, 32), (4, 64), (8, 128)])
def test_group_quantizer_round_trips_within_half_a_step(bits, group_size):
    torch.manual_seed(0)
    weight = torch.randn(24, 256) * 0.1
    weight[3, :group_size] = 0.5  # a constant group must come back exactly
    q, scales, zeros = quantize_groups(weight, bits, group_size)
    assert q.dtype == torch.uint8 and int(q.max()) <= 2**bits - 1
    assert scales.shape == zeros.shape == (24, 256 // group_size)
    error = (dequantize_groups(q, scales, zeros) - weight).abs().reshape(24, -1, group_size)
    assert (error <= scales[..., None] / 2 + 1e-6).all()
    assert error[3, 0].max() <= 1e-6


def test_group_lora_merges_exactly_into_the_zero_points(tmp_path):
    model = pruned_tiny_model()
    paths = apply_group_lora(model, bits=4, group_size=32, rank=4, alpha=8)
    assert not any(".1.self_attn" in p for p in paths) and len(paths) == 3 * 7 - 4  # removed attention skipped
    torch.manual_seed(1)
    for module in model.modules():
        if isinstance(module, GroupLoraLinear):
            module.lora_B.data.normal_(0, 0.5)  # a trained-looking adapter, not the zero init
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        adapted = model(ids).logits
    quantized = merge_group_lora(model)
    assert not any(isinstance(m, GroupLoraLinear) for m in model.modules())
    with torch.no_grad():
        merged = model(ids).logits
    assert (adapted - merged).abs().max() <= 1e-4
    # The merged weights are exactly the codes and scales with new offsets: still a 4-bit model.
    for path, entry in quantized.items():
        weight = model.get_submodule(path).weight
        assert torch.equal(dequantize_groups(entry["qweight"], entry["scales"], entry["zeros"]), weight)


def test_group_size_that_does_not_divide_a_width_is_refused():
    model = pruned_tiny_model()
    with pytest.raises(SaapError, match="does not divide the input width 96"):
        apply_group_lora(model, bits=4, group_size=64, rank=4, alpha=8)


def test_alpaca_prompt_is_masked_and_long_examples_are_truncated(alpaca):
    tokenizer = make_tokenizer()
    kind, records = read_records(alpaca)
    examples, stats = tokenize_examples(kind, records, tokenizer, 256)
    assert kind == "alpaca" and stats == {"truncated": 0, "dropped": 0}
    e = examples[0]
    answer = tokenizer(records[0]["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert e["labels"][-len(answer) :] == answer and set(e["labels"][: -len(answer)]) == {-100}
    # Prompts are 127 (no input) and 182 (with input) tokens here: the latter keep no response token.
    examples, stats = tokenize_examples(kind, records, tokenizer, 150)
    assert stats == {"truncated": 40, "dropped": 20} and all(len(x["input_ids"]) == 150 for x in examples)


def test_group_lora_finetune_lowers_loss_and_writes_both_forms(checkpoint, alpaca, tmp_path):
    out = tmp_path / "ft"
    record = finetune(str(checkpoint), str(alpaca), str(out), tiny_settings(max_steps=8), progress=False)
    losses = record["train_loss_log"]
    assert record["steps"] == 8 and losses[-1][1] < losses[0][1]
    assert record["eval_loss"]["after"] < record["eval_loss"]["start"]
    meta = json.loads((out / "saap.json").read_text())
    assert meta["kind"] == "finetuned" and meta["method"] == "group-lora"
    assert meta["data"]["files"][0]["sha256"] and meta["settings"]["bits"] == 4 and meta["parent"]["saap_json_sha256"]
    assert meta["quantized"]["merge_max_abs_error"] <= 1e-6
    # The training loop's own peak is sampled (statm), the others cumulative (VmHWM, which the kernel
    # updates lazily: the two can differ by a few pages).
    peaks = meta["peak_rss_mb"]
    assert 0 < peaks["before_training"] <= peaks["through_merge"]
    assert 0 < peaks["training"] <= peaks["through_merge"] + 4
    assert not (tmp_path / "ft.partial").exists()
    model, _, _ = load_checkpoint(out)
    quantized = load_quantized_weights(out / "quantized")
    for name, tensor in model.state_dict().items():
        if name in quantized:
            assert (quantized[name] - tensor).abs().max() <= 1e-6, name
    assert model.config.num_key_value_heads_per_layer[1] == 0  # the pruned shapes survive


def test_lora_finetune_merges_through_peft(checkpoint, alpaca, tmp_path):
    record = finetune(str(checkpoint), str(alpaca), str(tmp_path / "ft"), tiny_settings(method="lora"), progress=False)
    assert record["eval_loss"]["after"] < record["eval_loss"]["parent"] and record["quantized"] is None
    model, _, _ = load_checkpoint(tmp_path / "ft")
    assert not any("lora" in name for name in model.state_dict())


def test_same_seed_gives_identical_weights(checkpoint, alpaca, tmp_path):
    a = finetune(str(checkpoint), str(alpaca), str(tmp_path / "a"), tiny_settings(max_steps=3), progress=False)
    b = finetune(str(checkpoint), str(alpaca), str(tmp_path / "b"), tiny_settings(max_steps=3), progress=False)
    assert a["files"]["model.safetensors"] == b["files"]["model.safetensors"]


class Interrupt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise KeyboardInterrupt


def test_resume_continues_from_the_saved_step(checkpoint, alpaca, tmp_path):
    settings = tiny_settings()
    out = tmp_path / "ft"
    with pytest.raises(KeyboardInterrupt):
        finetune(str(checkpoint), str(alpaca), str(out), settings, progress=False, callbacks=[Interrupt()])
    partial = tmp_path / "ft.partial"
    assert not out.exists() and (partial / "checkpoint-2").is_dir()
    saved = {p.name for p in (partial / "checkpoint-2").iterdir()}
    assert not [n for n in saved if n.endswith((".pt", ".pth", ".bin", ".pkl"))], saved
    assert {"adapter.safetensors", "optimizer.safetensors", "trainer_state.json"} <= saved

    resumed = finetune(str(checkpoint), str(alpaca), str(out), settings, progress=False)
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == 6
    assert resumed["train_seconds"] > resumed["train_seconds_this_run"]  # the interrupted segment counts too
    assert [s for s, _ in resumed["train_loss_log"]] == [1, 2, 3, 4, 5, 6]  # steps 1-2 logged once, not redone
    finetune(str(checkpoint), str(alpaca), str(tmp_path / "straight"), settings, progress=False)
    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "straight" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


OVERSHOOT = dict(lr=0.1, max_steps=12, eval_steps=2)


class Overshoot(TrainerCallback):
    """Spoils the adapter after step 11, so the held-out loss at step 12 is the worst of the run: the case
    where keeping the best adapter matters. (Left to the optimizer, whether the tiny model's loss rises
    again before step 12 depends on the CPU's floating-point kernels: it did on AMD, not on Intel.)"""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 11:
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.add_(0.5)


def overshooting(checkpoint, alpaca, out, settings, *callbacks) -> dict:
    callbacks = [Overshoot(), *callbacks]
    return finetune(str(checkpoint), str(alpaca), str(out), settings, progress=False, callbacks=callbacks)


def test_the_adapter_of_the_lowest_held_out_loss_is_merged(checkpoint, alpaca, tmp_path):
    settings = tiny_settings(**OVERSHOOT)
    best = overshooting(checkpoint, alpaca, tmp_path / "best", settings)
    log = best["eval_loss_log"]
    assert [step for step, _ in log] == [2, 4, 6, 8, 10, 12]
    step, loss = min(log, key=lambda entry: entry[1])
    assert step < 12 and loss < log[-1][1]  # the case where keeping the best matters
    assert best["kept"] == {"policy": "best", "step": step}
    assert best["eval_loss"]["after"] == pytest.approx(loss, abs=1e-4)  # the merged model is that step's

    settings = tiny_settings(**OVERSHOOT, keep="last")
    last = overshooting(checkpoint, alpaca, tmp_path / "last", settings)
    assert last["eval_loss_log"] == log and last["kept"] == {"policy": "last", "step": 12}
    assert last["eval_loss"]["after"] == pytest.approx(log[-1][1], abs=1e-4)


class InterruptAfterBest(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 11:  # checkpoint-10 is saved; the rest of the run is worse than step 10
            raise KeyboardInterrupt


def test_resume_keeps_the_best_adapter_seen_before_the_interruption(checkpoint, alpaca, tmp_path):
    settings = tiny_settings(**OVERSHOOT)
    straight = overshooting(checkpoint, alpaca, tmp_path / "straight", settings)
    out = tmp_path / "ft"
    with pytest.raises(KeyboardInterrupt):
        overshooting(checkpoint, alpaca, out, settings, InterruptAfterBest())
    assert {"best.json", "best_adapter.safetensors"} <= {
        p.name for p in (tmp_path / "ft.partial/checkpoint-10").iterdir()
    }
    resumed = overshooting(checkpoint, alpaca, out, settings)
    assert resumed["resumed_from_step"] == 10
    assert resumed["kept"] == straight["kept"] and resumed["kept"]["step"] < 12
    assert resumed["eval_loss"]["after"] == pytest.approx(straight["eval_loss"]["after"], abs=1e-5)


def test_two_processes_train_data_parallel_without_code_changes(checkpoint, alpaca, tmp_path):
    """torchrun with two CPU processes (gloo): what `accelerate launch --multi_gpu` starts, one per GPU
    (accelerate itself needs mpirun for several CPU processes)."""
    out = tmp_path / "ft"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = ["--model", str(checkpoint), "--data", str(alpaca), "--out", str(out), "--max-steps", "4"]
    args += ["--val-size", "4", "--save-steps", "2", "--eval-steps", "2", "--quiet"]
    done = subprocess.run([*launch, "-m", "saap.pipeline.cli", "finetune", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("fine-tuned") == 1  # only the main process writes and reports
    meta = json.loads((out / "saap.json").read_text())
    assert meta["processes"] == 2 and meta["steps"] == 4 and meta["eval_loss"]["after"] < meta["eval_loss"]["start"]
    assert not (tmp_path / "ft.partial").exists()


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_finetune_says_once_that_it_truncated(capsys, checkpoint, alpaca, tmp_path):
    out = tmp_path / "ft"
    args = ["--model", str(checkpoint), "--data", str(alpaca), "--out", str(out), "--quiet"]
    code, stdout, err = run(capsys, "finetune", *args, "--max-steps", "2", "--seq-len", "200", "--method", "lora")
    assert code == 0, err
    assert err.count("truncated") == 1 and "20 of 40 examples" in err
    assert "fine-tuned" in stdout and (out / "saap.json").is_file()


@pytest.mark.parametrize(
    "content,extra,fragment",
    [
        ("", [], "is empty"),
        ("[{]", [], "not valid JSON"),
        ('[{"instruction": "say hi", "input": ""}]', [], "record 0 has no 'output'"),
        (None, ["--model", "{tmp}"], "not a checkpoint"),
        (None, ["--group-size", "128"], "does not divide the input width 64"),
        (None, ["--group-size", "48"], "--group-size must be one of"),
        (None, ["--bits", "3"], "--bits must be one of"),
        (None, ["--method", "qlora"], "unknown fine-tuning method"),
        (None, ["--temperature", "0"], "--temperature must be positive"),
        (None, ["--kl-weight", "1.5"], "--kl-weight must be in [0, 1]"),
        (None, ["--teacher", "parent"], "records no source model"),
        (None, ["--keep", "first"], "--keep must be one of"),
        (None, ["--eval-steps", "-1"], "--eval-steps must be >= 0"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_output(capsys, checkpoint, alpaca, tmp_path, content, extra, fragment):
    data = alpaca
    if content is not None:
        data = tmp_path / "bad.json"
        data.write_text(content)
    bare = tmp_path / "not-a-model"
    bare.mkdir()
    extra = [a.format(tmp=bare) for a in extra]
    model = extra[1] if extra[:1] == ["--model"] else str(checkpoint)
    extra = extra[2:] if extra[:1] == ["--model"] else extra
    out = tmp_path / "o"
    code, _, err = run(capsys, "finetune", "--model", model, "--data", str(data), "--out", str(out), *extra)
    assert code == 2 and err.count("\n") == 1 and err.startswith("saap: error:") and fragment in err, err
    assert not out.exists() and not Path(f"{out}.partial").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o")]


def test_plain_text_is_cut_into_windows_with_every_token_in_the_loss(text_file):
    kind, documents = read_records(text_file)
    examples, stats = tokenize_examples(kind, documents, make_tokenizer(), 32)
    assert kind == "text" and len(examples) > 10 and stats["truncated"] == 0
    assert all(e["labels"] == e["input_ids"] and len(e["input_ids"]) <= 32 for e in examples)


def test_group_lora_frees_the_checkpoints_float_linears_and_keeps_ties(checkpoint):
    """The loaded weights are views of one memory-mapped file; after quantization no kept tensor may
    still hold it (else every dropped float linear stays resident), and tied embeddings stay tied."""
    from saap.pipeline.finetune import _attach_adapters

    model = load_checkpoint(checkpoint)[0]
    loaded = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    model, _ = _attach_adapters(model, tiny_settings())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    kept = [*model.parameters(), *model.buffers()]
    assert not loaded & {t.untyped_storage().data_ptr() for t in kept}
    assert torch.isfinite(model(input_ids=torch.tensor([[5, 9, 17, 3, 44]])).logits).all()
