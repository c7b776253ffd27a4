"""`shipyard train`: fine-tune as a recipe describes, then report what was made and what to do next."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from shipyard.cli.common import RECIPE_AND_OVERRIDES, RECIPE_AND_OVERRIDES_HELP, split_recipe_and_overrides
from shipyard.launch import launch


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="fine-tune a model as a recipe describes",
        description="Train from a recipe. With no recipe, runs the shipped quickstart "
        "(a tiny Qwen3-style model learns to reverse words; about a minute on a laptop CPU).",
        epilog="examples:\n  shipyard train\n  shipyard train my_recipe.yaml optim.lr=1e-4 train.max_steps=200\n"
        "  torchrun --nproc-per-node 2 -m shipyard train my_recipe.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe_and_overrides", nargs="*", metavar=RECIPE_AND_OVERRIDES, help=RECIPE_AND_OVERRIDES_HELP)
    p.add_argument("--nproc-per-node", type=int, metavar="N",
                   help="run N processes on this machine (as torchrun would); FSDP2 shards the model over them")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from shipyard.config import load_recipe

    recipe_arg, overrides = split_recipe_and_overrides(args.recipe_and_overrides)
    recipe = load_recipe(recipe_arg, overrides)  # validated here, before any process is spawned
    if args.nproc_per_node and "LOCAL_RANK" not in os.environ:
        return launch("train", args.nproc_per_node, args.recipe_and_overrides)
    from shipyard.parallel.dist import destroy

    from shipyard.train.loop import train  # heavy imports only after the recipe validated

    # No `finally`: tearing the process group down before main() reports a failure would close the peers'
    # connections first, and a peer's "Connection closed" would be reported instead of the cause.
    summary = train(recipe).summary
    destroy()
    if int(os.environ.get("RANK", "0")) == 0:
        REPORTS.get(summary["task"], print_train_report)(recipe, summary)
    return 0


def print_drafter_report(recipe, summary: dict) -> None:
    ev = summary["eval"]
    print()
    print(f"done: drafter trained {summary['steps']} steps in {summary['train_seconds']:.1f}s "
          f"({summary['wall_seconds']:.0f}s wall)")
    if ev:
        print(f"offline on the validation answers: mean acceptance length tau "
              f"{ev['mean_acceptance_length']:.3f} (ceiling {ev['ceiling_mean_acceptance_length']:.3f}), "
              f"per position {', '.join(f'{a:.2f}' for a in ev['acceptance_per_position'])}")
    print(f"drafter (vLLM {'DFlash' if summary['task'] == 'dflash' else 'EAGLE-3'} format): "
          f"{summary['final_checkpoint']}")
    print(f"\nnext:\n  shipyard verify {summary['final_checkpoint']}    # serve target + drafter in vLLM: lossless? tau?")


def print_train_report(recipe, summary: dict) -> None:
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


REPORTS = {"dflash": print_drafter_report, "eagle3": print_drafter_report}  # summary["task"] -> its report; every other task gets the SFT one
