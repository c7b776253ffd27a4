"""Read the weights of a directory by name, without building the model.

A directory holds its weights either as Hugging Face safetensors (consolidated
checkpoints, exports, any HF model directory) or as DCP shards under
`shipyard/model/` (multi-rank checkpoints before consolidation). Both are read
a few tensors at a time, so exporting or consolidating a model never needs
more memory than the output file being written.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from shipyard.errors import ShipyardError
from shipyard.hf_files import INDEX_FILE, MTP_SIDE_FILE, SINGLE_FILE


def _no_dist() -> bool:
    return not (dist.is_available() and dist.is_initialized())


def dcp_save(state: dict, path: Path) -> None:
    """`dcp.save`, single-process when no process group is up (without DCP's warning that says so)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=str(path), no_dist=_no_dist())


def dcp_load(state: dict, path: Path, local_only: bool = False) -> None:
    """`dcp.load` into `state` in place; `local_only` reads full tensors in this process alone."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path), no_dist=local_only or _no_dist())


class DirectoryWeights:
    """name -> (shape, dtype) and `load(names)` over one directory's weights."""

    def __init__(self, directory: Path, source: str = "auto"):
        """`source`: "auto" prefers safetensors and falls back to DCP shards; "dcp" reads only the shards."""
        self.directory = directory
        self.dcp_dir = directory / "shipyard" / "model"
        self.shapes: dict[str, tuple[torch.Size, torch.dtype]] = {}
        self._file_of: dict[str, str] = {}
        if source == "dcp":
            self._index_dcp()
        elif any((directory / f).is_file() for f in (INDEX_FILE, SINGLE_FILE)):
            self._index_safetensors()
        elif self.dcp_dir.is_dir():
            self._index_dcp()
        else:
            raise ShipyardError(f"{directory}: no weights found ({SINGLE_FILE}, {INDEX_FILE} or shipyard/model/)")

    @property
    def sharded(self) -> bool:
        return not self._file_of

    def _index_safetensors(self) -> None:
        index = self.directory / INDEX_FILE
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = [SINGLE_FILE]
        if (self.directory / MTP_SIDE_FILE).is_file():  # an MTP head kept out of the index (hf_files.py)
            files.append(MTP_SIDE_FILE)
        for filename in files:
            path = self.directory / filename
            if not path.is_file():
                raise ShipyardError(f"{self.directory}: {INDEX_FILE} lists {filename}, which is missing")
            with safe_open(path, "pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    dtype = _SAFETENSORS_DTYPES[sl.get_dtype()]
                    self.shapes[name] = (torch.Size(sl.get_shape()), dtype)
                    self._file_of[name] = filename

    def load_rows(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of one safetensors tensor (all of it without bounds), read alone.

        The file is opened for this tensor only: its memory map, which counts in the process's resident memory,
        never holds more than these rows (a rank filling its shards reads a fraction of each file)."""
        with safe_open(self.directory / self._file_of[name], "pt") as f:
            piece = f.get_slice(name)
            return piece[start:stop] if start is not None else piece[:]

    def _index_dcp(self) -> None:
        metadata = dcp.FileSystemReader(str(self.dcp_dir)).read_metadata()
        for name, item in metadata.state_dict_metadata.items():
            if isinstance(item, TensorStorageMetadata):
                self.shapes[name] = (item.size, item.properties.dtype)

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Full tensors for `names`, on CPU."""
        if not self.sharded:
            out = {}
            by_file: dict[str, list[str]] = {}
            for name in names:
                by_file.setdefault(self._file_of[name], []).append(name)
            for filename, group in by_file.items():
                with safe_open(self.directory / filename, "pt") as f:
                    out.update({n: f.get_tensor(n) for n in group})
            return out
        state = {n: torch.empty(self.shapes[n][0], dtype=self.shapes[n][1]) for n in names}
        dcp_load(state, self.dcp_dir, local_only=True)
        return state


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
