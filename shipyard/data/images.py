"""Images in chat records: where they are, reading them, and turning a rendered prompt into model inputs.

A record names an image as a part of a message's content:

    {"type": "image", "image": "shapes/0001.png"}                       path (relative: to the JSONL's folder)
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}   or a data: URI / file path

Both are normalised to `{"type": "image", "image": REF}` with REF an absolute path or a data URI (what
the processor's chat template sees as an image part, as vLLM hands it one). The chat template writes one
placeholder per image; the model's own processor expands each placeholder into as many tokens as the
image gets (Qwen-VL: one per 32x32 pixels after resizing into its pixel limits), which makes training
ids token-for-token those vLLM builds for the same dialog. Pixels are computed again when a batch is
built (`ImageEncoder.media_inputs`), so memory holds references, not tensors.

The processor's pixel limits (data.min_pixels / data.max_pixels) are set on it before tokenizing and saved with
every checkpoint and export, so vLLM expands each image into as many tokens as training did.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from shipyard.data.audio import AudioEncoder, ProcessorAudioEncoder
from shipyard.data.messages import RecordError
from shipyard.errors import ShipyardError

def describe(ref: str) -> str:
    return ref if not ref.startswith("data:") else f"{ref[:30]}... ({len(ref)} characters)"


def open_image(ref: str, max_pixels: int | None = None) -> Image.Image:
    """The image as RGB; RecordError naming it when it is missing, unreadable or above `max_pixels`.

    The size is checked from the header, before the pixels are decoded."""
    if ref.startswith("data:"):
        header, _, payload = ref.partition(",")
        if ";base64" not in header:
            raise RecordError(f"image {describe(ref)}: only base64 data: URIs are supported", reason="bad_image")
        try:
            source = io.BytesIO(base64.b64decode(payload, validate=True))
        except (binascii.Error, ValueError) as e:
            raise RecordError(f"image {describe(ref)}: not valid base64 ({e})", reason="bad_image") from None
    elif not Path(ref).is_file():
        raise RecordError(f"image {ref} does not exist", reason="missing_image")
    else:
        source = ref
    try:
        with Image.open(source) as image:
            if max_pixels and image.width * image.height > max_pixels:
                raise RecordError(
                    f"image {describe(ref)} is {image.width}x{image.height} pixels, above the {max_pixels:,} accepted "
                    "(data.max_image_pixels); resize it before training, or raise the limit",
                    reason="image_too_large",
                )
            image.load()
            return image.convert("RGB")
    except Image.DecompressionBombError as e:  # PIL's own limit, far above any sensible training image
        raise RecordError(f"image {describe(ref)} is refused by PIL as a decompression bomb ({e})",
                          reason="image_too_large") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        if isinstance(e, RecordError):
            raise
        raise RecordError(f"image {describe(ref)} cannot be read ({type(e).__name__}: {e})", reason="bad_image") from None


def media_of(messages: list[dict]) -> list[str]:
    """The image and audio references of `messages` in rendering order (a model takes one kind or the other)."""
    return [part.get("image") or part["audio"] for m in messages if isinstance(m["content"], list)
            for part in m["content"] if part.get("type") in ("image", "audio")]


class ImageEncoder:
    """A vision-language model's processor, as the data pipeline uses it.

    `encode` turns rendered text with its images into ids with the placeholders expanded by the
    processor itself; `media_inputs` builds the pixel tensors of a batch's images (in id order).
    """

    kind = "image"

    def __init__(self, processor, max_image_pixels: int | None = None):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token = processor.image_token
        self.image_token_id = self.placeholder_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self.max_image_pixels = max_image_pixels  # larger images are refused (a resize would destroy them)
        names = getattr(processor, "model_input_names", [])
        # Token-type ids mark image positions (Qwen3-VL: M-RoPE; Gemma 3: bidirectional image attention).
        self.type_keys = [k for k in ("mm_token_type_ids", "token_type_ids") if k in names]

    def load(self, ref: str) -> Image.Image:
        return open_image(ref, self.max_image_pixels)

    def configure(self, config, parallel) -> None:
        """Settings a modality takes from the model and the run (images: none)."""

    def blank_inputs(self) -> dict[str, torch.Tensor]:
        """Pixel inputs of one small blank image: micro-batches without images run the vision tower on it, so FSDP2
        ranks gather the same units whatever their data (models/vision.py's `vision_on_blank_image`)."""
        side = 64
        if limits := pixel_limits(self.processor):
            side = max(side, int(limits[0] ** 0.5) + 1)
        return dict(self.processor.image_processor(images=[Image.new("RGB", (side, side), (255, 255, 255))],
                                                   return_tensors="pt"))

    def describe(self, count: int) -> str:
        """The start-up line about this modality's data."""
        limits = pixel_limits(self.processor)
        return (f"images: {type(self.processor).__name__}, {count} in training samples"
                + (f"; {limits[0]:,}..{limits[1]:,} pixels per image (data.min_pixels/max_pixels, exported)"
                   if limits else ""))

    def encode(self, text: str, images: list[str]) -> list[int]:
        placeholders = text.count(self.image_token)
        if placeholders != len(images):
            raise RecordError(
                f"the chat template rendered {placeholders} image placeholder(s) ({self.image_token}) for "
                f"{len(images)} image(s); each image part must be rendered once, and texts must not contain "
                f"{self.image_token} themselves",
                reason="image_placeholder_mismatch",
            )
        if not images:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        out = self.processor(text=[text], images=[self.load(r) for r in images], add_special_tokens=False)
        return list(out["input_ids"][0])

    def media_inputs(self, images: list[str]) -> dict[str, torch.Tensor]:
        if not images:
            return {}
        out = self.processor.image_processor(images=[self.load(r) for r in images], return_tensors="pt")
        return dict(out)

    def type_ids(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: (input_ids == self.image_token_id).long() for k in self.type_keys}


def pixel_limits(processor) -> tuple[int, int] | None:
    """(min, max) pixels of a Qwen-VL-style image processor (its size is shortest_edge/longest_edge in pixels)."""
    image_processor = getattr(processor, "image_processor", None)
    size = getattr(image_processor, "size", None)
    if size is None or not getattr(image_processor, "merge_size", None):
        return None
    low, high = size.get("shortest_edge"), size.get("longest_edge")
    return (low, high) if low and high else None


def apply_pixel_limits(processor, min_pixels: int | None, max_pixels: int | None) -> None:
    """Set data.min_pixels / data.max_pixels on the processor (saved with every checkpoint and export)."""
    if min_pixels is None and max_pixels is None:
        return
    current = pixel_limits(processor)
    if current is None:
        ip = processor.image_processor
        raise ShipyardError(
            f"data.min_pixels/max_pixels: {type(ip).__name__} does not resize by a pixel budget (its size is "
            f"{dict(ip.size) if hasattr(ip.size, 'keys') else ip.size}); leave them unset"
        )
    lo, hi = min_pixels or current[0], max_pixels or current[1]
    if lo > hi:
        raise ShipyardError(f"data.min_pixels ({lo}) is above data.max_pixels ({hi})")
    ip = processor.image_processor
    ip.size = dataclasses.replace(ip.size, shortest_edge=lo, longest_edge=hi) if dataclasses.is_dataclass(ip.size) \
        else {**ip.size, "shortest_edge": lo, "longest_edge": hi}


def encoder_for(processor) -> ImageEncoder | AudioEncoder | ProcessorAudioEncoder | None:
    """The media encoder of a processor as saved (a directory's own pixel limits and audio settings): an
    AudioEncoder for a speech-LM's, an ImageEncoder for a vision-language model's, None for text models."""
    if processor is None:
        return None
    if hasattr(processor, "audio_token_count"):
        return AudioEncoder(processor)
    return ProcessorAudioEncoder(processor) if takes_audio(processor) else ImageEncoder(processor)


def takes_audio(processor) -> bool:
    """A transformers speech-LM's processor (Qwen2-Audio's): an audio placeholder token and a feature extractor."""
    return getattr(processor, "audio_token", None) is not None and getattr(processor, "feature_extractor", None) \
        is not None and getattr(processor, "image_processor", None) is None


def media_encoder(processor, cfg) -> ImageEncoder | AudioEncoder | ProcessorAudioEncoder | None:
    """The data pipeline's view of a multimodal model's processor (None for text models): an AudioEncoder for a
    speech-LM; else an ImageEncoder with the recipe's pixel limits (`cfg`: the recipe's data section) set on it."""
    if processor is None:
        return None
    if hasattr(processor, "audio_token_count"):
        return AudioEncoder(processor, cfg.max_audio_seconds)
    if takes_audio(processor):
        return ProcessorAudioEncoder(processor, cfg.max_audio_seconds)
    apply_pixel_limits(processor, cfg.min_pixels, cfg.max_pixels)
    limit = cfg.max_image_pixels
    if limit is None and (limits := pixel_limits(processor)):
        limit = 16 * limits[1]
    return ImageEncoder(processor, limit)
