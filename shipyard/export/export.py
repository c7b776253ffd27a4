"""`shipyard export CHECKPOINT OUT_DIR`: a checkpoint (or any HF model directory) to a vLLM-ready directory.

Everything that can be wrong is checked before anything is written (tokenizer,
chat template, EOS, architecture, special-token ids inside the embedding).
The directory is assembled under a temporary name next to OUT_DIR and renamed
into place, so OUT_DIR is either the old content or the complete new one.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

import shipyard.models.speechlm  # noqa: F401  (an exported speech-LM's config loads through AutoConfig)
from shipyard.errors import ShipyardError
from shipyard.fsutil import publish
from shipyard.hf_files import MTP_SIDE_FILE, read_probe
from shipyard.models import eagle3
from shipyard.models.mtp_layout import ServedLayoutWeights, served_config_updates, style_for
from shipyard.models.save import (
    SERVED_PREFIXES,
    ModelMeta,
    ServedNamesWeights,
    WeightLayout,
    check_exportable,
    dominant_dtype,
    normalise_tokenizer_files,
    plan_files,
    target_dtype,
    served_name,
    write_hf_metadata,
    write_index,
    write_weight_file,
)
from shipyard.models.weights import DirectoryWeights
from shipyard.parallel.dist import DistInfo, barrier, on_main
from shipyard.peft.adapter_dir import (
    ADAPTER_WEIGHTS,
    LORA_META,
    MergedWeights,
    is_adapter_dir,
    read_adapter,
    read_lora_meta,
    resolve_base_dir,
    write_adapter_dir,
)

CHECKPOINT_META = Path("shipyard") / "checkpoint.json"


@dataclass
class ExportResult:
    out_dir: Path
    files: list[str]
    replaced: list[str]
    dtype: str


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def load_meta(src: Path, trust_remote_code: bool = False) -> tuple[ModelMeta, dict]:
    """The ModelMeta of a checkpoint or HF directory, and the checkpoint info ({} for plain HF dirs)."""
    if not (src / "config.json").is_file():
        raise ShipyardError(f"{src}: no config.json; expected a shipyard step directory or a Hugging Face model directory")
    info = _read_json(src / CHECKPOINT_META)
    try:
        config = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise ShipyardError(f"{src}/config.json: {str(e).splitlines()[0]}") from None
    tokenizer = load_tokenizer_normalised(src, trust_remote_code)
    check_exportable(config, tokenizer, str(src))
    base_eos = _read_json(src / "generation_config.json").get("eos_token_id")
    layout = WeightLayout.from_json(info.get("base_layout")) if info else WeightLayout.from_dir(src)
    meta = ModelMeta(
        config=config,
        architecture=config.architectures[0],
        tokenizer=tokenizer,
        base_name=info.get("base_model", str(src)),
        base_dir=src,
        base_eos=base_eos,
        layout=layout,
        probe=read_probe(src),
        processor=load_processor_of(src, config, tokenizer, trust_remote_code),
    )
    return meta, info


def load_processor_of(src: Path, config, tokenizer, trust_remote_code: bool = False):
    """A vision-language or speech directory's processor (image / audio settings), wired to the normalised tokenizer."""
    from shipyard.models.load import is_multimodal

    if not is_multimodal(config):
        return None
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(src, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ShipyardError(f"{src}: a multimodal model whose processor does not load ({str(e).splitlines()[0]}); "
                            "its processor_config.json / preprocessor_config.json is needed to serve images or "
                            "audio") from None
    processor.tokenizer = tokenizer
    return processor


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".distcp", ".gguf")


def load_tokenizer_normalised(src: Path, trust_remote_code: bool = False):
    """The tokenizer of `src`, read after the export normalisation (None when there is none).

    Normalising first matters: a tokenizer_config.json naming a class this
    transformers cannot import (`TokenizersBackend` saved by a newer version,
    a private class) does not even load until its class is normalised.
    """
    if not (src / "tokenizer_config.json").is_file():
        return None
    with tempfile.TemporaryDirectory(prefix="shipyard-tok-") as tmp:
        for item in src.iterdir():
            if item.is_file() and not item.name.endswith(_WEIGHT_SUFFIXES):
                shutil.copy2(item, tmp)
            elif item.is_dir() and item.name == "additional_chat_templates":
                shutil.copytree(item, Path(tmp) / item.name)
        normalise_tokenizer_files(Path(tmp))
        try:
            return AutoTokenizer.from_pretrained(tmp, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, TypeError, KeyError):
            return None


def _check_special_tokens_fit(meta: ModelMeta, rows: int, src: Path) -> None:
    ids = [i for i in meta.tokenizer.all_special_ids if i is not None]
    ids += list(meta.tokenizer.get_added_vocab().values())
    too_big = sorted({i for i in ids if i >= rows})
    if too_big:
        raise ShipyardError(
            f"{src}: special token ids {too_big[:5]} are outside the embedding table ({rows} rows); "
            "resize the embeddings before training so these tokens have rows"
        )


def _embedding_rows(weights, meta: ModelMeta) -> int:
    rows = [shape[0] for name, (shape, _) in weights.shapes.items() if name.endswith("embed_tokens.weight")]
    return rows[0] if rows else getattr(meta.config.get_text_config(), "vocab_size", 0)


def prepare_out_dir(out_dir: Path, force: bool) -> list[str]:
    """Refuse a non-empty OUT_DIR unless `force`; return what would be replaced."""
    if out_dir.is_file():
        raise ShipyardError(f"{out_dir} is a file; give a directory path")
    existing = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if existing and not force:
        raise ShipyardError(
            f"{out_dir} is not empty ({len(existing)} entries: {', '.join(existing[:6])}"
            f"{', ...' if len(existing) > 6 else ''}); pass --force to replace it"
        )
    return existing


def write_weight_files(
    out_dir: Path,
    weights: DirectoryWeights,
    *,
    layout: WeightLayout,
    dtype: torch.dtype | None,
    aliases: dict[str, str],
    rank: int = 0,
    world_size: int = 1,
    side_file: set[str] = frozenset(),
) -> tuple[dict[str, list[str]], dict]:
    """Write this rank's share of the output files: whole files are assigned to ranks round-robin.

    Every rank computes the same plan from tensor metadata alone; a rank only
    ever holds the tensors of the file it is writing. Returns (plan, shapes)
    for the index, which the caller writes once all ranks are done.
    """
    names = [n for n in weights.shapes if n not in aliases]
    shapes = {n: (weights.shapes[n][0], target_dtype(n, weights.shapes[n][1], layout, dtype)) for n in names}
    plan = plan_files({n: s for n, s in shapes.items() if n not in side_file}, layout)
    if side_file:
        plan[MTP_SIDE_FILE] = sorted(side_file)
    for filename in sorted(plan)[rank::world_size]:
        group = plan[filename]
        tensors = weights.load(group)
        write_weight_file(out_dir / filename, {n: tensors[n].to(shapes[n][1]) for n in group})
    return plan, shapes


def open_merged(src: Path, trust_remote_code: bool) -> tuple[ModelMeta, MergedWeights]:
    """An adapter directory as a full model: the base's metadata and weights with the adapter merged in."""
    config, state = read_adapter(src)
    base_dir = resolve_base_dir(config["base_model_name_or_path"])
    meta, _ = load_meta(base_dir, trust_remote_code)
    meta.tokenizer = load_tokenizer_normalised(src, trust_remote_code) or meta.tokenizer
    meta.probe = read_probe(src) or meta.probe
    meta.base_name = config["base_model_name_or_path"]
    transposed = read_lora_meta(src).get("transposed_parameters", [])
    return meta, MergedWeights(DirectoryWeights(base_dir), config, state, transposed)


def export_adapter(src: Path, out_dir: Path, force: bool) -> ExportResult:
    """Copy an adapter directory with its tokenizer normalised (single process: adapters are small)."""
    config, state = read_adapter(src)
    tokenizer = load_tokenizer_normalised(src)
    if tokenizer is None:
        raise ShipyardError(f"{src}: no tokenizer in the adapter directory")
    lora_meta = _read_json(src / LORA_META)

    def write() -> list[str]:
        replaced = prepare_out_dir(out_dir, force)
        partial = out_dir.with_name(f".{out_dir.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        write_adapter_dir(partial, state, config, lora_meta, tokenizer, read_probe(src))
        publish(partial, out_dir)
        return replaced

    replaced = on_main(write)
    return ExportResult(out_dir, [ADAPTER_WEIGHTS], replaced, str(next(iter(state.values())).dtype).removeprefix("torch."))


def served_mtp_layout(weights, meta: ModelMeta) -> tuple[object, list[str], set[str]]:
    """`weights` with MTP tensors renamed into the layout vLLM reads for this family, the names expected out,
    and those written to the side file (families vLLM serves no MTP for: see MTP_SIDE_FILE).

    Also points `meta` at the serving architecture (Qwen2 bases with MTP serve as MiMoForCausalLM).
    """
    view = ServedLayoutWeights(weights, meta.config)
    expected = view.mtp_names()
    if not expected:
        return weights, [], set()
    style = style_for(meta.config)
    layers = len(view.mtp_layers) or getattr(meta.config, "num_nextn_predict_layers", 0)
    for key, value in served_config_updates(meta.config, layers).items():
        setattr(meta.config, key, value)
    if style.architecture:
        meta.architecture = style.architecture
    return view, expected, set() if style.architecture else set(expected)


def check_mtp_written(out_dir: Path, expected: list[str]) -> None:
    """Read the written files back: every MTP tensor must be there (some save paths drop `mtp.*` silently)."""
    if not expected:
        return
    written = set(DirectoryWeights(out_dir).shapes)
    missing = [n for n in expected if n not in written]
    if missing:
        raise ShipyardError(f"export lost {len(missing)} of {len(expected)} MTP tensors (e.g. {missing[0]}); "
                            "nothing was published")


def export_checkpoint(
    src: Path,
    out_dir: Path,
    force: bool = False,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    dist_info: DistInfo | None = None,
    merge_lora: bool = False,
) -> ExportResult:
    """Export `src` to `out_dir`. With `dist_info`, every rank calls this and writes its share of the files.

    An adapter directory exports as an adapter directory, or with `merge_lora` as full merged weights.
    """
    dist_info = dist_info or DistInfo()
    src, out_dir = Path(src), Path(out_dir)
    if not src.is_dir():
        raise ShipyardError(f"{src} is not a directory")
    if is_adapter_dir(src) and not merge_lora:
        return export_adapter(src, out_dir, force)
    # Every rank validates (same files, same verdict), so a refusal stops all ranks before any writing.
    if is_adapter_dir(src):
        (meta, weights), info = open_merged(src, trust_remote_code), {}
    else:
        meta, info = load_meta(src, trust_remote_code)
        weights = DirectoryWeights(src)
    weights, mtp_expected, mtp_aside = served_mtp_layout(weights, meta)
    if meta.architecture in eagle3.ARCHITECTURES:
        eagle3.check_weights(meta.config, {n: tuple(s) for n, (s, _) in weights.shapes.items()}, str(src))
    tied = info.get("tied", {})
    if SERVED_PREFIXES.get(meta.config.model_type):  # module names vLLM does not read (models/save.py)
        weights = ServedNamesWeights(weights, meta.config)
        tied = {served_name(k, meta.config): served_name(v, meta.config) for k, v in tied.items()}
    _check_special_tokens_fit(meta, _embedding_rows(weights, meta), src)
    partial = out_dir.with_name(f".{out_dir.name}.partial")

    def prepare() -> list[str]:
        replaced = prepare_out_dir(out_dir, force)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        return replaced

    replaced = on_main(prepare)
    try:
        plan, shapes = write_weight_files(
            partial, weights, layout=meta.layout, dtype=dtype, aliases=tied,
            rank=dist_info.rank, world_size=dist_info.world_size, side_file=mtp_aside,
        )
        barrier()
        saved_dtype = dominant_dtype(shapes)
        if dist_info.is_main:
            write_index(partial, plan, shapes)
            check_mtp_written(partial, mtp_expected)
            write_hf_metadata(partial, meta, saved_dtype)
            publish(partial, out_dir)
        barrier()
    except BaseException:
        if dist_info.is_main:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    return ExportResult(out_dir, sorted(plan), replaced, str(saved_dtype).removeprefix("torch."))
