"""How vLLM serves each family's MTP head (`MTPStyle`), where each MTP tensor lives in a served checkpoint,
and back.

shipyard keeps MTP weights as `mtp.layers.{i}.{enorm,hnorm,eh_proj,final_norm,block.*}` (models/mtp.py) in
checkpoints. An export writes them where vLLM's loader for the base's family reads them:

- mimo (Qwen2 bases, `MiMoForCausalLM`): `model.mtp_layers.{i}.{token_layernorm, hidden_layernorm, input_proj,
  final_layernorm}` and the block's own names under the same prefix; `input_proj` takes [hidden, embedding]
  (the reverse of `eh_proj`), so its two column halves are swapped;
- deepseek (GLM-4.5, DeepSeek-V3): `model.layers.{L + i}.{enorm, hnorm, eh_proj, shared_head.norm}` and the block,
  plus copies of the embedding (`embed_tokens`) and LM head (`shared_head.head`) that those loaders expect;
- nemotron_h: `mtp.layers.{i}.{enorm, hnorm, eh_proj, final_layernorm}` and the block (`norm`, `mixer.*`);
- shipyard (families vLLM has no MTP model for): shipyard's own names.

The mapping is a function of names, so the same table reads a base's existing head back (the guard).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from shipyard.errors import ShipyardError
from shipyard.models.weights import DirectoryWeights

PREFIX = "mtp.layers."


@dataclass(frozen=True)
class MTPStyle:
    layout: str  # export layout: "mimo", "deepseek" (GLM-4.5 and DeepSeek-V3), "nemotron_h", or "shipyard"
    hidden_in: str  # the base hidden state depth 1 reads: "pre_norm" (before the final norm) or "post_norm"
    chain: str  # what depth k hands to depth k+1: its output "pre_norm" or "post_norm" (after its final norm)
    zero_first_embedding: bool  # the embedding at position 0 is zeroed (vLLM's MiMo/DeepSeek/GLM MTP do this)
    architecture: str | None  # the architecture vLLM serves the base + MTP under; None: vLLM has no MTP for it
    max_served_depths: int = 64  # drafted tokens vLLM's MTP model for this family can make per step


# Per model_type. Each checked against vLLM's model code: mimo_mtp.py (MiMo returns the pre-norm hidden state and
# concatenates [hidden, embedding]), deepseek_mtp.py / glm4_moe_mtp.py (post-norm input, [embedding, hidden],
# pre-norm output chained), nemotron_h_mtp.py (post-norm input, no zeroing at position 0, one MTP step).
STYLES = {
    "qwen2": MTPStyle("mimo", "pre_norm", "post_norm", True, "MiMoForCausalLM", max_served_depths=1),
    "mimo": MTPStyle("mimo", "pre_norm", "post_norm", True, "MiMoForCausalLM", max_served_depths=1),
    "glm4_moe": MTPStyle("deepseek", "post_norm", "pre_norm", True, "Glm4MoeForCausalLM"),
    "deepseek_v3": MTPStyle("deepseek", "post_norm", "pre_norm", True, "DeepseekV3ForCausalLM"),
    "nemotron_h": MTPStyle("nemotron_h", "post_norm", "post_norm", False, "NemotronHForCausalLM", max_served_depths=1),
}
SHIPYARD_STYLE = MTPStyle("shipyard", "post_norm", "pre_norm", True, None)


def style_for(config) -> MTPStyle:
    return STYLES.get(config.get_text_config().model_type, SHIPYARD_STYLE)


_PART = re.compile(r"^mtp\.layers\.(\d+)\.(.+)$")
_RENAMES = {
    "mimo": {"enorm.": "token_layernorm.", "hnorm.": "hidden_layernorm.", "eh_proj.": "input_proj.",
             "final_norm.": "final_layernorm."},
    "deepseek": {"final_norm.": "shared_head.norm."},
    "nemotron_h": {"final_norm.": "final_layernorm."},
    "shipyard": {},
}


def _prefix(layout: str, layer: int, num_hidden_layers: int) -> str:
    if layout == "mimo":
        return f"model.mtp_layers.{layer}."
    if layout == "deepseek":
        return f"model.layers.{num_hidden_layers + layer}."
    return f"{PREFIX}{layer}."  # nemotron_h and shipyard


def served_name(name: str, style: MTPStyle, num_hidden_layers: int) -> str:
    """The name of shipyard's MTP tensor `name` in `style`'s layout (other names are returned unchanged)."""
    m = _PART.match(name)
    if not m:
        return name
    layer, part = int(m.group(1)), m.group(2)
    if style.layout == "shipyard":
        return name
    if part.startswith("block."):
        part = part.removeprefix("block.")
    else:
        for old, new in _RENAMES[style.layout].items():
            if part.startswith(old):
                part = new + part.removeprefix(old)
                break
    return _prefix(style.layout, layer, num_hidden_layers) + part


def swaps_halves(name: str, style: MTPStyle) -> bool:
    """MiMo's input projection reads [hidden, embedding]: `eh_proj` columns [embedding, hidden] are swapped."""
    return style.layout == "mimo" and name.endswith(".eh_proj.weight")


def swap_halves(weight: torch.Tensor) -> torch.Tensor:
    half = weight.shape[1] // 2
    return torch.cat([weight[:, half:], weight[:, :half]], dim=1)


def is_mtp_name(name: str) -> bool:
    return name.startswith(PREFIX)


class ServedLayoutWeights:
    """A weights view (shapes + load) with shipyard's MTP tensors renamed into the family's serving layout.

    Layouts that hold copies of the embedding and LM head per MTP layer (deepseek) get them here too.
    """

    def __init__(self, weights, config):
        self.weights, self.style = weights, style_for(config)
        text = config.get_text_config()
        self.num_hidden_layers = text.num_hidden_layers
        self.source: dict[str, str] = {}  # served name -> name in `weights`
        for name in weights.shapes:
            self.source[served_name(name, self.style, self.num_hidden_layers)] = name
        self.mtp_layers = sorted({int(_PART.match(n).group(1)) for n in weights.shapes if is_mtp_name(n)})
        if self.style.layout == "deepseek":
            embed = next(n for n in weights.shapes if n.endswith("embed_tokens.weight"))
            head = "lm_head.weight" if "lm_head.weight" in weights.shapes else embed
            for i in self.mtp_layers:
                prefix = _prefix("deepseek", i, self.num_hidden_layers)
                self.source[prefix + "embed_tokens.weight"] = embed
                self.source[prefix + "shared_head.head.weight"] = head
        self.split: dict[str, tuple[str, int, str]] = {}  # served per-expert name -> (fused source, expert, part)
        if self.style.layout == "deepseek":
            self._split_fused_experts()
        self.shapes = {served: weights.shapes[name] for served, name in self.source.items()}
        for served, (name, _, part) in self.split.items():
            shape, dtype = weights.shapes[name]
            experts, rows, cols = shape
            self.shapes[served] = (torch.Size([rows // 2, cols] if part in ("gate", "up") else [rows, cols]), dtype)

    def _split_fused_experts(self) -> None:
        """vLLM's DeepSeek/GLM MTP loader reads experts one by one (`mlp.experts.{e}.gate_proj.weight`...), while
        transformers 5 holds them fused (`mlp.experts.gate_up_proj` [E, 2I, H], `down_proj` [E, H, I])."""
        for served, name in list(self.source.items()):
            if not (is_mtp_name(name) and name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj"))):
                continue
            del self.source[served]
            prefix = served.rsplit(".", 1)[0]  # ...mlp.experts
            experts = self.weights.shapes[name][0][0]
            parts = ("gate", "up") if name.endswith("gate_up_proj") else ("down",)
            for e in range(experts):
                for part in parts:
                    self.split[f"{prefix}.{e}.{part}_proj.weight"] = (name, e, part)

    def mtp_names(self) -> list[str]:
        """The served names of every MTP tensor (what an export must contain)."""
        return sorted([n for n, src in self.source.items() if is_mtp_name(src) or is_served_mtp_name(
            n, self.style, self.num_hidden_layers)] + list(self.split))

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        split = [n for n in names if n in self.split]
        names = [n for n in names if n not in self.split]
        tensors = self.weights.load(sorted({self.source[n] for n in names} | {self.split[n][0] for n in split}))
        out, used = {}, set()
        for n in split:
            name, e, part = self.split[n]
            fused = tensors[name][e]
            half = fused.shape[0] // 2
            out[n] = (fused[:half] if part == "gate" else fused[half:] if part == "up" else fused).clone()
        for n in names:
            t = tensors[self.source[n]]
            if self.source[n] in used:  # a per-layer copy (embedding, LM head): its own storage, as safetensors wants
                t = t.clone()
            used.add(self.source[n])
            out[n] = swap_halves(t) if swaps_halves(self.source[n], self.style) else t
        return out


def is_served_mtp_name(name: str, style: MTPStyle, num_hidden_layers: int) -> bool:
    """Is `name` an MTP tensor in shipyard's names or in `style`'s serving layout?"""
    if is_mtp_name(name) or (style.layout == "mimo" and name.startswith("model.mtp_layers.")):
        return True
    m = re.match(r"^model\.layers\.(\d+)\.", name)
    return style.layout == "deepseek" and m is not None and int(m.group(1)) >= num_hidden_layers


def served_config_updates(config, num_layers: int) -> dict:
    """What config.json needs for vLLM to find the head (besides `architectures`)."""
    updates = {"num_nextn_predict_layers": num_layers}
    if style_for(config).layout == "nemotron_h":
        updates["mtp_layers_block_type"] = ["full_attention"]  # one attention-only block per step ("*")
    return updates


# ------------------------------------------------------------------ reading a base's own head (the guard)


def _served_names_of_head(config, head_state_names: list[str]) -> dict[str, str]:
    """shipyard name ('mtp.' + head state name) -> served name, for every tensor of a head of this structure."""
    style = style_for(config)
    layers = config.get_text_config().num_hidden_layers
    out = {}
    for key in head_state_names:
        name = "mtp." + key
        out[name] = served_name(name, style, layers)
    return out


def _weights_of(base_dir: Path) -> DirectoryWeights | None:
    try:
        return DirectoryWeights(base_dir)
    except ShipyardError:
        return None


def _fuse_experts(weights, served_fused: str) -> torch.Tensor | None:
    """The fused expert tensor transformers holds, from a checkpoint's per-expert tensors (DeepSeek/GLM layout)."""
    prefix = served_fused.rsplit(".", 1)[0]
    parts = ("gate", "up") if served_fused.endswith("gate_up_proj") else ("down",)
    experts = []
    while all(f"{prefix}.{len(experts)}.{p}_proj.weight" in weights.shapes for p in parts):
        e = len(experts)
        names = [f"{prefix}.{e}.{p}_proj.weight" for p in parts]
        loaded = weights.load(names)
        experts.append(torch.cat([loaded[n] for n in names], dim=0))
    return torch.stack(experts) if experts else None


def existing_mtp_layers(base_dir: Path, config) -> int:
    """How many MTP layers the base at `base_dir` has weights for (in shipyard's or its family's layout)."""
    weights = _weights_of(base_dir)
    if weights is None:
        return 0
    style = style_for(config)
    layers = config.get_text_config().num_hidden_layers
    found = set()
    for name in weights.shapes:
        if m := _PART.match(name):  # shipyard's own names (checkpoints; shipyard and nemotron_h layouts)
            found.add(int(m.group(1)))
        elif style.layout == "mimo" and (m := re.match(r"^model\.mtp_layers\.(\d+)\.", name)):
            found.add(int(m.group(1)))
        elif style.layout == "deepseek" and (m := re.match(r"^model\.layers\.(\d+)\.eh_proj\.", name)):
            if int(m.group(1)) >= layers:
                found.add(int(m.group(1)) - layers)
    return len(found)


def read_existing_head(base_dir: Path, config, head: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base's MTP tensors, keyed like `head.state_dict()` (missing ones are simply absent)."""
    weights = _weights_of(base_dir)
    style = style_for(config)
    served = _served_names_of_head(config, list(head.state_dict()))
    state = {}
    for name, served_as in served.items():
        source = name if name in weights.shapes else served_as if served_as in weights.shapes else None
        if source is None and name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")):
            fused = _fuse_experts(weights, served_as)
            if fused is not None:
                state[name.removeprefix("mtp.")] = fused.to(head.state_dict()[name.removeprefix("mtp.")].dtype)
            continue
        if source is None:
            continue
        t = weights.load([source])[source]
        if source != name and swaps_halves(name, style):
            t = swap_halves(t)
        state[name.removeprefix("mtp.")] = t.to(head.state_dict()[name.removeprefix("mtp.")].dtype)
    return state
