"""The recipe: a typed, validated description of one run.

A recipe is YAML validated by the pydantic models below. Overrides on the
command line use dotted keys with YAML-parsed values (`optim.lr=3e-4`).
Nothing in a recipe is executed: values are data, never import paths.

An unknown or mistyped key fails before any work, naming the key and the
closest valid one, because a typo that silently falls back to a default costs
a whole training run.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
import logging
import re
import typing
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from shipyard.errors import ShipyardError, did_you_mean

log = logging.getLogger(__name__)


def _accepts_bool(annotation: Any) -> bool:
    if annotation is bool or annotation is Any:
        return True
    return any(_accepts_bool(arg) for arg in typing.get_args(annotation))


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bools_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads true as 1: `train.max_steps=true` would silently train one step.
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and not _accepts_bool(annotation):
            kinds = {t for t in (int, float) if t is annotation or t in typing.get_args(annotation)}
            raise ValueError(f"expected {'a number' if kinds else 'a value of its own type'}, not the boolean "
                             f"{str(value).lower()}")
        return value


class MTPConfig(Section):
    """Multi-token-prediction heads (DeepSeek-V3 style, models/mtp.py), trained beside or on top of the base."""

    num_layers: int | None = Field(None, gt=0, description="MTP modules, one per extra predicted token; default: "
                                   "the base's own count when it already has MTP weights (they are loaded, never "
                                   "re-initialised), else 1.")
    loss_scale: float = Field(0.3, ge=0.0, description="Loss = main + loss_scale x mean over depths of each "
                              "depth's per-token loss (DeepSeek-V3 used 0.1-0.3).")
    freeze_base: bool = Field(False, description="Train only the head; the base stays bit-identical (the way to "
                              "make an already served model faster). false: fine-tune base and head jointly.")


class SpeechConfig(Section):
    """Make a speech-LM of the causal LM in `model.path` and a pretrained audio encoder (models/speechlm)."""

    encoder: str = Field(..., description="FastConformer encoder: a transformers `parakeet` checkpoint (CTC/TDT: "
                         "its encoder is taken) or a `parakeet_encoder` directory; hub id or local directory.")
    projector_stack: int = Field(2, ge=1, description="Encoder frames per audio token (each adds 80 ms at 8x "
                                 "subsampling).")
    ctc_loss_weight: float = Field(0.0, ge=0.0, description="CTC side loss on the encoder against the transcript: "
                                   "for encoders trained from scratch (the presets use 1.0); 0 for pretrained ones.")


class ModelConfig(Section):
    path: str = Field(
        "qwen3-tiny",
        description="Hub id, local Hugging Face directory, or preset name (see `shipyard.models.presets`).",
    )
    tokenizer: str | None = Field(None, description="Tokenizer hub id or directory; default: the model's own.")
    trust_remote_code: bool = Field(False, description="Allow modelling code shipped with the model (runs its Python).")
    attn_implementation: str = Field(
        "auto", description="Hugging Face attention backend (sdpa, eager, flash_attention_2, flex_attention...); auto: "
        "sdpa unless the config declares a feature sdpa ignores (Gemma 2 soft-capping, attention sinks), then eager."
    )
    freeze: list[str] = Field(
        default_factory=list, description="Parts left untrained (no gradients, no optimizer state, bit-identical "
        "after training): vision_tower, audio_encoder, projector, language_model, embeddings, or parameter-name globs "
        "(model.visual.blocks.0.*)."
    )
    speech: SpeechConfig | None = Field(None, description="Train a speech-LM: the LLM in model.path with the audio "
                                        "encoder named here and a new projector (exported as one model).")
    mtp: MTPConfig | None = Field(None, description="Attach and train multi-token-prediction heads ({} for the "
                                  "defaults); exported where vLLM reads them for the base's family.")


FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def looks_like_hub_dataset(text: str) -> bool:
    """`org/name` that is not a file shipyard reads (a hub dataset id, as dataset cards write it)."""
    return (bool(re.fullmatch(r"[\w.-]+/[\w.-]+", text)) and not text.endswith(FILE_SUFFIXES)
            and not Path(text).expanduser().exists())


class DataSource(Section):
    """One dataset: a local file, a hub dataset, or a built-in synthetic task; and how much of it to use."""

    path: str | None = Field(None, description="Local file: JSONL, or .json/.parquet/.csv read through `datasets`.")
    dataset: str | None = Field(None, description="Hub dataset id (org/name), read through `datasets` from the "
                                "Hugging Face cache (HF_HOME; HF_HUB_OFFLINE=1 reads only what is cached).")
    split: str = Field("train", description="Split of a hub dataset (e.g. train_sft; slices such as "
                       "train[:10%] work too).")
    subset: str | None = Field(None, description="A hub dataset's configuration (its subset/name).")
    revision: str | None = Field(None, description="A hub dataset's branch, tag or commit.")
    format: Literal["auto", "messages", "sharegpt", "prompt_completion", "alpaca"] = Field(
        "auto", description="Column layout: messages (OpenAI-style), sharegpt (conversations of from/value), "
        "prompt_completion, alpaca (instruction/input/output); auto: told by the columns present.")
    columns: dict[str, str] = Field(default_factory=dict, description="The dataset's names for the format's "
                                    "columns, e.g. {messages: conversation} or {prompt: question, completion: answer}.")
    synthetic: Literal["reverse_words", "sort_words", "shapes", "shapes_mixed", "spoken_digits",
                       "spoken_digits_heldout", "spoken_digits_unseen_voices"] | None = Field(
        None, description="Built-in generated task (shapes: 'What is at the top left?' about coloured shapes in "
        "64x64 images; shapes_mixed: also counting and 'Where is ...?', harder; spoken_digits: speech synthesised "
        "offline with eSpeak NG, digit strings and commands to transcribe; _heldout: sequences training never "
        "has; _unseen_voices: those sequences in voices training never has)."
    )
    num_records: int = Field(10_000, gt=0, description="Records to generate (synthetic only).")
    seed: int = Field(0, description="Generator seed (synthetic only).")
    weight: float | None = Field(None, gt=0, description="Mixtures: this source's share of the records of all "
                                 "weighted sources (weights are relative; the total stays their records' sum).")
    num_samples: int | None = Field(None, gt=0, description="Mixtures: take exactly this many records (a seeded "
                                    "subset, or repeats beyond the source's size).")
    epochs: float | None = Field(None, gt=0, description="Mixtures: passes over this source (0.3: a seeded 30%; "
                                 "2: every record twice).")

    @model_validator(mode="after")
    def _exactly_one_kind(self) -> DataSource:
        if sum(x is not None for x in (self.path, self.dataset, self.synthetic)) != 1:
            raise ValueError("set exactly one of 'path', 'dataset' or 'synthetic'")
        if sum(x is not None for x in (self.weight, self.num_samples, self.epochs)) > 1:
            raise ValueError("set at most one of 'weight', 'num_samples' or 'epochs'")
        return self

    def describe(self) -> str:
        if self.path is not None:
            return self.path
        if self.dataset is not None:
            subset = f", {self.subset}" if self.subset else ""
            return f"{self.dataset}[{self.split}{subset}]"
        return f"synthetic:{self.synthetic}(n={self.num_records}, seed={self.seed})"


class DataConfig(Section):
    train: list[DataSource] = Field(description="Training sources, concatenated.")
    validation: list[DataSource] = Field(default_factory=list, description="Validation sources.")
    validation_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="Carve this fraction of train off as validation when none is given."
    )
    max_length: int = Field(2048, gt=1, description="Tokens per sample after chat rendering.")
    overlength: Literal["truncate", "drop"] = Field("truncate", description="What to do with longer samples.")
    on_error: Literal["raise", "skip"] = Field("raise", description="Malformed records: stop with file:line, or count and skip.")
    multi_turn: Literal["as_served", "whole_dialog"] = Field(
        "as_served", description="as_served: every assistant turn is trained exactly as serving renders it (its history "
        "re-rendered as the prompt), with extra samples where the template renders past turns differently (Qwen3 "
        "drops their reasoning); whole_dialog: one rendering per dialog, turns that differ from serving unsupervised "
        "and counted."
    )
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Template variables for every record (e.g. {enable_thinking: false}); "
        "written into the exported template as its defaults so vLLM's default request renders like training. "
        "A record's own chat_template_kwargs override them."
    )
    image_root: str | None = Field(None, description="Folder relative image paths are read from; default: each "
                                   "data file's own folder.")
    min_pixels: int | None = Field(None, gt=0, description="Images smaller than this many pixels are upscaled "
                                   "(Qwen-VL-style processors); default: the processor's own. Written into the export.")
    max_pixels: int | None = Field(None, gt=0, description="Images larger than this many pixels are downscaled "
                                   "before tokenizing (tokens per image grow with pixels); default: the processor's "
                                   "own. Written into the export, so vLLM makes as many image tokens as training.")
    max_image_pixels: int | None = Field(None, gt=0, description="Refuse images above this many pixels (a resize "
                                         "to max_pixels would destroy them); default: 16 x max_pixels.")
    max_audio_seconds: float = Field(30.0, gt=0, description="Refuse audio clips longer than this (each second "
                                     "is ~6 audio tokens with the default 8x subsampling and 2-frame stacking).")
    drop_images: bool = Field(False, description="Train on the text alone, image parts removed: the baseline that "
                              "shows how much the images matter.")
    cache: bool = Field(True, description="Tokenize once into an on-disk cache that every rank memory-maps; "
                        "later runs, resumes and previews of the same data start from it.")
    cache_dir: str | None = Field(None, description="Where token caches live; default: $SHIPYARD_TOKEN_CACHE, "
                                  "else ~/.cache/shipyard/tokens.")
    num_proc: int | None = Field(None, gt=0, description="Processes tokenizing a new cache; default: every core "
                                 "for 10,000 records or more of text data, else 1.")
    packing: bool | Literal["auto"] = Field(
        "auto", description="Pack each micro-batch's samples into rows of max_length with per-document attention; "
        "auto: on with varlen attention (flash_attention_2/3, flex_attention) when a start-up check shows the "
        "model keeps packed documents apart."
    )

    @model_validator(mode="before")
    @classmethod
    def _single_source_to_list(cls, data: Any) -> Any:
        # `train: {path: x.jsonl}` and `train: x.jsonl` are accepted shorthands for a one-element list.
        if isinstance(data, dict):
            for key in ("train", "validation"):
                value = data.get(key)
                if isinstance(value, (dict, str)):
                    value = [value]
                if isinstance(value, list):
                    data[key] = [_source_from_text(v) if isinstance(v, str) else v for v in value]
        return data


def _source_from_text(text: str) -> dict:
    return {"dataset": text} if looks_like_hub_dataset(text) else {"path": text}


class TrainConfig(Section):
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; default: `epochs` worth of steps.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data when max_steps is not set.")
    micro_batch_size: int = Field(8, gt=0, description="Samples per forward pass on each data-parallel rank.")
    grad_accum_steps: int = Field(1, gt=0, description="Micro-batches accumulated per optimizer step.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm; null disables.")
    mixed_precision: Literal["auto", "bf16", "no"] = Field("auto", description="auto: bf16 autocast on GPU, fp32 on CPU.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    loss_chunk_size: int = Field(2048, gt=0, description="Tokens per cross-entropy chunk (bounds logits memory).")
    log_every: int = Field(10, gt=0, description="Steps between log lines when stdout is not a terminal.")
    eval_every: int | None = Field(None, gt=0, description="Steps between validation-loss evaluations.")
    resume: str = Field("auto", description="auto: continue from checkpoints/LATEST if present; never; or a step directory.")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _no_is_false(cls, value):
        # YAML reads a bare `no` (train.mixed_precision=no) as false: that is what the user wrote.
        return "no" if value is False else value


class OptimConfig(Section):
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    schedule: Literal["cosine", "wsd", "constant"] = Field("cosine", description="Learning-rate shape after warmup.")
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final lr as a fraction of lr (cosine and wsd).")
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: fraction of steps spent decaying at the end.")


class CheckpointConfig(Section):
    every_steps: int | None = Field(None, gt=0, description="Save every N steps (and always at the end).")
    keep_last: int | None = Field(None, gt=0, description="Delete older step directories beyond this many.")
    consolidate: Literal["final", "every", "never"] = Field(
        "final",
        description="Multi-rank runs: write HF safetensors for every step directory, only the final export, or "
        "never (then `shipyard consolidate` later). Single-process step directories always hold safetensors.",
    )


class ParallelConfig(Section):
    fsdp: bool | Literal["auto"] = Field("auto", description="FSDP2 sharding; auto: on when several ranks share the data.")
    dp_replicate: int = Field(1, gt=0, description="Replica groups (HSDP); ranks = dp_replicate x dp_shard.")
    dp_shard: int = Field(-1, description="Ranks each replica shards over; -1: world size / dp_replicate.")
    reshard_after_forward: bool = Field(True, description="Free gathered block weights after forward (saves memory).")
    activation_checkpointing: Literal["none", "selective", "full"] = Field(
        "none", description="Recompute in backward: full recomputes each block; selective keeps the outputs of "
        "matmuls and attention and recomputes only the cheap pointwise ops (norms, activations, rotary)."
    )
    compile: bool | Literal["auto"] = Field(
        "auto", description="torch.compile each decoder block; auto: on for CUDA (the fast path), off on CPU "
        "(compiling costs more than it saves on small CPU runs)."
    )
    pp: int = Field(1, gt=0, description="Pipeline stages (torch.distributed.pipelining); ranks = pp x data-parallel.")
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = Field("1f1b", description="Pipeline schedule.")
    pp_microbatches: int = Field(4, gt=0, description="Pipeline micro-batches per micro-batch (divides it).")
    pp_split: list[int] | None = Field(
        None, description="First layer index of stages 1..pp-1 (e.g. [3] for 2 stages); default: balanced."
    )


class EvalConfig(Section):
    generate: bool = Field(True, description="Greedy-generate answers for validation prompts and score exact match.")
    max_prompts: int = Field(200, gt=0)
    max_new_tokens: int = Field(64, gt=0)
    batch_size: int = Field(64, gt=0)


class LoraConfig(Section):
    r: int = Field(16, gt=0, description="Adapter rank.")
    alpha: float = Field(32.0, gt=0, description="Scale: the update is (alpha / r) * B @ A.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names (q_proj), dotted paths or globs (model.layers.*.mlp.*); all-linear: "
        "every linear layer but the LM head."
    )
    exclude_modules: list[str] = Field(default_factory=list, description="Names, paths or globs to leave alone.")
    trainable_modules: list[str] = Field(
        default_factory=list, description="Modules trained in full next to the adapters (PEFT modules_to_save), "
        "e.g. [embed_tokens]."
    )
    use_rslora: bool = Field(False, description="Scale by alpha / sqrt(r) (rank-stabilised LoRA).")
    target_experts: bool = Field(
        False, description="Also adapt the MoE experts held as fused 3-D weights (transformers 5's "
        "mlp.experts.gate_up_proj / down_proj; nearly all of a Qwen3-30B-A3B): a rank-r pair per expert, saved as "
        "PEFT target_parameters. Needs dropout 0; vLLM's CPU build serves it merged (export --merge-lora)."
    )

    @model_validator(mode="after")
    def _no_dropout_on_experts(self) -> LoraConfig:
        if self.target_experts and self.dropout:
            raise ValueError(
                "lora.target_experts needs lora.dropout=0: an expert adapter is folded into the expert weights on "
                "every forward, where input dropout cannot apply (PEFT's target_parameters has the same rule); "
                "set lora.dropout=0, or lora.target_experts=false"
            )
        return self


DFLASH_KEYS = ("num_layers", "block_size", "target_layer_ids", "mask_token", "anchors_per_sequence", "gamma")
EAGLE3_KEYS = ("aux_layer_ids", "ttt_steps", "draft_vocab_size", "num_speculative_tokens")


class DraftConfig(Section):
    """A drafter for a frozen target: task: dflash (block diffusion) or task: eagle3 (EAGLE-3)."""

    target: str = Field(description="The target: hub id, Hugging Face directory or a shipyard run's final/.")
    num_layers: int = Field(2, gt=0, description="Drafter decoder layers (Qwen3-style, no embedding or LM head: "
                            "the target's are used).")
    block_size: int = Field(16, ge=2, description="Tokens per block: the last accepted token + block_size - 1 "
                            "drafted in one forward (8 suits small targets).")
    target_layer_ids: list[int] | None = Field(None, description="0-based target layers whose outputs condition "
                                               "the drafter; default: evenly spread (FACTS: 1..L-3).")
    mask_token: str | None = Field(None, description="Token standing for not-yet-drafted slots; must be in the "
                                   "target's vocabulary; default: an existing special token the data does not use.")
    anchors_per_sequence: int = Field(512, gt=0, description="Blocks trained per sequence, anchored at "
                                      "supervised positions (all of them when fewer).")
    gamma: float | None = Field(None, gt=0, description="Slot weight exp(-(k-1)/gamma); default 7 for block "
                                "size 16, 4 for 8, block_size / 2 otherwise.")

    aux_layer_ids: list[int] | None = Field(None, description="task: eagle3: the target's hidden states fused into "
                                            "the drafter (vLLM's eagle_aux_hidden_state_layer_ids: 0 = embedding "
                                            "output, i = output of layer i - 1, before the final norm); default: "
                                            "vLLM's (2, L//2, L-3) on targets of 7+ layers, else [0, L/2, L].")
    ttt_steps: int = Field(7, ge=1, le=16, description="task: eagle3: training-time-test steps unrolled (step k "
                           "consumes the drafter's own previous output, as vLLM's later draft steps do).")
    draft_vocab_size: int | None = Field(None, gt=0, description="task: eagle3: a reduced draft vocabulary of the "
                                         "data's most frequent answer tokens (exported with d2t offsets and its own "
                                         "head); default: the target's whole vocabulary.")
    num_speculative_tokens: int | None = Field(None, gt=0, description="task: eagle3: tokens drafted per step when "
                                               "served (verify); default: ttt_steps.")

    @property
    def speculative_tokens(self) -> int:
        return self.num_speculative_tokens or self.ttt_steps

    @property
    def slot_decay(self) -> float:
        return self.gamma or {16: 7.0, 8: 4.0}.get(self.block_size, self.block_size / 2)


class Recipe(Section):
    name: str = Field("run", pattern=r"^[\w.-]+$")
    task: Literal["sft", "dflash", "eagle3"] = Field("sft", description="sft: train model; dflash, eagle3: train a "
                                                     "drafter (the `draft` section) for a frozen target.")
    output_dir: str | None = Field(None, description="Default: runs/<name>.")
    seed: int = 0
    model: ModelConfig = ModelConfig()
    data: DataConfig
    train: TrainConfig = TrainConfig()
    optim: OptimConfig = OptimConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    parallel: ParallelConfig = ParallelConfig()
    lora: LoraConfig | None = Field(None, description="Train LoRA adapters instead of all weights.")
    draft: DraftConfig | None = Field(None, description="task: dflash or eagle3: the drafter and its target.")

    @model_validator(mode="after")
    def _draft_for_dflash(self) -> Recipe:
        drafter = self.task in ("dflash", "eagle3")
        if drafter != (self.draft is not None):
            raise ValueError(f"task: {self.task if drafter else 'dflash or eagle3'} needs a `draft` section (with "
                             "draft.target), and a `draft` section needs task: dflash or task: eagle3")
        if self.draft is not None:
            foreign = EAGLE3_KEYS if self.task == "dflash" else DFLASH_KEYS
            # Set to something else than its default: a written-out recipe (recipe.yaml, `config show`) holds
            # every key at its default, the other task's too, and must read back.
            wrong = [k for k in foreign if k in self.draft.model_fields_set
                     and getattr(self.draft, k) != type(self.draft).model_fields[k].default]
            if wrong:
                other = "eagle3" if self.task == "dflash" else "dflash"
                raise ValueError(f"draft.{wrong[0]} is a setting of task: {other}, not of task: {self.task}; remove it")
            if self.task == "eagle3" and self.draft.speculative_tokens > self.draft.ttt_steps:
                raise ValueError(f"draft.num_speculative_tokens ({self.draft.speculative_tokens}) exceeds "
                                 f"draft.ttt_steps ({self.draft.ttt_steps}): steps past the trained depth accept "
                                 "little; raise ttt_steps or lower num_speculative_tokens")
        if self.task == "dflash" and self.data.max_length % self.draft.block_size:
            raise ValueError(f"data.max_length ({self.data.max_length}) must be a multiple of draft.block_size "
                             f"({self.draft.block_size}): sequences train in whole blocks")
        return self

    @property
    def out_dir(self) -> Path:
        return Path(self.output_dir if self.output_dir is not None else f"runs/{self.name}")


# --------------------------------------------------------------------- loading


def shipped_recipes() -> dict[str, Path]:
    """Recipes packaged with shipyard, by name (`quickstart` → .../recipes/quickstart.yaml)."""
    root = importlib.resources.files("shipyard") / "recipes"
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def resolve_recipe_path(recipe: str | None) -> Path:
    if recipe is None:
        recipe = "quickstart"
    path = Path(recipe)
    if path.is_file():
        return path
    shipped = shipped_recipes()
    if recipe in shipped:
        return shipped[recipe]
    raise ShipyardError(
        f"recipe '{recipe}' is neither a file nor a shipped recipe{did_you_mean(recipe, shipped)}; "
        f"shipped recipes: {', '.join(sorted(shipped))}"
    )


def parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ShipyardError(f"override '{text}' is not of the form key.path=value (e.g. optim.lr=3e-4)")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as e:
        raise ShipyardError(f"override '{text}': the value is not valid YAML ({e.problem})") from None
    return key.split("."), value


def apply_override(data: dict, keys: list[str], value: Any) -> None:
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[keys[-1]] = value


def load_recipe(recipe: str | None = None, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe. Raises ShipyardError naming the bad key."""
    path = resolve_recipe_path(recipe)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ShipyardError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ShipyardError(f"{path}: a recipe is a YAML mapping of sections (model:, data:, train:, ...)")
    data.setdefault("name", path.stem)
    parsed = [parse_override(text) for text in overrides]
    for keys, value in parsed:
        apply_override(data, keys, value)
    _forget_validation_of_replaced_train(data, [keys for keys, _ in parsed])
    return validate_recipe(data, source=str(path))


def _forget_validation_of_replaced_train(data: dict, overridden: list[list[str]]) -> None:
    """`data.train=mine.jsonl` alone must not keep the recipe's validation set: it belongs to other data."""
    touched = {tuple(k[:2]) for k in overridden if k[:1] == ["data"]}
    section = data.get("data")
    if ("data", "train") in touched and ("data", "validation") not in touched and isinstance(section, dict) \
            and section.get("validation"):
        section.pop("validation")
        log.info("data.train was replaced on the command line: the recipe's data.validation (other data) is not "
                 "used; set data.validation=FILE or data.validation_fraction=0.05 to validate on the new data")


def validate_recipe(data: dict, source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise ShipyardError(format_validation_error(e, source)) from None


def _fields_at(model: type[BaseModel], loc: tuple) -> dict | None:
    """The field mapping of the section that `loc` points into, or None."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        inner = getattr(annotation, "__args__", None)
        candidates = [annotation, *(inner or ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return None
    return model.model_fields


def format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid recipe"]
    for item in error.errors():
        loc = tuple(item["loc"])
        dotted = ".".join(str(p) for p in loc)
        if item["type"] == "extra_forbidden":
            fields = _fields_at(Recipe, loc[:-1]) or {}
            hint = did_you_mean(str(loc[-1]), fields)
            valid = ", ".join(fields)
            lines.append(f"  unknown key '{dotted}'{hint}; valid keys here: {valid}")
        elif item["type"] == "missing":
            lines.append(f"  missing required key '{dotted}'")
        else:
            if dotted:
                lines.append(f"  '{dotted}': {item['msg']} (got {item.get('input')!r})")
            else:  # a check across sections: the message names the keys
                lines.append(f"  {item['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML: every key, defaults included."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
