"""Build the small tokenizer shipped for the quickstart and the tests.

    python -m shipyard.assets.build_tokenizer  # rewrites shipyard/assets/tokenizer/

A byte-level BPE (every byte is in the alphabet, so any text encodes) trained
on rendered synthetic-task dialogs plus a little English, with ChatML special
tokens and a ChatML chat template, like Qwen's instruct models. The output is
committed; this script documents how it was made and rebuilds it.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from shipyard.data.synthetic import reverse_words, sort_words

OUT_DIR = Path(__file__).parent / "tokenizer"
VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, as Qwen's instruct models use it. No `{% generation %}` markers:
# shipyard derives assistant masks by rendering prefixes for templates without them.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

ENGLISH = """The quick brown fox jumps over the lazy dog. Hello, world! What is the
capital of France? Paris is the capital of France. Please answer the question
in one word. Thank you for your help. Write a short poem about the sea. The
model learns to follow instructions and to stop when the answer is complete.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2026. Yes. No. Maybe."""


def training_text(num_dialogs: int = 4000) -> list[str]:
    texts = [ENGLISH]
    for record in reverse_words(num_dialogs, seed=12345) + sort_words(num_dialogs // 4, seed=54321):
        texts.append(
            "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in record["messages"])
        )
    random.Random(0).shuffle(texts)
    return texts


def build(out_dir: Path = OUT_DIR) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output directory (default: %(default)s)")
    args = parser.parse_args()
    tok = build(args.out)
    print(f"wrote {args.out} ({len(tok)} tokens)")


if __name__ == "__main__":
    main()
