"""The `shipyard` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from shipyard.errors import ShipyardError
from shipyard.launch import claim_failure, launch, launched_by_shipyard

EPILOG = """\
examples:
  shipyard train                                   # the quickstart: a tiny model learns to reverse words
  shipyard train recipes/qwen3_0.6b_sft.yaml data.train=my_chats.jsonl
  shipyard train quickstart train.max_steps=100 optim.lr=1e-3
  shipyard config show quickstart                  # every setting, defaults included
  shipyard data preview my_recipe.yaml             # the supervised tokens of the first samples
  shipyard data prepare my_recipe.yaml             # tokenize into the cache every rank then memory-maps
  shipyard export runs/quickstart/checkpoints/step_500 exported/
  shipyard verify runs/quickstart/final
  shipyard generate runs/quickstart/final chats.jsonl regenerated.jsonl

recipes are YAML; overrides are dotted keys with YAML values (key.path=value).
docs: README.md
"""


def _split_recipe_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def cmd_train(args: argparse.Namespace) -> int:
    from shipyard.config import load_recipe

    recipe_arg, overrides = _split_recipe_and_overrides(args.recipe_and_overrides)
    recipe = load_recipe(recipe_arg, overrides)  # validated here, before any process is spawned
    if args.nproc_per_node and "LOCAL_RANK" not in os.environ:
        return launch("train", args.nproc_per_node, args.recipe_and_overrides)
    from shipyard.parallel.dist import destroy

    if recipe.task == "dflash":
        from shipyard.train.dflash import train_dflash

        summary = train_dflash(recipe)
        destroy()
        if int(os.environ.get("RANK", "0")) == 0:
            _print_dflash_report(recipe, summary)
        return 0
    from shipyard.train.loop import train  # heavy imports only after the recipe validated

    # No `finally`: tearing the process group down before main() reports a failure would close the peers'
    # connections first, and a peer's "Connection closed" would be reported instead of the cause.
    summary = train(recipe).summary
    destroy()
    if int(os.environ.get("RANK", "0")) == 0:
        _print_train_report(recipe, summary)
    return 0


def _print_dflash_report(recipe, summary: dict) -> None:
    ev = summary["eval"]
    print()
    print(f"done: drafter trained {summary['steps']} steps in {summary['train_seconds']:.1f}s "
          f"({summary['wall_seconds']:.0f}s wall)")
    if ev:
        print(f"offline on the validation answers: mean acceptance length tau "
              f"{ev['mean_acceptance_length']:.3f} (ceiling {ev['ceiling_mean_acceptance_length']:.3f}), "
              f"per position {', '.join(f'{a:.2f}' for a in ev['acceptance_per_position'])}")
    print(f"drafter (vLLM DFlash format): {summary['final_checkpoint']}")
    print(f"\nnext:\n  shipyard verify {summary['final_checkpoint']}    # serve target + drafter in vLLM: lossless? tau?")


def _print_train_report(recipe, summary: dict) -> None:
    out = recipe.out_dir
    ev = summary["eval"]
    print()
    print(f"done: {summary['steps']} steps in {summary['train_seconds']:.1f}s of training "
          f"({summary['tokens_per_second']:,.0f} tokens/s), final train loss "
          + (f"{summary['final_train_loss']:.4f}" if summary["final_train_loss"] is not None else "n/a"))
    if "loss" in ev:
        print(f"validation loss {ev['loss']:.4f}")
    if "exact_match" in ev:
        print(f"exact match {ev['exact_match']:.1%} on {ev['num_prompts']} held-out prompts; for example:")
        for ex in ev["examples"][:3]:
            print(f"  {ex['prompt']!r} -> {ex['got']!r}" + ("" if ex["got"] == ex["expected"].strip() else f" (expected {ex['expected']!r})"))
    if "wer" in ev:
        print(f"word error rate {ev['wer']:.1%}"
              + (" (" + ", ".join(f"{k.removeprefix('synthetic:')} {v:.1%}" for k, v in ev["wer_by_source"].items()) + ")"
                 if "wer_by_source" in ev else ""))
    if summary["skipped_records"]["total"]:
        print(f"skipped records: {summary['skipped_records']}")
    final = summary["final_checkpoint"]
    if final is None:
        step_dir = summary["last_step_checkpoint"]
        print(f"\nsharded checkpoint: {step_dir} (checkpoint.consolidate=never)")
        print(f"make a Hugging Face directory: shipyard consolidate {step_dir} OUT_DIR [--nproc-per-node N]")
        return
    adapter = (Path(final) / "adapter_config.json").is_file()
    kind = "Hugging Face PEFT adapter" if adapter else "Hugging Face"
    print(f"\nfinal checkpoint ({kind}, vLLM-ready): {final}")
    print(f"metrics: {out / 'metrics.jsonl'}, {out / 'loss.png'}, TensorBoard in {out / 'tensorboard'}")
    prompt = (ev.get("examples") or [{"prompt": "Hello!"}])[0]["prompt"]
    print("\nnext:")
    print(f"  shipyard verify {final}            # prove it serves: transformers vs vLLM, greedy tokens")
    if adapter:
        print(f"  shipyard export {final} merged/ --merge-lora   # full weights with the adapter merged in")
        print(f"  python -c \"from peft import AutoPeftModelForCausalLM; m = AutoPeftModelForCausalLM.from_pretrained('{final}')\"")
    elif '"shipyard_speechlm"' in (Path(final) / "config.json").read_text():  # a speech-LM: shipyard's vLLM plugin
        print(f"  python -m vllm.entrypoints.openai.api_server --model {final}   # OpenAI server (`vllm serve` on GPU "
              "builds): chat messages with audio_url parts")
    elif (Path(final) / "processor_config.json").is_file():  # a vision-language model
        print(f"  python -c \"from transformers import pipeline; print(pipeline('image-text-to-text', '{final}')("
              f"text=[{{'role': 'user', 'content': [{{'type': 'image', 'url': 'IMAGE.png'}}, "
              f"{{'type': 'text', 'text': {prompt!r}}}]}}])[0]['generated_text'][-1])\"")
    else:
        print(f"  python -c \"from transformers import pipeline; print(pipeline('text-generation', '{final}')("
              f"[{{'role': 'user', 'content': {prompt!r}}}])[0]['generated_text'][-1])\"")
    print(f"  tensorboard --logdir {out / 'tensorboard'}")


def cmd_config_show(args: argparse.Namespace) -> int:
    from shipyard.config import dump_recipe, load_recipe

    recipe_arg, overrides = _split_recipe_and_overrides(args.recipe_and_overrides)
    print(dump_recipe(load_recipe(recipe_arg, overrides)), end="")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from shipyard.config import load_recipe
    from shipyard.data.dataset import describe_sources
    from shipyard.data.preview import preview_datasets

    recipe_arg, overrides = _split_recipe_and_overrides(args.recipe_and_overrides)
    recipe = load_recipe(recipe_arg, [*overrides, "data.cache=true"])
    started = time.perf_counter()
    _, data = preview_datasets(recipe, None)
    print(f"{len(data.train):,} train / {len(data.validation):,} validation samples in {time.perf_counter() - started:.1f} s; "
          f"skipped {data.skipped.report()}, truncated {data.truncated}")
    print(describe_sources(data))
    return 0


def cmd_data_preview(args: argparse.Namespace) -> int:
    from shipyard.config import load_recipe
    from shipyard.data.preview import preview_datasets, print_preview, sample_json

    recipe_arg, overrides = _split_recipe_and_overrides(args.recipe_and_overrides)
    recipe = load_recipe(recipe_arg, overrides)
    tokenizer, data = preview_datasets(recipe, args.limit)
    if args.json:
        for sample in data.train:
            print(sample_json(sample))
        print(json.dumps({"skipped_records": data.skipped.report(), "assistant_turns": data.turns_report()}),
              file=sys.stderr)
        return 0
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    print_preview(tokenizer, recipe, data, args.limit, sys.stdout, color)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from shipyard.export.export import export_checkpoint

    dtype = getattr(torch, args.dtype) if args.dtype else None
    result = export_checkpoint(Path(args.checkpoint), Path(args.out_dir), force=args.force, dtype=dtype,
                               trust_remote_code=args.trust_remote_code, merge_lora=args.merge_lora)
    if result.replaced:
        print(f"replaced {len(result.replaced)} entries in {result.out_dir}: {', '.join(result.replaced)}")
    print(f"exported {args.checkpoint} -> {result.out_dir} ({len(result.files)} weight file(s), {result.dtype})")
    return 0


def cmd_consolidate(args: argparse.Namespace) -> int:
    if args.nproc_per_node and "LOCAL_RANK" not in os.environ:
        rest = [args.step_dir, args.out_dir] + (["--force"] if args.force else [])
        return launch("consolidate", args.nproc_per_node, rest)
    from shipyard.export.export import export_checkpoint
    from shipyard.parallel.dist import destroy, init_distributed

    dist_info = init_distributed("cpu")
    result = export_checkpoint(Path(args.step_dir), Path(args.out_dir), force=args.force, dist_info=dist_info)
    destroy()  # not in a `finally`: see cmd_train
    if dist_info.is_main:
        print(f"consolidated {args.step_dir} -> {result.out_dir} ({len(result.files)} weight file(s), "
              f"{result.dtype}, written by {dist_info.world_size} process(es))")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from shipyard.bench.run import bench, format_report, parse_switches

    report = bench(args.preset, steps=args.steps, switches=parse_switches(args.shipyard))
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from shipyard.verify.run import format_report, verify_many

    reports = verify_many([Path(d) for d in args.dirs], target=args.target, max_new_tokens=args.max_new_tokens,
                          allow_missing_vllm=args.allow_missing_vllm, trust_remote_code=args.trust_remote_code,
                          logprob_tolerance=args.logprob_tolerance)
    if args.json:  # one object per directory, one per line
        print("\n".join(json.dumps(report) for report in reports))
    else:
        print("\n\n".join(format_report(report) for report in reports))
        if len(reports) > 1:
            failed = [r["dir"] for r in reports if not r["ok"]]
            print(f"\n{len(reports) - len(failed)} of {len(reports)} directories pass"
                  + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 0 if all(r["ok"] for r in reports) else 1


def cmd_generate(args: argparse.Namespace) -> int:
    from shipyard.generate import format_summary, generate

    summary = generate(args.model_dir, args.data, args.out, max_new_tokens=args.max_new_tokens, limit=args.limit,
                       temperature=args.temperature, on_error=args.on_error, num_records=args.num_records,
                       seed=args.seed, dtype=args.dtype, max_model_len=args.max_model_len,
                       trust_remote_code=args.trust_remote_code)
    print(format_summary(summary))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shipyard",
        description="Fine-tune Hugging Face models and ship checkpoints that load in transformers, PEFT and vLLM.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "train",
        help="fine-tune a model as a recipe describes",
        description="Train from a recipe. With no recipe, runs the shipped quickstart "
        "(a tiny Qwen3-style model learns to reverse words; about a minute on a laptop CPU).",
        epilog="examples:\n  shipyard train\n  shipyard train my_recipe.yaml optim.lr=1e-4 train.max_steps=200\n"
        "  torchrun --nproc-per-node 2 -m shipyard train my_recipe.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe_and_overrides", nargs="*", metavar="[RECIPE] [KEY=VALUE ...]",
                   help="a recipe file or shipped recipe name (default: quickstart), then dotted overrides")
    p.add_argument("--nproc-per-node", type=int, metavar="N",
                   help="run N processes on this machine (as torchrun would); FSDP2 shards the model over them")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("config", help="inspect recipes")
    config_sub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = config_sub.add_parser("show", help="print the resolved recipe, defaults and overrides applied")
    show.add_argument("recipe_and_overrides", nargs="*", metavar="[RECIPE] [KEY=VALUE ...]")
    show.set_defaults(func=cmd_config_show)

    p = sub.add_parser("data", help="look at training data as the model will see it")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    preview = data_sub.add_parser(
        "preview",
        help="show the first training samples with their supervised tokens highlighted",
        description="Render the first records of a recipe's training data through the real pipeline (the same "
        "tokenizer, chat template, template defaults, multi-turn setting and skip rules as `shipyard train`) and "
        "show every training sample with the tokens the loss covers highlighted, then the skip counts. Look at "
        "this before training on new data: a wrong loss mask does not show in a loss curve.",
        epilog="examples:\n  shipyard data preview\n  shipyard data preview my_recipe.yaml --limit 5\n"
        "  shipyard data preview recipes/qwen3_0.6b_sft.yaml data.train=chats.jsonl data.multi_turn=whole_dialog\n"
        "  shipyard data preview my_recipe.yaml --json | jq .labels   # one JSON object per sample; -100 = not trained",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    preview.add_argument("recipe_and_overrides", nargs="*", metavar="[RECIPE] [KEY=VALUE ...]",
                         help="a recipe file or shipped recipe name (default: quickstart), then dotted overrides")
    preview.add_argument("--limit", type=int, default=20, metavar="N", help="training records to render (default: 20)")
    preview.add_argument("--json", action="store_true",
                         help="one JSON object per sample on stdout: source (file:line), turns, input_ids, labels "
                         "(-100 where not supervised); skip counts on stderr")
    preview.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                         help="highlight with colour (auto: on a terminal) or with [[brackets]]")
    preview.set_defaults(func=cmd_data_preview)
    prepare = data_sub.add_parser(
        "prepare",
        help="tokenize a recipe's data into the token cache ahead of training",
        description="Read, mix and tokenize a recipe's training and validation data (in parallel processes) into the "
        "token cache that `shipyard train` then memory-maps on every rank. Training builds the cache itself when it "
        "is missing; prepare it ahead of a multi-node job, or to see the counts before paying for GPUs. The cache "
        "is keyed by everything that changes the samples: run it again after an edit and only a changed key "
        "tokenizes anew.",
        epilog="examples:\n  shipyard data prepare my_recipe.yaml\n"
        "  shipyard data prepare my_recipe.yaml data.num_proc=16 data.cache_dir=/shared/tokens",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prepare.add_argument("recipe_and_overrides", nargs="*", metavar="[RECIPE] [KEY=VALUE ...]",
                         help="a recipe file or shipped recipe name (default: quickstart), then dotted overrides")
    prepare.set_defaults(func=cmd_data_prepare)

    p = sub.add_parser(
        "export",
        help="write a vLLM-ready Hugging Face directory from a checkpoint",
        description="Export a shipyard step directory (or any Hugging Face model directory) as a directory that "
        "loads unchanged in transformers and vLLM: full config.json, EOS ids in generation_config.json, chat "
        "template inlined in tokenizer_config.json, portable tokenizer class, base-model sharding.",
    )
    p.add_argument("checkpoint", help="step directory (runs/NAME/checkpoints/step_N) or HF model directory")
    p.add_argument("out_dir", help="output directory (must be empty or absent unless --force)")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR (lists what it replaces)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="cast weights (default: the base model's per-tensor dtypes, else as trained)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code to load its config")
    p.add_argument("--merge-lora", action="store_true",
                   help="for a LoRA checkpoint: write full weights (base + scale * B @ A) instead of the adapter")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "consolidate",
        help="turn a sharded (multi-rank) step directory into a vLLM-ready Hugging Face directory",
        description="Read the DCP shards of STEP_DIR and write Hugging Face safetensors plus the metadata saved "
        "with the checkpoint, following the export rules (same code as `shipyard export`). With several "
        "processes, whole output files are divided among them.",
        epilog="examples:\n  shipyard consolidate runs/NAME/checkpoints/step_1000 hf_out/\n"
        "  shipyard consolidate runs/NAME/checkpoints/step_1000 hf_out/ --nproc-per-node 4",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("step_dir", help="a step directory (runs/NAME/checkpoints/step_N)")
    p.add_argument("out_dir", help="output directory (must be empty or absent unless --force)")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    p.add_argument("--nproc-per-node", type=int, metavar="N", help="split the work over N local processes")
    p.set_defaults(func=cmd_consolidate)

    p = sub.add_parser(
        "bench",
        help="measure training throughput against HF Trainer, side by side",
        description="Train the same model on the same data with shipyard and with transformers.Trainer (each in its "
        "own process) and report tokens/s, MFU (FLOPs per token = 6*N + 6*layers*heads*head_dim*seq; 4*N for LoRA), "
        "peak memory and the ratio. Presets: tiny (CPU, about a minute), qwen3-0.6b and llama3-8b-lora (GPU).",
        epilog="examples:\n  shipyard bench --preset tiny\n  shipyard bench --preset qwen3-0.6b --json\n"
        "  shipyard bench --preset qwen3-0.6b --shipyard compile=false   # what per-block compile adds",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", choices=["tiny", "qwen3-0.6b", "llama3-8b-lora"], default="tiny")
    p.add_argument("--steps", type=int, help="measured steps (default: the preset's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--shipyard", action="append", default=[], metavar="SWITCH=VALUE",
                   help="flip one shipyard setting to measure it: compile=true|false|auto, "
                   "activation_checkpointing=none|selective|full, packing=true|false (repeatable)")
    p.add_argument("--save", type=Path, metavar="FILE", help="also write the JSON report to FILE")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "verify",
        help="prove a directory serves: transformers vs vLLM greedy tokens and logprobs, chat-template parity",
        description="Load DIR in transformers and in vLLM (a subprocess), answer the same chat prompts greedily "
        "(the run's validation prompts when DIR came from shipyard), and compare token ids and the logprobs of the "
        "chosen tokens (within a tolerance for vLLM's dtype). Also "
        "checks that DIR's chat template renders exactly what training rendered and that every assistant turn "
        "ends with an EOS id. Exit 0 only when everything agrees.",
        epilog="examples:\n  shipyard verify runs/quickstart/final\n  shipyard verify runs/quickstart/final --json | jq .ok\n"
        "  shipyard verify runs/a/final runs/b/final exported/   # several: one vLLM worker, one JSON line each",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dirs", nargs="+", metavar="DIR",
                   help="Hugging Face directories (e.g. runs/NAME/final), adapters or DFlash drafter directories; "
                   "several are checked with one vLLM worker (its start-up paid once)")
    p.add_argument("--target", metavar="DIR", help="a DFlash drafter's target (default: the one it was trained for)")
    p.add_argument("--json", action="store_true", help="print one JSON object per directory (one per line) instead of "
                   "the table")
    p.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens compared per prompt (default: 32)")
    p.add_argument("--logprob-tolerance", type=float, metavar="X",
                   help="largest |logprob difference| of a generated token accepted (default by vLLM's dtype: "
                   "float32 1e-3, float16 5e-2, bfloat16 1e-1)")
    p.add_argument("--allow-missing-vllm", action="store_true", help="exit 0 without vLLM installed (reports available: false)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "generate",
        help="regenerate a chat dataset's assistant turns with a target model (vLLM), e.g. to train a drafter",
        description="Replace every assistant turn of DATA, in order, by MODEL_DIR's own answer to the conversation "
        "so far (earlier assistant turns already replaced), generated by vLLM through its chat path (LLM.chat: the "
        "model's chat template and generation_config.json sampling defaults, stopping at EOS, as served) in a "
        "subprocess, and write the records to OUT.jsonl "
        "with everything else unchanged (system/user turns, extra keys; a regenerated turn loses the old answer's "
        "reasoning fields). A speculative-decoding drafter trained on the target's own answers accepts more of its "
        "tokens. OUT.jsonl is written atomically once all answers are in. Records with tool calls, offered tools, "
        "images or no assistant turn, and prompts longer than the model's context, are skipped and counted by "
        "reason; a malformed record stops the run with its file:line unless --on-error skip.",
        epilog="examples:\n"
        "  shipyard generate runs/quickstart/final chats.jsonl regenerated.jsonl\n"
        "  shipyard generate runs/NAME/final chats.jsonl out.jsonl --limit 1000 --max-new-tokens 512 --on-error skip\n"
        "  shipyard generate runs/quickstart/final synthetic:reverse_words out.jsonl --num-records 200 --seed 1\n"
        "  shipyard train my_drafter.yaml data.train=out.jsonl        # then train on the target's own answers\n"
        "\nDATA is a JSON Lines file of OpenAI-style chat records, one per line:\n"
        '  {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
        "(optional per-record chat_template_kwargs are honoured), or synthetic:TASK for a built-in task\n"
        "(synthetic:reverse_words, synthetic:sort_words; sized by --num-records and --seed).\n"
        "vLLM gets SHIPYARD_VLLM_GPU_MEMORY_UTILIZATION (default 0.3) of a GPU, as in `shipyard verify`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a Hugging Face model directory, e.g. runs/NAME/final")
    p.add_argument("data", metavar="DATA", help="a JSONL file of chat records, or synthetic:TASK")
    p.add_argument("out", metavar="OUT.jsonl", help="where to write the regenerated records (replaced atomically)")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N",
                   help="longest answer in tokens; a longer one is cut and counted in the summary (default: 256)")
    p.add_argument("--limit", type=int, metavar="N", help="regenerate only the first N usable records")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="sampling temperature (default: 0, greedy); vLLM's seed is 0")
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                   help="a malformed record: stop with its file:line (raise, the default) or count and skip it")
    p.add_argument("--num-records", type=int, default=1000, metavar="N",
                   help="records of a synthetic:TASK (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="generator seed of a synthetic:TASK (default: 0)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="vLLM's dtype (default: auto, vLLM's choice for the checkpoint)")
    p.add_argument("--max-model-len", type=int, metavar="N",
                   help="vLLM's context length (default: the model's, reduced to what the KV cache holds); "
                   "longer prompts are skipped and counted")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code")
    p.set_defaults(func=cmd_generate)
    return parser


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Notes are said once: by the launching process, or by rank 0 under a plain torchrun.
    quiet_rank = launched_by_shipyard() or int(os.environ.get("RANK", "0")) > 0
    logging.getLogger("shipyard").setLevel(logging.DEBUG if verbose else logging.WARNING if quiet_rank else logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not verbose:
        # Through the environment, read when transformers and huggingface_hub are first imported: importing them
        # here would cost every command, `--help` included, two seconds. Ranks and vLLM workers inherit it.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if "transformers.utils.logging" in sys.modules:  # already imported (shipyard.cli.main called in-process)
            hf_logging = sys.modules["transformers.utils.logging"]
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except ShipyardError as e:
        # In a multi-process run only the first failing rank reports, and through the launcher when there is one.
        if claim_failure("error", str(e)) and not launched_by_shipyard():
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: its traceback once, from the rank where it happened first
        if claim_failure("crash", f"{type(e).__name__}: {e}"):
            raise
        return 1  # a peer failed first; this rank's error (a closed connection) is only a consequence


def entrypoint() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()
