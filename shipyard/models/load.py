"""Load a Hugging Face causal LM and its tokenizer from a hub id, a local directory or a preset.

`model.path` is resolved in this order: an existing local directory, a preset
name, a hub id. Hub loading is the real `from_pretrained` (offline machines
need the model in the local cache); `trust_remote_code` stays off unless the
recipe turns it on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForMultimodalLM, AutoProcessor, AutoTokenizer, GenerationConfig,
    PreTrainedModel, PreTrainedTokenizerBase,
)

from shipyard.config import ModelConfig
from shipyard.data.chat import apply_template_defaults
from shipyard.models.attention import choose_attention
from shipyard.models.audio_lm import is_audio_language
from shipyard.errors import ShipyardError, did_you_mean
from shipyard.models.presets import PRESETS, preset_config
from shipyard.models.speech_presets import SPEECH_PRESETS
from shipyard.models.speechlm import is_speech_lm
from shipyard.models.vision import is_vision_language
from shipyard.models.vision_presets import VISION_PRESETS

MULTIMODAL_PRESETS = {**VISION_PRESETS, **SPEECH_PRESETS}  # name -> () -> (config, processor)

log = logging.getLogger(__name__)

SHIPPED_TOKENIZER = Path(__file__).resolve().parent.parent / "assets" / "tokenizer"


@dataclass
class ModelSource:
    """Where the weights came from; export reuses the base's sharding and custom code."""

    kind: str  # "preset" | "local" | "hub"
    name: str  # as written in the recipe; becomes base_model_name_or_path
    local_dir: Path | None  # directory holding the base's files, when there is one


def auto_model_class(config):
    """The transformers Auto class a config loads with: image-text-to-text for vision-language models, the
    multimodal-LM class for transformers' speech-LMs (Qwen2-Audio, Voxtral, Granite Speech)."""
    if is_vision_language(config):
        return AutoModelForImageTextToText
    return AutoModelForMultimodalLM if is_audio_language(config) else AutoModelForCausalLM


def is_multimodal(config) -> bool:
    """Does the model take images or audio (and so has a processor)?"""
    return is_vision_language(config) or is_speech_lm(config) or is_audio_language(config)


def resolve_source(path: str) -> ModelSource:
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ShipyardError(f"model.path '{path}' is a directory without config.json: not a Hugging Face model directory")
        return ModelSource("local", path, local.resolve())
    if path in PRESETS or path in MULTIMODAL_PRESETS:
        return ModelSource("preset", path, None)
    looks_local = path.startswith((".", "/", "~")) or local.suffix in {".json", ".safetensors", ".bin"}
    # A bare name close to a preset is a typo, not a hub id: say so now rather than after network retries.
    typo = "/" not in path and did_you_mean(path, PRESETS)
    if looks_local or path.count("/") > 1 or typo:
        raise ShipyardError(
            f"model.path '{path}' does not exist. Give a local Hugging Face directory, a hub id "
            f"(org/name), or a preset: {', '.join(PRESETS)}{did_you_mean(path, PRESETS)}"
        )
    return ModelSource("hub", path, hub_snapshot(path))


def hub_snapshot(repo_id: str) -> Path | None:
    """The local snapshot folder of a hub model when the Hugging Face cache holds one (no download), else None.

    Every "follow the base" rule (dtype, shard layout, custom code, MTP head, generation config) reads the
    base's files; a hub id names the same files as the folder it resolves to."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (yet), or not a model repo: from_pretrained says why, later
        return None
    return folder if (folder / "config.json").is_file() else None


def _hub_error(path: str, error: Exception) -> ShipyardError:
    return ShipyardError(
        f"could not load '{path}' from the Hugging Face hub or its local cache ({type(error).__name__}: "
        f"{str(error).splitlines()[0] if str(error) else ''}). Check the id, download it first "
        f"(`hf download {path}`) on machines without internet, or point model.path at a local directory. "
        f"Presets: {', '.join(PRESETS)}{did_you_mean(path, PRESETS)}"
    )


def source_config(cfg: ModelConfig, source: ModelSource):
    if source.kind == "preset":
        return MULTIMODAL_PRESETS[source.name]()[0] if source.name in MULTIMODAL_PRESETS else preset_config(source.name)
    try:
        return AutoConfig.from_pretrained(str(source.local_dir or source.name), trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        raise _hub_error(source.name, e) from None


def load_processor(cfg: ModelConfig, source: ModelSource, tokenizer: PreTrainedTokenizerBase | None = None):
    """A vision-language or speech model's processor (None for text models), wired to `tokenizer` and its template."""
    if cfg.speech is not None and tokenizer is not None:  # a speech-LM composed here: its processor is new too
        return speech_processor(cfg, tokenizer)
    if source.kind == "preset":
        if source.name not in MULTIMODAL_PRESETS:
            return None
        processor = MULTIMODAL_PRESETS[source.name]()[1]
    else:
        config = source_config(cfg, source)
        if not is_multimodal(config):
            return None
        path = str(source.local_dir or source.name)
        try:
            processor = AutoProcessor.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError, ImportError) as e:
            raise ShipyardError(f"'{source.name}' is a multimodal model, but its processor does not load "
                                f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if tokenizer is not None:
        processor.tokenizer = tokenizer
        processor.chat_template = tokenizer.chat_template
    return processor


def load_tokenizer(cfg: ModelConfig, source: ModelSource, template_defaults: dict | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer training renders with; `template_defaults` (data.chat_template_kwargs) become its template's defaults.

    A vision-language model renders with its processor's chat template (it knows image parts)."""
    processor = load_processor(cfg, source)
    if processor is not None and cfg.tokenizer is None:
        tokenizer = processor.tokenizer
    else:
        name = cfg.tokenizer or (str(SHIPPED_TOKENIZER) if source.kind == "preset" else source.name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as e:
            raise _hub_error(name, e) from None
    if processor is not None and processor.chat_template and cfg.tokenizer is None:
        tokenizer.chat_template = processor.chat_template
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and loss, so any id works; EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    apply_template_defaults(tokenizer, template_defaults or {})
    return tokenizer


def base_eos(cfg: ModelConfig, source: ModelSource) -> list[int] | int | None:
    """The EOS ids the model's generation config lists, without loading its weights (`shipyard data preview`)."""
    if source.kind == "preset":
        return source_config(cfg, source).get_text_config().eos_token_id
    path = str(source.local_dir or source.name)
    try:
        return GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:  # no generation_config.json: transformers derives one from config.json
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError):
            return None
        return GenerationConfig.from_model_config(config).eos_token_id


def load_model(cfg: ModelConfig, source: ModelSource, seed: int) -> PreTrainedModel:
    """The model in fp32 on CPU; parallel/ moves, shards and casts it."""
    if source.kind == "preset":
        config = source_config(cfg, source)
        auto = auto_model_class(config)
        torch.manual_seed(seed)  # presets start from random weights: make them reproducible
        model = auto.from_config(config, dtype=torch.float32,
                                 attn_implementation=choose_attention(config, cfg.attn_implementation))
        if is_speech_lm(config):
            model.reset_audio_convolutions()  # an encoder trained from scratch (see the method)
        model.name_or_path = source.name
        return model
    try:
        path = str(source.local_dir or source.name)
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        auto = auto_model_class(config)
        model = auto.from_pretrained(
            path,
            dtype=torch.float32,
            trust_remote_code=cfg.trust_remote_code,
            attn_implementation=choose_attention(config, cfg.attn_implementation),
        )
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ShipyardError(
                f"'{source.name}' ships its own modelling code; set model.trust_remote_code=true "
                "if you trust it (it runs that Python code)"
            ) from None
        raise ShipyardError(f"'{source.name}' cannot be loaded as a causal LM: {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise _hub_error(source.name, e) from None
    return model


def build_empty(cfg: ModelConfig, source: ModelSource) -> PreTrainedModel:
    """The model of a folder source with its parameters on the meta device (no memory, no values): the training
    loop shards or splits it first and then each rank reads only the tensors it keeps (checkpoint/base_weights.py).
    Buffers (rotary frequencies and the like) are real: they are computed, not read."""
    from accelerate import init_empty_weights  # peft's dependency: parameters on meta, buffers real

    path = str(source.local_dir)
    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    auto = auto_model_class(config)
    with init_empty_weights(include_buffers=False):
        model = auto.from_config(config, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code,
                                 attn_implementation=choose_attention(config, cfg.attn_implementation))
    model.tie_weights()  # the context makes a new meta Parameter per registration, untying what the config ties
    if (source.local_dir / "generation_config.json").is_file():  # from_pretrained would read it too
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.name_or_path = path
    return model


def has_weight_files(source: ModelSource) -> bool:
    return source.local_dir is not None and any(source.local_dir.glob("*.safetensors"))


def register_audio_token(tokenizer: PreTrainedTokenizerBase, config) -> None:
    """A speech-LM's tokenizer holds its placeholder as a special token (added when a tokenizer given with
    model.tokenizer lacks it), and the config names that token's id: one source of truth for every loader."""
    from tokenizers import AddedToken

    token = config.audio_token
    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
    config.audio_token_id = tokenizer.convert_tokens_to_ids(token)


def compose_speech_lm(cfg: ModelConfig, llm: PreTrainedModel, seed: int) -> PreTrainedModel:
    """The speech-LM of a loaded causal LM and the pretrained encoder `model.speech.encoder`, with a new
    projector (seeded). The LLM keeps its weights; the encoder's are loaded from its checkpoint."""
    from transformers import AutoModel

    from shipyard.models.speechlm.configuration import SpeechLMConfig
    from shipyard.models.speechlm.modeling import ShipyardSpeechLMForConditionalGeneration

    speech = cfg.speech
    source = resolve_source(speech.encoder)
    if source.kind == "preset":
        raise ShipyardError(f"model.speech.encoder '{speech.encoder}' is a preset name; give a parakeet checkpoint")
    try:
        loaded = AutoModel.from_pretrained(str(source.local_dir or source.name), dtype=torch.float32)
    except OSError as e:
        raise _hub_error(speech.encoder, e) from None
    encoder = getattr(loaded, "encoder", loaded)  # ParakeetForCTC / TDT hold the FastConformer as .encoder
    if encoder.config.model_type != "parakeet_encoder":
        raise ShipyardError(f"model.speech.encoder '{speech.encoder}' is a {loaded.config.model_type} model; "
                            "shipyard's speech-LM takes a FastConformer (transformers' parakeet) encoder")
    config = SpeechLMConfig(audio_config=encoder.config.to_dict(), text_config=llm.config.to_dict(),
                            projector_stack=speech.projector_stack, ctc_loss_weight=speech.ctc_loss_weight)
    torch.manual_seed(seed)  # the projector (and CTC head) start from seeded random weights
    with torch.device("meta"):
        model = ShipyardSpeechLMForConditionalGeneration(config)
    model.audio_encoder, model.language_model = encoder, llm
    for module in [model.projector, getattr(model, "ctc_head", None)]:
        if module is not None:
            module.to_empty(device="cpu")
            for layer in module.modules():
                if isinstance(layer, torch.nn.Linear):
                    layer.reset_parameters()
    model.config.architectures = [type(model).__name__]
    model.name_or_path = cfg.path
    return model


def speech_processor(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase):
    """The processor of a speech-LM composed from `model.speech.encoder`: features for its mel bins, token counts
    for its subsampling and the projector's stacking."""
    from shipyard.models.speechlm.processing import ShipyardSpeechFeatureExtractor, ShipyardSpeechLMProcessor

    source = resolve_source(cfg.speech.encoder)
    try:
        config = AutoConfig.from_pretrained(str(source.local_dir or source.name))
    except OSError as e:
        raise _hub_error(cfg.speech.encoder, e) from None
    encoder = getattr(config, "encoder_config", config)
    return ShipyardSpeechLMProcessor(
        feature_extractor=ShipyardSpeechFeatureExtractor(feature_size=encoder.num_mel_bins), tokenizer=tokenizer,
        chat_template=tokenizer.chat_template, subsampling_factor=encoder.subsampling_factor,
        subsampling_kernel=encoder.subsampling_conv_kernel_size, subsampling_stride=encoder.subsampling_conv_stride,
        projector_stack=cfg.speech.projector_stack)


def load(cfg: ModelConfig, seed: int, template_defaults: dict | None = None, empty: bool = False
         ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelSource]:
    """The model, its tokenizer and where they came from. `empty`: a folder (or cached hub) base of safetensors is
    built on the meta device, for the caller to fill per rank; any other base, or one whose embeddings must grow
    for the tokenizer (new rows are initialised from the loaded ones), is loaded whole."""
    source = resolve_source(cfg.path)
    tokenizer = load_tokenizer(cfg, source, template_defaults)
    model = None
    if empty and cfg.speech is None and has_weight_files(source):
        model = build_empty(cfg, source)
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model = None
    model = model if model is not None else load_model(cfg, source, seed)
    if source.kind == "hub" and source.local_dir is None:  # downloaded just now: its files are in the cache
        source = ModelSource("hub", source.name, hub_snapshot(source.name))
    if cfg.speech is not None:
        if is_speech_lm(model.config):
            raise ShipyardError(f"model.speech: '{cfg.path}' is already a speech-LM; drop the model.speech section")
        model = compose_speech_lm(cfg, model, seed)
        source = ModelSource(source.kind, source.name, None)  # the base's weight files do not hold this model
    if is_speech_lm(model.config):
        register_audio_token(tokenizer, model.config)
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        # Added special tokens must own embedding rows, or they index past the table at train and serve time.
        new_rows = -(-len(tokenizer) // 64) * 64
        log.warning("tokenizer has %d tokens but the model %d embedding rows: resizing to %d", len(tokenizer), rows, new_rows)
        model.resize_token_embeddings(new_rows)
    return model, tokenizer, source
