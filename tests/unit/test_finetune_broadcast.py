"""Two ranks in one torch.distributed (gloo) group, no Ray: after ``broadcast_trainable`` every rank holds
rank 0's trainable tensors, whatever it built itself (here: another seed per rank)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from busdiff.config import load_config
from busdiff.finetune.learner import broadcast_trainable
from busdiff.finetune.loop import weights_digest
from busdiff.finetune.model import FinetuneModel


def _rank(rank: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=2)
    try:
        sets = ["model.preset=tiny", "finetune.method=lora+ti", "finetune.lora.text_encoder=true"]
        model = FinetuneModel(load_config(None, [*sets, f"finetune.seed={rank}"]), torch.device("cpu"))
        before = weights_digest(model.trainable_state())
        broadcast_trainable(model)
        after = weights_digest(model.trainable_state())
        (Path(tmp) / f"rank{rank}").write_text(f"{before} {after}")
    finally:
        dist.destroy_process_group()


def test_every_rank_takes_rank_0s_trainable_tensors(tmp_path, one_torch_thread):
    mp.start_processes(_rank, args=(str(tmp_path),), nprocs=2, start_method="fork")
    (before0, after0), (before1, after1) = ((tmp_path / f"rank{r}").read_text().split() for r in range(2))
    assert before0 != before1  # the ranks built different starts
    assert after0 == after1 == before0
