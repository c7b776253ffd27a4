"""Vision-language data: image tokens are counted as serving counts them, never supervised, and bad images
are named by file:line or counted once per reason.

Expected image-token counts are computed by hand with Qwen's smart_resize (factor 32 = patch 16 x merge 2):
each side is rounded to a multiple of 32; if the area is above max_pixels both sides are scaled by
beta = sqrt(h*w/max) and floored to multiples of 32, if below min_pixels scaled by sqrt(min/(h*w)) and
ceiled; the image then gives (h/32)*(w/32) tokens.
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from shipyard.config import DataSource, load_recipe
from shipyard.data.chat import IGNORE_INDEX, eos_token_ids, render_text, tokenize_record
from shipyard.data.dataset import build_datasets
from shipyard.data.images import ImageEncoder, apply_pixel_limits, pixel_limits
from shipyard.data.messages import RecordError, normalise_record
from shipyard.data.sources import SkipCounter, read_sources
from shipyard.errors import ShipyardError
from shipyard.models.vision_presets import idefics3, qwen3_vl
from tests.test_chat import supervised_spans

IMAGE_PAD = "<|image_pad|>"


# ------------------------------------------------------------------ helpers


def png(path: Path, width: int, height: int, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), colour).save(path, format="PNG")
    return path


def data_uri(width: int, height: int, colour=(30, 30, 200)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def write_jsonl(path: Path, lines: list[dict | None]) -> Path:
    """One record per line; None writes a blank line (still counted in line numbers)."""
    path.write_text("".join(("" if r is None else json.dumps(r)) + "\n" for r in lines))
    return path


def user(*parts) -> dict:
    return {"role": "user", "content": [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]}


def image(ref: str) -> dict:
    return {"type": "image", "image": ref}


def image_url(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def answer(text: str) -> dict:
    return {"role": "assistant", "content": text}




def image_positions(sample, token_id: int) -> list[int]:
    return [i for i, t in enumerate(sample.input_ids) if t == token_id]


@pytest.fixture(scope="module")
def qwen():
    """(processor, encoder) of the qwen3-vl-tiny preset with its default limits (4096..65536 pixels); not mutated."""
    processor = qwen3_vl()[1]
    return processor, ImageEncoder(processor)


# ------------------------------------------------------------------ 1. masks of multimodal dialogs


def test_qwen3_vl_masks_image_tokens_and_supervises_only_answers(tmp_path, qwen):
    processor, encoder = qwen
    tok = processor.tokenizer
    assert pixel_limits(processor) == (4096, 65536)
    imgs = tmp_path / "imgs"
    red = png(imgs / "red.png", 64, 64)                 # 64x64 -> 2x2 = 4 tokens
    green = png(imgs / "green.png", 64, 64, (30, 200, 30))  # 4 tokens
    wide = png(imgs / "wide.png", 128, 96)              # w=128 h=96 -> 3x4 = 12 tokens (12288 px, in limits)
    uri = data_uri(96, 64)                              # w=96 h=64 -> 2x3 = 6 tokens
    records = [
        {"messages": [user(image("imgs/red.png"), "What is this?"), answer("red circle")]},
        {"messages": [user(image("imgs/green.png"), image_url(uri), "Compare."), answer("two squares")]},
        {"messages": [{"role": "system", "content": "Be brief."},
                      user(image_url("imgs/wide.png"), "Describe."), answer("a blue square"),
                      user(image("./imgs/red.png"), "And this?"), answer("a green triangle")]},
        {"messages": [{"role": "user", "content": "hello there"}, answer("hi")]},
    ]
    # Read from another working directory's point of view: relative refs resolve against the JSONL's folder.
    path = write_jsonl(tmp_path / "dialogs.jsonl", records)
    read = read_sources([DataSource(path=str(path))], "raise", SkipCounter())
    assert [r.origin for r in read] == [f"{path}:{i}" for i in (1, 2, 3, 4)]

    expected = [
        # (supervised spans, image refs in order, image tokens)
        (["red circle<|im_end|>"], (str(red),), 4),
        (["two squares<|im_end|>"], (str(green), uri), 4 + 6),
        (["a blue square<|im_end|>", "a green triangle<|im_end|>"], (str(wide), str(red)), 12 + 4),
        (["hi<|im_end|>"], (), 0),
    ]
    user_texts = ["What is this?", "Compare.", "Describe.", "And this?", "hello there", "Be brief."]
    for record, (spans, refs, n_image_tokens) in zip(read, expected):
        out = tokenize_record(tok, record, "as_served", eos_token_ids(tok), encoder)
        assert len(out.samples) == 1, record.origin  # history renders as served: both turns share one sample
        assert out.turns["supervised"] == len(spans)
        sample = out.samples[0]
        positions = image_positions(sample, encoder.image_token_id)
        assert len(positions) == n_image_tokens, record.origin
        assert all(sample.labels[i] == IGNORE_INDEX for i in positions)
        assert supervised_spans(tok, sample) == spans
        assert sample.num_targets == sum(len(tok(s, add_special_tokens=False)["input_ids"]) for s in spans)
        assert sample.media == refs
        supervised_text = tok.decode([t for t, l in zip(sample.input_ids, sample.labels) if l != IGNORE_INDEX])
        assert not any(text in supervised_text for text in user_texts)
        assert len(sample.input_ids) == len(sample.labels)

    # The whole id sequence of the first dialog, token for token: each placeholder expanded to 4 pads.
    first = tokenize_record(tok, read[0], "as_served", eos_token_ids(tok), encoder).samples[0]
    assert tok.decode(first.input_ids) == (
        "<|im_start|>user\n<|vision_start|>" + IMAGE_PAD * 4 + "<|vision_end|>What is this?<|im_end|>\n"
        "<|im_start|>assistant\nred circle<|im_end|>"
    )
    # The data: URI image's 6 tokens follow the 4 of the first image, in order, each block contiguous.
    second = tokenize_record(tok, read[1], "as_served", eos_token_ids(tok), encoder).samples[0]
    pos = image_positions(second, encoder.image_token_id)
    assert pos[3] + 1 < pos[4]  # a <|vision_end|><|vision_start|> pair separates the two images
    assert pos[:4] == list(range(pos[0], pos[0] + 4)) and pos[4:] == list(range(pos[4], pos[4] + 6))


def test_image_root_overrides_the_jsonl_folder(tmp_path):
    elsewhere = tmp_path / "images"
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [user(image("a.png"), image_url("sub/b.png"), "q"),
                                                            answer("x")]}])
    default = read_sources([DataSource(path=str(path))], "raise", SkipCounter())[0]
    rooted = read_sources([DataSource(path=str(path))], "raise", SkipCounter(), str(elsewhere))[0]
    assert [p["image"] for p in default.messages[0]["content"][:2]] == [str(tmp_path / "a.png"),
                                                                         str(tmp_path / "sub" / "b.png")]
    assert [p["image"] for p in rooted.messages[0]["content"][:2]] == [str(elsewhere / "a.png"),
                                                                        str(elsewhere / "sub" / "b.png")]


# ------------------------------------------------------------------ 2. training = exported processor


# (width, height) -> tokens under min 4096 / max 16384 pixels:
#   20x20:   rounds to 32x32 = 1024 < 4096; beta = sqrt(4096/400) = 3.2 -> ceil(64/32)*32 = 64x64 -> 2x2 = 4
#   100x80:  h=round(2.5)*32=64, w=round(3.125)*32=96; 6144 px within limits -> 2x3 = 6
#   400x300: 288x384 > 16384; beta = sqrt(120000/16384) = 2.706 -> h=floor(3.46)*32=96, w=floor(4.62)*32=128 -> 3x4 = 12
LIMIT_CASES = [((20, 20), 4), ((100, 80), 6), ((400, 300), 12)]


def test_image_tokens_equal_between_training_and_exported_processor(tmp_path):
    from transformers import AutoProcessor

    from shipyard.models.save import write_processor

    processor = qwen3_vl()[1]
    tok = processor.tokenizer
    apply_pixel_limits(processor, 4096, 16384)
    assert pixel_limits(processor) == (4096, 16384)
    encoder = ImageEncoder(processor)
    out = tmp_path / "export"
    out.mkdir()
    tok.save_pretrained(out)
    write_processor(out, processor, tok)

    saved = json.loads((out / "processor_config.json").read_text())
    assert saved["image_processor"]["size"] == {"shortest_edge": 4096, "longest_edge": 16384}
    assert saved["chat_template"] == tok.chat_template
    exported = AutoProcessor.from_pretrained(out)
    assert type(exported).__name__ == "Qwen3VLProcessor"
    assert pixel_limits(exported) == (4096, 16384)
    image_id = exported.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    assert image_id == encoder.image_token_id

    for (w, h), tokens in LIMIT_CASES:
        path = png(tmp_path / f"{w}x{h}.png", w, h)
        messages = normalise_record({"messages": [user(image(str(path)), "What is it?"), answer("x")]},
                                    "t").messages[:1]
        prompt = render_text(tok, messages, add_generation_prompt=True)
        assert prompt.count(IMAGE_PAD) == 1
        train_ids = encoder.encode(prompt, [str(path)])
        served = exported(text=[prompt], images=[Image.open(path).convert("RGB")], add_special_tokens=False)
        served_ids = list(served["input_ids"][0])
        assert train_ids.count(encoder.image_token_id) == served_ids.count(image_id) == tokens, (w, h)
        assert train_ids == served_ids, (w, h)
        # the exported template renders the same prompt
        assert exported.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == prompt


def test_default_limits_give_more_tokens_for_the_large_image(tmp_path, qwen):
    # Counter-check that the limits matter: with the preset's 65536 max, 400x300 -> 288x384 > 65536;
    # beta = sqrt(120000/65536) = 1.353 -> h=floor(6.93)*32=192, w=floor(9.24)*32=288 -> 6x9 = 54 tokens.
    _, encoder = qwen
    path = png(tmp_path / "big.png", 400, 300)
    ids = encoder.encode("<|vision_start|>" + IMAGE_PAD + "<|vision_end|>", [str(path)])
    assert ids.count(encoder.image_token_id) == 54


# ------------------------------------------------------------------ 3. idefics3


def test_idefics3_sixteen_image_tokens_and_answer_supervised(tmp_path):
    processor = idefics3()[1]
    tok = processor.tokenizer
    encoder = ImageEncoder(processor)
    assert encoder.image_token == "<image>"
    png(tmp_path / "pic.png", 100, 80)
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [user(image("pic.png"), "What is it?"),
                                                            answer("red circle")]}])
    record = read_sources([DataSource(path=str(path))], "raise", SkipCounter())[0]
    stops = eos_token_ids(tok)
    assert tok.convert_ids_to_tokens(stops) == ["<end_of_utterance>"]
    out = tokenize_record(tok, record, "as_served", stops, encoder)
    assert len(out.samples) == 1
    sample = out.samples[0]
    positions = image_positions(sample, encoder.image_token_id)
    assert len(positions) == 16
    assert positions == list(range(positions[0], positions[0] + 16))
    assert all(sample.labels[i] == IGNORE_INDEX for i in positions)
    assert supervised_spans(tok, sample) == [" red circle<end_of_utterance>"]
    assert sample.media == (str(tmp_path / "pic.png"),)
    assert tok.decode(sample.input_ids) == (
        "User:<fake_token_around_image><global-img>" + "<image>" * 16 + "<fake_token_around_image> What is it?"
        "<end_of_utterance>\nAssistant: red circle<end_of_utterance>"
    )


# ------------------------------------------------------------------ 4. bad images through build_datasets


def good(i: int) -> dict:
    return {"messages": [user(image("imgs/ok.png"), f"Question {i}?"), answer(f"answer {i}")]}


BAD = {
    # reason: (record, phrase in the error)
    "missing_image": ({"messages": [user(image("imgs/nope.png"), "q"), answer("a")]}, "does not exist"),
    "bad_image": ({"messages": [user(image("imgs/corrupt.png"), "q"), answer("a")]}, "cannot be read"),
    "image_placeholder_mismatch": ({"messages": [user(image("imgs/ok.png"), f"see {IMAGE_PAD} here"), answer("a")]},
                                   "rendered 2 image placeholder(s) (<|image_pad|>) for 1 image(s)"),
    # 600x600 = 360,000 pixels: above 16 x data.max_pixels (16 x 16384 = 262,144), below 16 x the preset's 65536
    "image_too_large": ({"messages": [user(image("imgs/huge.png"), "q"), answer("a")]},
                        "600x600 pixels, above the 262,144 accepted"),
}


def vlm_setup(tmp_path: Path, lines: list[dict | None], on_error: str):
    from shipyard.data.images import media_encoder

    imgs = tmp_path / "imgs"
    png(imgs / "ok.png", 64, 64)
    png(imgs / "huge.png", 600, 600)
    (imgs / "corrupt.png").write_bytes(b"this is not a PNG, only text\n" * 4)
    path = write_jsonl(tmp_path / "train.jsonl", lines)
    recipe = load_recipe("quickstart_vlm", [f"data.train={path}", "data.validation=[]", "data.max_pixels=16384",
                                            f"data.on_error={on_error}", "data.max_length=512",
                                            f"output_dir={tmp_path / 'run'}"])
    processor = qwen3_vl()[1]
    encoder = media_encoder(processor, recipe.data)
    assert encoder.max_image_pixels == 262144 and pixel_limits(processor) == (4096, 16384)
    return path, recipe, processor.tokenizer, encoder


@pytest.mark.parametrize("reason", list(BAD))
def test_bad_image_raises_with_file_and_line(tmp_path, reason):
    record, phrase = BAD[reason]
    path, recipe, tok, encoder = vlm_setup(tmp_path, [good(1), None, good(2), record, good(3)], "raise")
    with pytest.raises(ShipyardError) as info:
        build_datasets(recipe.data, tok, seed=0, stop_ids=eos_token_ids(tok), encoder=encoder)
    message = str(info.value)
    assert message.startswith(f"{path}:4: "), message
    assert phrase in message, message
    if reason == "missing_image":  # said as what it is, not as an unreadable file
        assert "cannot be read" not in message, message
    assert "data.on_error=skip" in message


def test_unreadable_images_are_told_apart_by_reason(tmp_path, qwen):
    _, encoder = qwen
    missing = str(tmp_path / "nope.png")
    with pytest.raises(RecordError) as info:
        encoder.load(missing)
    assert (info.value.reason, str(info.value)) == ("missing_image", f"image {missing} does not exist")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image at all")
    with pytest.raises(RecordError) as info:
        encoder.load(str(corrupt))
    assert info.value.reason == "bad_image" and "cannot be read" in str(info.value)
    with pytest.raises(RecordError) as info:
        encoder.load("data:image/png,not-base64")
    assert info.value.reason == "bad_image"
    assert str(info.value).count("data:image/png,not-base64") == 1, str(info.value)  # said once, not nested
    assert encoder.load(data_uri(96, 64)).size == (96, 64)


def test_bad_images_are_skipped_and_counted_once_each(tmp_path):
    lines = [good(1), BAD["missing_image"][0], good(2), BAD["bad_image"][0], None,
             BAD["image_placeholder_mismatch"][0], good(3), BAD["image_too_large"][0], good(4)]
    path, recipe, tok, encoder = vlm_setup(tmp_path, lines, "skip")
    data = build_datasets(recipe.data, tok, seed=0, stop_ids=eos_token_ids(tok), encoder=encoder)
    assert data.skipped.report() == {"total": 4, "bad_image": 1, "image_placeholder_mismatch": 1,
                                     "image_too_large": 1, "missing_image": 1}
    assert [s.source for s in data.train] == [f"{path}:{n}" for n in (1, 3, 7, 9)]
    assert [r.origin for r in data.train_records] == [f"{path}:{n}" for n in (1, 3, 7, 9)]
    for i, sample in enumerate(data.train, start=1):
        assert len(image_positions(sample, encoder.image_token_id)) == 4  # 64x64
        assert supervised_spans(tok, sample) == [f"answer {i}<|im_end|>"]
        assert sample.media == (str(tmp_path / "imgs" / "ok.png"),)
    assert data.validation == [] and data.truncated == 0
    assert data.turns_report() == {"supervised": 4}


def test_truncation_never_cuts_an_image(tmp_path, qwen):
    from shipyard.data.dataset import fit_length

    processor, encoder = qwen
    tok = processor.tokenizer
    png(tmp_path / "a.png", 64, 64)    # 4 tokens
    png(tmp_path / "b.png", 128, 96)   # 12 tokens
    record = normalise_record({"messages": [user(image("a.png"), "q1"), answer("a1"),
                                            user(image("b.png"), "q2"), answer("a2")]}, "t:1", tmp_path)
    sample = tokenize_record(tok, record, "as_served", eos_token_ids(tok), encoder).samples[0]
    pos = image_positions(sample, encoder.image_token_id)
    assert len(pos) == 16 and sample.num_targets == 6  # "a1<|im_end|>", "a2<|im_end|>": 3 tokens each
    assert fit_length(sample, pos[1], "truncate", encoder) == "overlength_cuts_image"
    assert fit_length(sample, pos[-1], "truncate", encoder) == "overlength_cuts_image"
    cut = fit_length(sample, pos[-1] + 1, "truncate", encoder)  # every image token kept; a2 cut off
    assert len(cut.input_ids) == pos[-1] + 1 and cut.num_targets == 3 and cut.media == sample.media
    assert fit_length(sample, len(sample.input_ids) - 1, "drop", encoder) == "overlength"


# ------------------------------------------------------------------ 5. text-only models


def test_text_model_refuses_image_records(tokenizer, tmp_path):
    record = normalise_record({"messages": [user(image(str(tmp_path / "a.png")), "What is it?"), answer("x")]}, "r:1")
    with pytest.raises(RecordError) as info:
        tokenize_record(tokenizer, record)
    assert info.value.reason == "image_for_text_model"
    assert "data.drop_images=true" in str(info.value)

    png(tmp_path / "a.png", 64, 64)
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"}, answer("ok")]},
                                              {"messages": [user(image("a.png"), "What is it?"), answer("x")]}])
    recipe = load_recipe("quickstart", [f"data.train={path}", "data.validation=[]"])
    with pytest.raises(ShipyardError, match="^" + re.escape(f"{path}:2: the record has image or audio parts, but the model is text-only")):
        build_datasets(recipe.data, tokenizer, seed=0)
    skip = load_recipe("quickstart", [f"data.train={path}", "data.validation=[]", "data.on_error=skip"])
    data = build_datasets(skip.data, tokenizer, seed=0)
    assert data.skipped.report() == {"total": 1, "image_for_text_model": 1} and len(data.train) == 1


def test_drop_images_trains_the_text_alone(tokenizer, tmp_path):
    png(tmp_path / "imgs" / "a.png", 64, 64)
    records = [
        {"messages": [user(image("imgs/a.png"), "What is at the top left?"), answer("red circle")]},
        {"messages": [user(image_url(data_uri(64, 64)), "Count.", image("imgs/a.png"), "Shapes?"), answer("2")]},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    recipe = load_recipe("quickstart", [f"data.train={path}", "data.validation=[]", "data.drop_images=true"])
    data = build_datasets(recipe.data, tokenizer, seed=0)
    assert data.skipped.report() == {"total": 0}
    assert len(data.train) == 2
    texts = [tokenizer.decode(s.input_ids) for s in data.train]
    assert texts == [
        "<|im_start|>user\nWhat is at the top left?<|im_end|>\n<|im_start|>assistant\nred circle<|im_end|>",
        "<|im_start|>user\nCount.\nShapes?<|im_end|>\n<|im_start|>assistant\n2<|im_end|>",
    ]
    assert [supervised_spans(tokenizer, s) for s in data.train] == [["red circle<|im_end|>"], ["2<|im_end|>"]]
    for sample in data.train:
        assert sample.media == ()
        text = tokenizer.decode(sample.input_ids)
        assert IMAGE_PAD not in text and "<|vision_start|>" not in text and "data:image" not in text
    assert all(isinstance(m["content"], str) for r in data.train_records for m in r.messages)
