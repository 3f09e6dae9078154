"""One optimizer step of one worker: gradient accumulation over seeded micro-batches, the gradient
all-reduce across workers, clipping, the update, and the lr schedule. No Ray here: the Ray Train loop and
the plain single-process loop of the benchmark run the same steps.

Gradients are averaged with one ``all_reduce`` of the trainable tensors instead of wrapping the modules in
DistributedDataParallel: the trainable part is small (LoRA, a few embedding rows), and reducing only the
placeholder rows avoids moving the whole 49408×768 embedding gradient every step as DDP would. Like DDP,
every rank starts from rank 0's trainable tensors (``broadcast_trainable``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from diffusers.optimization import get_scheduler
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from busdiff.finetune.data import EpochBatches, seed_of
from busdiff.finetune.model import FinetuneModel
from busdiff.finetune.recipe import Phase


class Learner:
    """Optimizer, lr schedule and loss scaler of one phase; ``step(k)`` runs optimizer step ``k``."""

    def __init__(self, model: FinetuneModel, phase: Phase, phase_index: int, world_size: int = 1) -> None:
        ft = model.cfg.finetune
        self.model, self.phase, self.phase_index, self.world_size = model, phase, phase_index, world_size
        self.seed = ft.seed
        model.set_phase(phase)
        self.groups = model.param_groups()
        self.params = [p for g in self.groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(
            self.groups, betas=(0.9, 0.999), eps=1e-8, weight_decay=ft.weight_decay
        )
        self.lr_scheduler = get_scheduler(
            ft.lr_scheduler,
            self.optimizer,
            num_warmup_steps=ft.lr_warmup_steps,
            num_training_steps=phase.steps,
        )
        fp16 = model.dtype == torch.float16
        self.scaler = torch.amp.GradScaler(model.device.type) if fp16 else None
        self.max_grad_norm = ft.max_grad_norm

    def lrs(self) -> dict[str, float]:
        return {f"lr_{g['name']}": float(g["lr"]) for g in self.optimizer.param_groups}

    def step(self, data: EpochBatches, phase_step: int, rank: int = 0) -> float:
        """Optimizer step ``phase_step`` (0-based within the phase); returns the loss averaged over the
        micro-batches and the workers. Micro-batch ``m`` of the phase and its noise are fixed by
        (seed, phase, m, rank), whatever ran before."""
        model, accum = self.model, self.phase.grad_accum
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=model.device)
        for k in range(accum):
            micro = phase_step * accum + k
            pixels, labels, _ = data.get(self.phase_index, micro)
            torch.manual_seed(seed_of(self.seed, 3, self.phase_index, micro, rank))  # LoRA dropout, if any
            gen = torch.Generator("cpu").manual_seed(seed_of(self.seed, 4, self.phase_index, micro, rank))
            loss = model.loss(pixels, labels, gen) / accum
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.detach()
        grads = model.trainable_grads()
        if self.world_size > 1:
            flat = _flatten_dense_tensors([*grads, total.reshape(1)])
            dist.all_reduce(flat)
            flat /= self.world_size
            reduced = _unflatten_dense_tensors(flat, [*grads, total.reshape(1)])
            for g, r in zip(grads, reduced[:-1], strict=True):
                g.copy_(r)
            if self.phase.ti:  # the placeholder rows were reduced as a copy (boolean indexing)
                model.set_token_grads(reduced[-2])
            total = reduced[-1][0]
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        stepped = True
        if self.scaler:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            # The scaler backs off exactly when it skipped the update (inf/nan gradients); the schedule
            # then waits too, as accelerate's does.
            stepped = self.scaler.get_scale() >= scale
        else:
            self.optimizer.step()
        if stepped:
            self.lr_scheduler.step()
        model.restore_frozen_rows()
        return float(total)

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def broadcast_trainable(model: FinetuneModel, src: int = 0) -> None:
    """Give every rank rank ``src``'s trainable tensors (LoRA, placeholder rows), as DDP does when it wraps
    a model: the all-reduced gradients then update the same model on every rank."""
    state = model.trainable_state()
    flat = _flatten_dense_tensors(list(state.values())).to(model.device)
    dist.broadcast(flat, src)
    synced = _unflatten_dense_tensors(flat.cpu(), list(state.values()))
    model.load_trainable_state(dict(zip(state, synced, strict=True)))
