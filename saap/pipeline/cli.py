"""The ``saap`` command: one verb per pipeline stage; stages talk only through artifact directories."""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

from saap.export.formats import (
    ACCURACY_LEVELS,
    DEFAULT_ACCURACY_LEVEL,
    DEFAULT_GRAPH,
    DEFAULT_PRECISION,
    DEFAULT_QUANT,
    GGUF_QUANTS,
    ONNX_GRAPHS,
    ONNX_PRECISIONS,
)
from saap.pipeline.options import add_options, from_args
from saap.runtime.errors import SaapError
from saap.runtime.native import VERBOSE_ENV, verbose


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit 2 (argparse would also print the usage)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="smollm2-135m (embedded default), a .gguf file, a saap/Hugging Face checkpoint dir, or a Hub id",
    )


def _add_engine(parser: argparse.ArgumentParser) -> None:
    from saap.runtime.engine import ENGINES

    parser.add_argument("--engine", default="torch", choices=ENGINES, help="runtime that executes the model")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps (torch) or tensorrt (onnx)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: the runtime's own choice)")
    parser.add_argument("--n-gpu-layers", type=int, default=0, help="llama.cpp layers offloaded to the GPU (-1: all)")


def cmd_prune(args: argparse.Namespace) -> None:
    from saap.pipeline.data import resolve_data_file
    from saap.pipeline.prune import PruneSettings, prune
    from saap.runtime.checkpoint import save_checkpoint
    from saap.runtime.models import load_model

    settings = from_args(PruneSettings, args)
    # Fail on bad input before the (slow) model load.
    if Path(args.out).exists() and not args.overwrite:
        raise SaapError(f"output '{args.out}' already exists (pass --overwrite to replace it)")
    if settings.needs_calibration:
        resolve_data_file(settings.calibration)
    loaded = load_model(args.model)
    record = prune(loaded, settings, progress=not args.quiet)
    save_checkpoint(loaded.model, loaded.tokenizer, args.out, record, overwrite=args.overwrite)
    first, last = record["pruned_layers"][0], record["pruned_layers"][1] - 1
    budget = record["budget"]
    speed = f", predicted {budget['speedup_predicted']:.2f}x on {budget['engine']}" if "engine" in budget else ""
    print(
        f"pruned {args.model}: {record['params_before']:,} -> {record['params_after']:,} parameters "
        f"({record['ratio_achieved']:.1%} removed, {record['decoder_ratio_achieved']:.1%} of the decoder, "
        f"layers {first}-{last}{speed}) "
        f"in {record['prune_seconds']:.0f}s -> {args.out}"
    )


def cmd_profile(args: argparse.Namespace) -> None:
    from saap.pipeline.profile import fit_profile
    from saap.pipeline.prune.speed_model import EngineSpec, default_path
    from saap.runtime.models import load_model_config

    spec = EngineSpec.parse(args.engine)
    if args.repeats < 1:
        raise SaapError("--repeats must be at least 1")
    out = Path(args.out) if args.out else default_path(load_model_config(args.model), spec)
    profile = fit_profile(args.model, spec, args.threads, args.repeats, progress=not args.quiet)
    profile.save(out)
    c = profile.cost
    print(f"{'probe':>17}  measured ms  fitted ms")
    for p in profile.points:
        print(f"{p['probe']:>17}  {p['ms']:11.3f}  {p['fitted_ms']:9.3f}")
    print(
        f"{spec}: {c.fixed_ms:.3f} ms fixed + {c.attention_ms:.3f} per attention block + {c.mlp_ms:.3f} per MLP "
        f"block + {c.kv_group_ms:.4f} per KV group + {c.ms_per_mparam:.4f} per million layer parameters -> {out}"
    )


def cmd_generate(args: argparse.Namespace) -> None:
    from saap.runtime.engine import EngineSettings, load_engine

    if args.max_new_tokens < 1:
        raise SaapError("--max-new-tokens must be at least 1")
    settings = EngineSettings(device=args.device, threads=args.threads, n_gpu_layers=args.n_gpu_layers)
    engine = load_engine(args.engine, args.model, settings)
    prompt = args.prompt
    if args.chat:
        tokenizer = getattr(engine, "tokenizer", None)
        if tokenizer is None or not tokenizer.chat_template:
            raise SaapError(f"no chat template available for '{args.model}' on engine {args.engine}; drop --chat")
        messages = [{"role": "user", "content": prompt}]
        prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    else:
        prompt_ids = engine.tokenize(prompt)
    new_ids = engine.generate(prompt_ids, args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    completion = engine.detokenize(new_ids)
    print(completion if args.chat else args.prompt + completion)


def cmd_eval(args: argparse.Namespace) -> None:
    from saap.pipeline.data import PERPLEXITY_SETS, missing_unshipped, resolve_data_file
    from saap.pipeline.evaluate import perplexity, results_markdown
    from saap.pipeline.zeroshot import TASKS, evaluate_zeroshot, prepare_tasks
    from saap.runtime.engine import torch_device
    from saap.runtime.io import write_json_atomic, write_text_atomic
    from saap.runtime.models import load_model
    from saap.runtime.surgery import model_parameter_count

    tasks = list(TASKS) if args.tasks == ["all"] else args.tasks
    if not (args.ppl or tasks or args.generate):
        raise SaapError("nothing to evaluate: pass --ppl wikitext2 ptb, --tasks all, and/or --generate")
    if args.ppl_windows is not None and args.ppl_windows < 1 or args.limit is not None and args.limit < 1:
        raise SaapError("--ppl-windows and --limit must be at least 1")
    if args.generate_tokens < 1:
        raise SaapError(f"--generate-tokens must be at least 1, got {args.generate_tokens}")
    reference = _generation_reference(args)
    skipped = missing_unshipped(args.ppl)
    for name, why in skipped.items():
        print(f"saap: skipping {name} perplexity: {why}", file=sys.stderr)
    args.ppl = [dataset for dataset in args.ppl if dataset not in skipped]
    for dataset in args.ppl:
        resolve_data_file(dataset, PERPLEXITY_SETS)
    if tasks:  # validates task names and data files before the model load
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            prepare_tasks(tasks, args.data_dir, Path(tmp))
    if args.engine != "torch":
        return _eval_on_engine(args, tasks, skipped)
    device = torch_device(args.device)  # before the model load: a missing GPU fails at once
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    loaded.model.to(device)
    seq_len = loaded.model.config.max_position_embeddings if args.seq_len == "max" else int(args.seq_len)
    if seq_len < 2:
        raise SaapError("--seq-len must be at least 2 (or 'max')")
    results = {
        "model": args.model,
        "source": loaded.source,
        "params": model_parameter_count(loaded.model),
        "settings": _settings_record(args),
        "perplexity": {},
        "skipped": skipped,
    }
    for dataset in args.ppl:
        result = perplexity(
            loaded.model, loaded.tokenizer, dataset, seq_len, args.ppl_windows, args.batch_size, not args.quiet
        )
        results["perplexity"][dataset] = result
        _print_perplexity(result)
    if tasks:
        results["zeroshot"] = evaluate_zeroshot(
            loaded.model,
            loaded.tokenizer,
            tasks,
            args.limit,
            args.batch_size,
            args.data_dir,
            progress=not args.quiet,
            per_document=args.per_document,
        )
        for task, r in results["zeroshot"]["tasks"].items():
            print(f"{task:>13}  {r['metric']} {r['value']:.4f} ± {r['stderr'] or 0:.4f}  ({r['documents']} docs)")
        print(f"{'average':>13}  {results['zeroshot']['average']:.4f}")
    if args.generate:
        _generate(args, loaded, reference, results)
    if args.out:
        write_json_atomic(args.out, results)
        write_text_atomic(Path(args.out).with_suffix(".md"), results_markdown(results))


def _settings_record(args: argparse.Namespace) -> dict:
    """The flags as the eval JSON records them (paths as strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("func", "model")}


def _generation_reference(args: argparse.Namespace) -> dict | None:
    """The reference continuations, read before the model loads (a wrong path fails at once)."""
    if args.generate_reference is None:
        return None
    if not args.generate:
        raise SaapError("--generate-reference needs --generate")
    if args.engine != "torch":
        raise SaapError(f"--generate-reference is measured on the torch engine, not {args.engine}")
    from saap.pipeline.generation_quality import load_reference

    return load_reference(args.generate_reference)


def _generate(args: argparse.Namespace, loaded, reference: dict | None, results: dict) -> None:
    """The generation measure into ``results``, and the report's prompts as its samples."""
    from saap.pipeline.generation_quality import REPORT_PROMPTS, generation_quality

    quality = generation_quality(
        loaded.model, loaded.tokenizer, None, args.generate_tokens, reference, args.batch_size, not args.quiet
    )
    results["generation_quality"] = quality
    results["generations"] = [
        {"prompt": r["prompt"], "completion": r["text"]} for r in quality["per_prompt"] if r["prompt"] in REPORT_PROMPTS
    ]
    agreement = f", first divergence at {quality['first_divergence']:.1f}" if "first_divergence" in quality else ""
    print(
        f"{'generation':>13}  repeated 4-grams {quality['repeated_4gram']:.3f}, looping {quality['looping']} of "
        f"{quality['prompts']}, distinct-2 {quality['distinct_2']:.3f}{agreement}"
    )


def _print_perplexity(result: dict) -> None:
    windows = f"{result['windows']} windows of {result['seq_len']} tokens"
    print(f"{result['dataset']:>13}  perplexity {result['perplexity']:.2f}  ({windows})")


def _eval_on_engine(args: argparse.Namespace, tasks: list[str], skipped: dict[str, str]) -> None:
    """``saap eval --engine gguf|onnx``: the deployed file's perplexity and generations, through its runtime."""
    from saap.pipeline.evaluate import engine_generations, engine_perplexity, results_markdown
    from saap.runtime.engine import EngineSettings, load_engine
    from saap.runtime.io import write_json_atomic, write_text_atomic

    if tasks:
        raise SaapError(f"zero-shot tasks run on the torch engine (lm-eval's HF model), not {args.engine}")
    if not args.seq_len.isdigit() or int(args.seq_len) < 2:
        raise SaapError(f"--engine {args.engine} needs a --seq-len of at least 2 tokens, not '{args.seq_len}'")
    seq_len = int(args.seq_len)
    settings = EngineSettings(args.device, args.threads, n_ctx=max(seq_len, 128) + 64, n_gpu_layers=args.n_gpu_layers)
    engine = load_engine(args.engine, args.model, settings)
    results = {"model": args.model, "engine": args.engine, "settings": _settings_record(args), "perplexity": {}}
    results |= {"skipped": skipped}
    for dataset in args.ppl:
        result = engine_perplexity(engine, dataset, seq_len, args.ppl_windows, not args.quiet)
        results["perplexity"][dataset] = result
        _print_perplexity(result)
    if args.generate:
        results["generations"] = engine_generations(engine)
        for g in results["generations"]:
            print(f"{g['prompt']!r} -> {g['completion']!r}")
    if args.out:
        write_json_atomic(args.out, results)
        write_text_atomic(Path(args.out).with_suffix(".md"), results_markdown(results))


def cmd_finetune(args: argparse.Namespace) -> None:
    from saap.pipeline.finetune import FinetuneSettings, finetune

    settings = from_args(FinetuneSettings, args)
    record = finetune(args.model, args.data, args.out, settings, progress=not args.quiet, overwrite=args.overwrite)
    if not record:
        return  # a non-main process of a data-parallel run
    losses = record["eval_loss"]
    fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
    quantized = f", quantized form in {args.out}/{record['quantized']['dir']}" if record["quantized"] else ""
    print(
        f"fine-tuned {args.model} ({record['method']}, {record['steps']} steps, {record['train_seconds']:.0f}s): "
        f"validation loss {fmt(losses['parent'])} -> {fmt(losses['after'])} "
        f"(kept step {record['kept']['step']}, {record['kept']['policy']}) -> {args.out}{quantized}"
    )


def cmd_sample(args: argparse.Namespace) -> None:
    from saap.pipeline.finetune.teacher_text import SAMPLES_FILE, SampleSettings, sample_teacher_text

    settings = from_args(SampleSettings, args)
    record = sample_teacher_text(args.model, args.out, settings, progress=not args.quiet, overwrite=args.overwrite)
    print(
        f"sampled {record['sequences']} sequences ({record['new_tokens']} new tokens, {record['seconds']:.0f}s) "
        f"from {args.model} -> {Path(args.out) / SAMPLES_FILE}"
    )


def cmd_export(args: argparse.Namespace) -> None:
    if args.format == "onnx":
        from saap.export.onnx import export_onnx

        precision = args.precision or DEFAULT_PRECISION
        if precision not in ONNX_PRECISIONS:
            raise SaapError(f"unknown ONNX precision '{precision}' (choose from {', '.join(ONNX_PRECISIONS)})")
        report = export_onnx(
            args.model, args.out, precision, args.graph, overwrite=args.overwrite, progress=not args.quiet,
            accuracy_level=args.accuracy_level,
        )  # fmt: skip
        size = report["model_bytes"] / 2**20
    else:
        from saap.export.gguf import export_gguf

        quant = args.quant or DEFAULT_QUANT
        if quant not in GGUF_QUANTS:
            raise SaapError(f"unknown GGUF quantization '{quant}' (choose from {', '.join(GGUF_QUANTS)})")
        report = export_gguf(args.model, args.out, quant, overwrite=args.overwrite, progress=not args.quiet)
        size = report["size_bytes"] / 2**20
    print(f"exported {args.model} -> {args.out} ({args.format}, {size:.1f} MiB, {report['seconds']:.0f}s)")


def cmd_run(args: argparse.Namespace) -> None:
    from saap.pipeline.config import check_semantics, find_config, load_config
    from saap.pipeline.run import run_pipeline, summary_table

    args.config = str(find_config(args.config))
    config = load_config(args.config)
    check_semantics(config, args.config)  # every config error before any work starts
    if args.check:
        print(f"{args.config}: valid; run directory {config.run_dir}")
        return
    started = time.perf_counter()
    rows = run_pipeline(config, Path(args.config), args.from_stage, args.until_stage, args.force, verbose=args.verbose)
    print(summary_table(rows))
    report = config.run_dir / "report.html"
    where = f"; report: {report}" if report.is_file() and rows[-1]["stage"] == "report" else ""
    print(f"run '{config.name}' finished in {time.perf_counter() - started:.0f}s -> {config.run_dir}{where}")


def cmd_bench(args: argparse.Namespace) -> int:
    from saap.pipeline.bench import (
        BenchSettings,
        compare,
        failures,
        format_references,
        format_regressions,
        format_table,
        load_document,
        run_bench,
        slowdown_from_env,
        write_outputs,
    )

    if args.compare and args.tolerance is None:
        args.tolerance = 0.10
    baseline = load_document(args.compare) if args.compare else None  # a bad baseline fails before the run
    if args.out and Path(args.out).suffix != ".json":
        raise SaapError(f"--out must name a .json file (the .md and .png go beside it), not '{args.out}'")
    settings = from_args(BenchSettings, args, slowdown=slowdown_from_env())
    doc = run_bench(settings, progress=not args.quiet)
    print(format_table(doc))
    if doc["references"]:
        print(format_references(doc))
    if args.out:
        written = write_outputs(doc, args.out)
        print(f"wrote {', '.join(str(p) for p in written)}")
    regressions = None
    if baseline is not None:
        regressions = compare(doc, baseline, args.tolerance, absolute=not args.ratios_only)
        print(format_regressions(regressions, args.tolerance))
    failed = failures(doc)
    if failed:  # every other run was measured and written; the first failure is the error line
        written_note = f"; the other results are in {args.out}" if args.out else ""
        raise SaapError(f"{len(failed)} benchmark run(s) failed: {failed[0]['failed']}{written_note}")
    return 1 if regressions else 0


def build_parser() -> argparse.ArgumentParser:
    from saap.pipeline.bench import BenchSettings
    from saap.pipeline.evaluate import EvalSettings
    from saap.pipeline.finetune import FinetuneSettings
    from saap.pipeline.finetune.teacher_text import SampleSettings
    from saap.pipeline.prune import PruneSettings

    parser = _Parser(prog="saap", description="Prune LLaMA-family models and deploy them to edge runtimes.")
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    p = verbs.add_parser("prune", help="structurally prune a model and save the smaller checkpoint")
    _add_model(p)
    add_options(p, PruneSettings)
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_prune)

    p = verbs.add_parser("generate", help="generate text from a model")
    _add_model(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _add_engine(p)
    p.set_defaults(func=cmd_generate)

    p = verbs.add_parser("eval", help="evaluate a model: perplexity, zero-shot accuracy (lm-eval), generations")
    _add_model(p)
    add_options(p, EvalSettings)
    _add_engine(p)  # gguf / onnx: perplexity and generations of the exported artifact itself
    p.add_argument("--out", help="write the results as JSON (and a markdown table beside it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)

    p = verbs.add_parser("finetune", help="recover a pruned model: group-quantized LoRA (SAAP) or plain LoRA, merged")
    _add_model(p)
    p.add_argument(
        "--data", required=True, nargs="+", help="Alpaca-format .json/.jsonl (instruction, input, output), or plain "
        "text (.txt, .jsonl of {\"text\": ...}), or the token ids saap sample writes (DIR/samples.jsonl); several "
        "files of one kind are joined",
    )  # fmt: skip
    add_options(p, FinetuneSettings)
    p.add_argument("--out", required=True, help="output checkpoint directory (merged float model)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace --out; discard an interrupted run of other settings"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_finetune)

    p = verbs.add_parser(
        "sample", help="sample text from a model (the dense parent) into a cache for saap finetune --teacher"
    )
    _add_model(p)
    add_options(p, SampleSettings)
    p.add_argument("--out", required=True, help="cache directory: samples.jsonl (token ids) and sample.json")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sample)

    p = verbs.add_parser("export", help="export a checkpoint to ONNX (ONNX Runtime) or GGUF (llama.cpp)")
    p.add_argument("format", choices=["onnx", "gguf"])
    _add_model(p)
    p.add_argument("--out", required=True, help="ONNX: output directory; GGUF: output .gguf file")
    p.add_argument("--precision", help=f"ONNX: {' | '.join(ONNX_PRECISIONS)} (default: {DEFAULT_PRECISION})")
    p.add_argument(
        "--graph", default=DEFAULT_GRAPH, choices=ONNX_GRAPHS,
        help="ONNX: fused (ONNX Runtime's GroupQueryAttention / MatMulNBits contrib ops, shared KV buffer) or "
        "traced (optimum's trace); auto = fused, traced for fp16 (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--accuracy-level", type=int, default=DEFAULT_ACCURACY_LEVEL, choices=ACCURACY_LEVELS,
        help="ONNX int8 / int4, fused graph: MatMulNBits accuracy_level of the decoder projections; 0 = float32 "
        "activations (exact), 4 = int8 activations (onnxruntime-genai's CPU setting: faster on CPUs whose float "
        "kernel is slow, ~96 %% top-1 agreement on SmolLM2) (default: %(default)s)",
    )  # fmt: skip
    p.add_argument("--quant", help=f"GGUF: {' | '.join(GGUF_QUANTS)} (default: {DEFAULT_QUANT})")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_export)

    p = verbs.add_parser("bench", help="prefill/decode throughput of dense and pruned models on each engine")
    add_options(p, BenchSettings)
    p.add_argument("--out", help="write the JSON document (and .md table, .png chart beside it)")
    p.add_argument("--compare", help="baseline JSON: exit 1 with a table of metrics that regressed")
    p.add_argument("--tolerance", type=float, help="allowed relative regression for --compare (default 0.10)")
    p.add_argument(
        "--ratios-only",
        action="store_true",
        help="--compare only machine-independent metrics (speed-up ratios, sizes, params), even on the same hardware",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench)

    from saap.pipeline.profile import PROBE_REPEATS

    p = verbs.add_parser("profile", help="fit a decode cost model of an engine on this machine (speed budgets)")
    _add_model(p)
    p.add_argument("--engine", required=True, help="ENGINE[:QUANT][@DEVICE], e.g. gguf:q8_0, onnx:fp32, torch@cuda")
    p.add_argument("--threads", type=int, help="CPU threads (default: physical cores)")
    p.add_argument("--repeats", type=int, default=PROBE_REPEATS, help="measured decode runs per probe (median)")
    p.add_argument("--out", help="profile JSON (default: where saap prune --engine looks, in the cache)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_profile)

    from saap.pipeline.config import DEFAULT_CONFIG
    from saap.pipeline.run import STAGES

    p = verbs.add_parser("run", help="the whole pipeline from a YAML config, resumable: prune → ... → report")
    p.add_argument(
        "config",
        nargs="?",
        default=DEFAULT_CONFIG,
        help=f"a run config file, or the name of one that ships with saap (default: {DEFAULT_CONFIG})",
    )
    p.add_argument("--from", dest="from_stage", choices=STAGES, help="rerun this stage and every later one")
    p.add_argument("--until", dest="until_stage", choices=STAGES, help="stop after this stage")
    p.add_argument("--force", action="append", default=[], choices=STAGES, help="rerun this stage (repeatable)")
    p.add_argument("--check", action="store_true", help="validate the config and exit")
    p.add_argument(
        "-v", "--verbose", action="store_true", help="also show what the stages' children print (else in log.txt)"
    )
    p.set_defaults(func=cmd_run)
    for p in verbs.choices.values():  # every verb: library warnings and llama.cpp's C-level log on request
        if "verbose" not in {a.dest for a in p._actions}:
            p.add_argument("-v", "--verbose", action="store_true", help="also show library and llama.cpp logs")
        if "data_dir" not in {a.dest for a in p._actions}:
            p.add_argument("--data-dir", help="data directory tried before saap's own copy (or $SAAP_DATA_DIR)")
    return parser


def main(argv: list[str] | None = None) -> int:
    if not (verbose() or {"-v", "--verbose"} & set(sys.argv[1:] if argv is None else argv)):
        # Library warnings stay off the terminal unless -v (peft 0.22 warns on import about transformers < 5.6):
        # set before the verbs' modules are imported, since some warn as they load.
        warnings.simplefilter("ignore")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"  # read where native code logs, and inherited by a run's stages
    if args.data_dir:
        from saap.pipeline.data import DATA_DIR_ENV

        os.environ[DATA_DIR_ENV] = str(Path(args.data_dir).expanduser().resolve())  # a run's stages inherit it
    if not verbose():
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # the GGUF tokenizer's "legacy behaviour" notice is noise here
    try:
        code = args.func(args)  # a verb may return an exit status (bench --compare: 1 on a regression)
    except SaapError as e:
        print(f"saap: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("saap: interrupted", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
