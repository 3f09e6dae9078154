"""The model a worker fine-tunes: SD components with the run's LoRA and placeholder tokens added, the
denoising loss, and the trainable state (what a checkpoint holds).

Frozen weights run in the mixed-precision dtype (fp16 on a GPU, bf16 on a GPU or a CPU); trainable ones
(LoRA, the text encoder when TI trains) stay float32, as in diffusers' training scripts.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor

from busdiff.config import CLASSES, BusdiffConfig
from busdiff.finetune.data import seed_of
from busdiff.finetune.recipe import Phase, captions, class_tokens, placeholder_tokens, uses_lora, uses_ti
from busdiff.models.adapters import add_lora, add_text_encoder_lora, add_ti_tokens, save_adapters
from busdiff.models.presets import load_pipelines, model_id

log = logging.getLogger(__name__)

TI_KEY = "ti.embeddings"
_HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def weight_dtype(mixed_precision: str, device: torch.device) -> torch.dtype:
    """The dtype of frozen weights: half when asked, except fp16 off a GPU: float32 there (with a warning),
    as CPU fp16 kernels are slow or missing. bf16 runs on a CPU too (torch's CPU autocast supports it)."""
    if mixed_precision == "no":
        return torch.float32
    if mixed_precision == "fp16" and device.type != "cuda":
        log.warning("finetune.mixed_precision=fp16 is a GPU setting: training in float32 on %s", device.type)
        return torch.float32
    return _HALF[mixed_precision]


class FinetuneModel:
    """SD components on ``device`` with the run's adapters added. ``set_phase`` picks what trains."""

    def __init__(self, cfg: BusdiffConfig, device: torch.device) -> None:
        ft = cfg.finetune
        self.cfg, self.device = cfg, device
        self.dtype = weight_dtype(ft.mixed_precision, device)
        txt, _ = load_pipelines(cfg.model.model_copy(update={"dtype": "float32"}), torch.device("cpu"))
        self.unet, self.vae = txt.unet, txt.vae
        self.text_encoder, self.tokenizer = txt.text_encoder, txt.tokenizer
        self.sample_scheduler = txt.scheduler
        self.noise_scheduler = DDPMScheduler.from_config(txt.scheduler.config)
        for m in (self.unet, self.vae, self.text_encoder):
            m.requires_grad_(False)
        self._latent_cache: dict[bytes, tuple[torch.Tensor, torch.Tensor]] | None = (
            {} if ft.cache_latents else None
        )

        self.tokens = placeholder_tokens(ft)
        self.vector_tokens: dict[str, list[str]] = {}
        self.token_ids: list[int] = []
        if self.tokens:
            added = add_ti_tokens(
                self.tokenizer,
                self.text_encoder,
                self.tokens,
                ft.ti.initializer_token,
                num_vectors=ft.ti.num_vectors,
            )
            n = ft.ti.num_vectors
            self.vector_tokens = {t: added[i * n : (i + 1) * n] for i, t in enumerate(self.tokens)}
            self.token_ids = self.tokenizer.convert_tokens_to_ids(added)
        self.has_lora = uses_lora(ft)
        self.te_lora = self.has_lora and ft.lora.text_encoder
        lo = ft.lora
        # peft's gaussian init draws from torch's global RNG: seed it from the run's seed (and leave the
        # caller's RNG as it was), so that the start depends on finetune.seed alone, on every rank.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed_of(ft.seed, 0))
            if self.has_lora:
                add_lora(
                    self.unet,
                    rank=lo.rank,
                    alpha=lo.alpha,
                    target_modules=lo.target_modules,
                    dropout=lo.dropout,
                )
            if self.te_lora:
                add_text_encoder_lora(
                    self.text_encoder,
                    rank=lo.rank,
                    alpha=lo.alpha,
                    target_modules=lo.text_encoder_target_modules,
                    dropout=lo.dropout,
                )
        te_trains = uses_ti(ft) or self.te_lora

        # nn.Module.to: diffusers' ModelMixin.to warns on every dtype cast. The text encoder trains (its
        # embedding rows) when TI does: keep it float32 then.
        torch.nn.Module.to(self.vae, device=device, dtype=self.dtype)
        torch.nn.Module.to(self.unet, device=device, dtype=self.dtype)
        torch.nn.Module.to(self.text_encoder, device=device, dtype=torch.float32 if te_trains else self.dtype)
        for _, p in self.lora_parameters():
            p.data = p.data.float()
        if ft.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if te_trains:
                te = self.text_encoder  # transformers 5 renamed gradient_checkpointing_enable
                (getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable)()
        self.train_mode()

        self.captions = captions(ft, self.vector_tokens)  # what training tokenizes
        # What a pipeline is given: it expands a multi-vector token itself (TextualInversionLoaderMixin).
        self.prompts = captions(ft)
        ids = self.tokenizer(
            [self.captions[c] for c in CLASSES],
            padding="max_length",
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids
        self.input_ids = {c: ids[i] for i, c in enumerate(CLASSES)}
        emb = self.embeddings
        self._frozen_rows = torch.ones(emb.shape[0], dtype=torch.bool, device=device)
        self._frozen_rows[self.token_ids] = False
        # Rows other than the placeholders' never change: restored after every step (bit-identical).
        self._original_rows = emb.detach().clone() if self.token_ids else None
        self.phase: Phase | None = None
        self._text_cache: dict[str, torch.Tensor] = {}

    def train_mode(self) -> None:
        """Dropout on only where LoRA dropout is asked for. transformers checkpoints a layer only while that
        layer is in train mode, so with gradient checkpointing the text encoder's checkpointed layers are
        flagged training themselves, leaving their sub-modules' dropout as it is."""
        ft = self.cfg.finetune
        self.unet.train(ft.lora.dropout > 0)  # diffusers checkpoints in either mode
        self.text_encoder.train(self.te_lora and ft.lora.dropout > 0)
        if ft.gradient_checkpointing:
            for m in self.text_encoder.modules():
                if getattr(m, "gradient_checkpointing", False):
                    m.training = True

    # ---------------------------------------------------------------------------------- parameters
    @property
    def embeddings(self) -> torch.Tensor:
        return self.text_encoder.get_input_embeddings().weight

    def lora_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """The UNet's LoRA tensors, then the text encoder's (prefixed ``text_encoder.``) when it has one."""
        yield from ((n, p) for n, p in self.unet.named_parameters() if "lora_" in n)
        if self.te_lora:
            te = self.text_encoder.named_parameters()
            yield from ((f"text_encoder.{n}", p) for n, p in te if "lora_" in n)

    def set_phase(self, phase: Phase) -> None:
        """Make the phase's parameters trainable and the others frozen."""
        self.phase = phase
        for _, p in self.lora_parameters():
            p.requires_grad_(phase.lora)
        self.embeddings.requires_grad_(phase.ti)
        self._text_cache = {}
        if not phase.ti and not (phase.lora and self.te_lora):  # text encoder frozen: encode captions once
            with torch.no_grad(), self.autocast():
                for c, ids in self.input_ids.items():
                    self._text_cache[c] = self.text_encoder(ids[None].to(self.device))[0][0]

    def param_groups(self) -> list[dict[str, Any]]:
        assert self.phase is not None
        groups = []
        if self.phase.lora:
            groups.append(
                {"params": [p for _, p in self.lora_parameters()], "lr": self.phase.lr_lora, "name": "lora"}
            )
        if self.phase.ti:
            groups.append({"params": [self.embeddings], "lr": self.phase.lr_ti, "name": "ti"})
        return groups

    def trainable_grads(self) -> list[torch.Tensor]:
        """Views of the gradients that matter (LoRA, the placeholder rows), for the all-reduce. Gradients of
        the other embedding rows are zeroed: they are restored after the step anyway."""
        assert self.phase is not None
        grads: list[torch.Tensor] = []
        if self.phase.lora:
            grads += [p.grad for _, p in self.lora_parameters()]
        if self.phase.ti:
            g = self.embeddings.grad
            g[self._frozen_rows] = 0
            grads.append(g[~self._frozen_rows])
        return grads

    def set_token_grads(self, rows: torch.Tensor) -> None:
        self.embeddings.grad[~self._frozen_rows] = rows

    def restore_frozen_rows(self) -> None:
        if self._original_rows is not None:
            with torch.no_grad():
                self.embeddings[self._frozen_rows] = self._original_rows[self._frozen_rows]

    # ---------------------------------------------------------------------------------- loss
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype != torch.float32:
            return torch.autocast(self.device.type, dtype=self.dtype)
        return contextlib.nullcontext()

    def encode_text(self, labels: Sequence[str]) -> torch.Tensor:
        if self._text_cache:
            return torch.stack([self._text_cache[c] for c in labels])
        ids = torch.stack([self.input_ids[c] for c in labels]).to(self.device)
        return self.text_encoder(ids)[0]

    @torch.no_grad()
    def latents(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Scaled VAE latents of a micro-batch, drawn from the encoder's Gaussian with ``generator`` (as
        ``latent_dist.sample``). With ``finetune.cache_latents`` each distinct image's Gaussian (mean, std)
        is encoded once per run and kept for later epochs and phases; the draw is still new each step, so
        training is the uncached one up to the rounding of encoding in other batches."""
        if self._latent_cache is None:
            dist = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
            mean, std = dist.mean, dist.std
        else:
            cache = self._latent_cache
            # an image's bytes are its key: a flip is another image, the same image in any batch is one
            keys = [hashlib.blake2b(p.numpy().tobytes(), digest_size=16).digest() for p in pixels]
            missing = [i for i, k in enumerate(keys) if k not in cache]
            if missing:
                dist = self.vae.encode(pixels[missing].to(self.device, self.dtype)).latent_dist
                for j, i in enumerate(missing):
                    cache[keys[i]] = (dist.mean[j].clone(), dist.std[j].clone())
            mean = torch.stack([cache[k][0] for k in keys])
            std = torch.stack([cache[k][1] for k in keys])
        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        # contiguous: the encoder's mean is a strided view (channels-last-like), and the UNet's kernels
        # round differently on such input; cached or not, the UNet sees one layout
        return ((mean + std * noise) * self.vae.config.scaling_factor).contiguous()

    def loss(self, pixels: torch.Tensor, labels: Sequence[str], generator: torch.Generator) -> torch.Tensor:
        """Denoising loss of one micro-batch; every random draw comes from ``generator`` (CPU), so the same
        generator state gives the same loss on any device."""
        ft = self.cfg.finetune
        latents = self.latents(pixels, generator)
        b = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator).to(self.device, latents.dtype)
        if ft.noise_offset:
            offset = torch.randn((b, latents.shape[1], 1, 1), generator=generator)
            noise = noise + ft.noise_offset * offset.to(self.device, latents.dtype)
        sched = self.noise_scheduler
        timesteps = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=generator).to(
            self.device
        )
        noisy = sched.add_noise(latents, noise, timesteps)
        if sched.config.prediction_type == "v_prediction":
            target = sched.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        with self.autocast():
            hidden = self.encode_text(labels)
            pred = self.unet(noisy, timesteps, hidden, return_dict=False)[0]
        if ft.snr_gamma is None:
            return F.mse_loss(pred.float(), target.float())
        from diffusers.training_utils import compute_snr

        snr = compute_snr(sched, timesteps)
        weight = torch.clamp(snr, max=ft.snr_gamma)
        weight = weight / (snr + 1) if sched.config.prediction_type == "v_prediction" else weight / snr
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        return (per_sample * weight).mean()

    # ---------------------------------------------------------------------------------- state
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every weight training changes: LoRA tensors by parameter name, the placeholder rows."""
        state = {n: p.detach().to("cpu", torch.float32).contiguous() for n, p in self.lora_parameters()}
        if self.token_ids:
            state[TI_KEY] = self.embeddings[self.token_ids].detach().to("cpu", torch.float32).contiguous()
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.lora_parameters())
        expected = set(params) | ({TI_KEY} if self.token_ids else set())
        if set(state) != expected:
            raise ValueError(
                f"checkpoint tensors do not match this run's adapters: "
                f"missing {sorted(expected - set(state))[:5]}, unexpected {sorted(set(state) - expected)[:5]}"
            )
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n])
            if self.token_ids:
                self.embeddings[self.token_ids] = state[TI_KEY].to(self.device, self.embeddings.dtype)

    def pipeline(self) -> StableDiffusionPipeline:
        """A text2img pipeline over the training components (the adapters as they are now)."""
        pipe = StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=self.sample_scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def save_adapter(self, out_dir: str | Path, trained_ids: Sequence[str], extra: dict[str, Any],
                     lora_only: bool = False) -> dict:
        """The adapter as it is now; ``lora_only`` leaves the TI tokens out (the LoRA phase's adapter)."""
        comps = {"unet": self.unet, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer}
        tokens = [] if lora_only else self.tokens
        return save_adapters(
            out_dir,
            comps,
            lora_unet=self.has_lora,
            lora_text_encoder=self.te_lora,
            ti_tokens=tokens,
            class_tokens=class_tokens(self.cfg.finetune) if tokens else None,
            base_model=model_id(self.cfg.model),
            trained_ids=trained_ids,
            extra=extra,
        )
