"""Run under torchrun by tests/test_pipeline.py: one pipeline step's gradients, and mask-construction counts.

    torchrun --nproc-per-node 2 tests/pipeline_worker.py PRESET OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch

from shipyard.config import DataConfig, ModelConfig, ParallelConfig
from shipyard.data.dataset import build_datasets
from shipyard.data.loader import collate
from shipyard.models.load import load
from shipyard.parallel import pipeline
from shipyard.parallel.dist import destroy, init_distributed
from shipyard.parallel.topology import build_topology
from shipyard.data.loader import supervised_tokens

SEQ = 48


def batch_of(preset: str):
    model, tokenizer, _ = load(ModelConfig(path=preset), seed=0)
    cfg = DataConfig(train=[{"synthetic": "reverse_words", "num_records": 8, "seed": 0}], max_length=SEQ)
    return model, collate(build_datasets(cfg, tokenizer, seed=0).train, tokenizer.pad_token_id)


def main() -> None:
    preset, out = sys.argv[1], Path(sys.argv[2])
    dist_info = init_distributed("cpu")
    cfg = ParallelConfig(pp=2, pp_schedule="1f1b", pp_microbatches=4)
    topo = build_topology(cfg, dist_info, use_fsdp=False)
    model, batch = batch_of(preset)
    layers = pipeline.validate(model, cfg)
    r = topo.pp_rank
    part = pipeline.build_stage(model, layers[r], r == 0, r == 1)
    runner = pipeline.PipelineRunner([part], [r], 2, topo, cfg, dist_info.device, 2048, SEQ, rows=8, pad_id=0)

    # 1. gradients of one step, normalised like training: by the batch's supervised tokens
    loss = runner.train_micro_batches([batch], 1.0 / supervised_tokens([batch]), dist_info.device)
    torch.save({n: p.grad for n, p in part.named_parameters()}, out / f"grads_{r}.pt")
    (out / f"loss_{r}.json").write_text(json.dumps(float(loss)))

    # 2. causal masks built per stage: full-length rows (no padding) then padded rows
    for p in part.parameters():
        p.grad = None
    builds_before = part.get_decoder()._pp_mask_builds
    unpadded = {"input_ids": torch.randint(3, 500, (8, SEQ)), "attention_mask": torch.ones(8, SEQ, dtype=torch.long)}
    unpadded["labels"] = unpadded["input_ids"].clone()
    for _ in range(3):
        runner.train_micro_batches([unpadded], 1e-3, dist_info.device)
    after_unpadded = part.get_decoder()._pp_mask_builds
    for _ in range(2):
        runner.train_micro_batches([batch], 1e-3, dist_info.device)  # rows shorter than SEQ: padded
    after_padded = part.get_decoder()._pp_mask_builds
    counts = {"first_step": builds_before, "unpadded": after_unpadded - builds_before, "padded": after_padded - after_unpadded}
    (out / f"masks_{r}.json").write_text(json.dumps(counts))
    destroy()


if __name__ == "__main__":
    main()
