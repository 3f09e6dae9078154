"""The miniature base model: SD 1.5's classes (AutoencoderKL, UNet2DConditionModel, CLIPTextModel,
CLIPTokenizer) at miniature size, pretrained here from scratch on phantom ultrasound, so that the embedded
default learns something while the demo watches.

The pretraining is class-agnostic: every phantom (all classes) gets the one caption ``cfg.caption``, so, as
with SD 1.5 and BUSI, LoRA/TI adaptation has to learn the classes. Three phases, diffusers-style loops:

1. data: ``n_images`` phantoms (busdiff.data.phantom) rendered at ``render_size`` and resized to ``size``
   (bicubic, as fine-tuning resizes 256 px phantoms), plus ``n_held_out`` more for the VAE's PSNR;
2. VAE on random crops (it is fully convolutional; 5x cheaper than whole images): L1 + Laplacian-pyramid
   L1, which keeps edges and some of the high frequencies plain L1/MSE smooth away, + KL at 1e-4. With
   SD's near-zero KL the VAE was sharper (held-out PSNR 22.6 vs 22.0 dB) but the UNet's samples decoded
   to checkerboard noise: a smoother latent space is easier for a small UNet. Then the decoder is tied
   to grey output and the latent scaling factor 1/std is measured and written into the VAE config, as
   SD's 0.18215 was;
3. UNet on cached latents against the frozen text encoder: epsilon prediction, min-SNR weighting,
   ``caption_dropout`` empty captions for classifier-free guidance.

Deterministic by seed on the CPU: one torch thread, seeded generators for every random draw; the same
recipe gives byte-identical safetensors. :func:`pretrain_miniature` caches the result as a complete
diffusers StableDiffusionPipeline folder at ``<cache_dir>/<recipe hash16>/``, written atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.optimization import get_cosine_schedule_with_warmup
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from busdiff.config import MiniatureConfig
from busdiff.data.phantom import CLASSES, render_phantom
from busdiff.models.presets import (
    SD15_TEXT,
    SD15_UNET,
    SD15_VAE,
    build_tokenizer,
    components_from_configs,
)

__all__ = ["build_miniature", "cached_folder", "miniature_id", "pretrain_miniature", "recipe_hash"]

#: Bump when the training code changes what a recipe produces: it is part of the hash.
RECIPE_VERSION = 1


# --------------------------------------------------------------------------------------------------
# Recipe and cache


def recipe(cfg: MiniatureConfig) -> dict[str, Any]:
    """What determines the weights: every field but ``cache_dir``, and the code's recipe version."""
    return {"recipe_version": RECIPE_VERSION, **cfg.model_dump(exclude={"cache_dir"})}


def recipe_hash(cfg: MiniatureConfig) -> str:
    """First 16 hex digits of the sha256 of the canonical JSON of :func:`recipe`."""
    text = json.dumps(recipe(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def miniature_id(cfg: MiniatureConfig) -> str:
    """The base-model id adapters trained on this recipe record: ``busdiff-miniature-<hash16>``."""
    return f"busdiff-miniature-{recipe_hash(cfg)}"


def cached_folder(cfg: MiniatureConfig) -> Path:
    """Where the recipe's pipeline folder lives (whether or not it is there yet)."""
    return Path(cfg.cache_dir).expanduser() / recipe_hash(cfg)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path``: parallel callers (e.g. several Ray workers) train once, not N times."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """One torch thread (bit-identical reductions whatever the machine's core count; on a shared 2-core
    machine two threads were also several times slower), and the global RNG left as it was."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(before)


def pretrain_miniature(cfg: MiniatureConfig | None = None, progress_every_s: float = 5.0) -> Path:
    """The folder of the miniature base for ``cfg``: returned at once when cached, else pretrained (a few
    minutes on a CPU at the default recipe, progress printed every ``progress_every_s`` s) into a
    temporary folder that is renamed into place when complete, so no half folder is ever visible."""
    cfg = cfg or MiniatureConfig()
    final = cached_folder(cfg)
    if (final / "model_index.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    h = final.name
    with _locked(final.parent / f".{h}.lock"):
        if (final / "model_index.json").is_file():  # another process finished it while we waited
            return final
        if final.exists():
            raise FileExistsError(f"{final} exists but is not a miniature pipeline folder: remove it")
        for stale in final.parent.glob(f".tmp-{h}-*"):  # left by a killed run (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = final.parent / f".tmp-{h}-{os.getpid()}"
        print(f"[miniature] pretraining {miniature_id(cfg)} into {final} (cached for later runs)", flush=True)
        try:
            _pretrain_into(cfg, tmp, progress_every_s)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# --------------------------------------------------------------------------------------------------
# Components


def _seed(cfg: MiniatureConfig, purpose: int) -> int:
    """Independent seeds per purpose (init, VAE batches, UNet batches, ...) from the one recipe seed."""
    return int(np.random.SeedSequence([cfg.seed, purpose]).generate_state(1)[0])


def _groups(channels: list[int]) -> int:
    """GroupNorm groups: SD's 32 where every width allows it, else the largest power of two that does."""
    g = 32
    while any(c % g for c in channels):
        g //= 2
    return g


def _configs(cfg: MiniatureConfig, vocab_size: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """UNet, VAE and CLIP text configs: SD 1.5's, narrowed. Cross-attention on every UNet level but the
    first (the finest), like SD 1.5's three of four."""
    factor = 2 ** (len(cfg.vae_blocks) - 1)
    n = len(cfg.unet_blocks)
    unet = {
        **SD15_UNET,
        "sample_size": cfg.size // factor,
        "down_block_types": ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (n - 1),
        "up_block_types": ["CrossAttnUpBlock2D"] * (n - 1) + ["UpBlock2D"],
        "block_out_channels": list(cfg.unet_blocks),
        "layers_per_block": 1,
        "norm_num_groups": _groups(cfg.unet_blocks),
        "cross_attention_dim": cfg.text_hidden,
        # heads per level (diffusers' legacy name): 32 channels each; SD's 8 tiny heads ran 25% slower
        "attention_head_dim": [max(1, c // 32) for c in cfg.unet_blocks],
    }
    vae = {
        **SD15_VAE,
        "down_block_types": ["DownEncoderBlock2D"] * len(cfg.vae_blocks),
        "up_block_types": ["UpDecoderBlock2D"] * len(cfg.vae_blocks),
        "block_out_channels": list(cfg.vae_blocks),
        "layers_per_block": 1,
        "norm_num_groups": _groups(cfg.vae_blocks),
        "sample_size": cfg.size,
        "scaling_factor": 1.0,  # measured after the VAE trains
    }
    text = {
        **SD15_TEXT,
        "vocab_size": vocab_size,
        "hidden_size": cfg.text_hidden,
        "intermediate_size": 4 * cfg.text_hidden,
        "projection_dim": cfg.text_hidden,
        "num_hidden_layers": cfg.text_layers,
        "num_attention_heads": max(1, cfg.text_hidden // 16),
    }
    return unet, vae, text


def build_miniature(cfg: MiniatureConfig | None = None) -> dict[str, Any]:
    """Random-initialised (untrained) components of the recipe, the same for the same seed; keys are those
    of ``StableDiffusionPipeline(**components)``. The tokenizer is busdiff's generated CLIP BPE vocabulary
    (whole-word tokens for the prompts' words, byte fallback for anything else, room for TI tokens)."""
    cfg = cfg or MiniatureConfig()
    tokenizer = build_tokenizer()
    unet_cfg, vae_cfg, text_cfg = _configs(cfg, len(tokenizer))
    with _one_thread():
        return components_from_configs(unet_cfg, vae_cfg, text_cfg, tokenizer, _seed(cfg, 0))


# --------------------------------------------------------------------------------------------------
# Data


def phantom_images(cfg: MiniatureConfig, start: int, n_per_class: int) -> torch.Tensor:
    """Phantoms ``start+1 .. start+n_per_class`` of every class (write_phantom's numbering and seeds, with
    ``cfg.data_seed``), rendered at ``render_size``, resized to ``size``: float N×3×size×size in [-1, 1]."""
    out = []
    for ci, label in enumerate(CLASSES):
        for i in range(start + 1, start + n_per_class + 1):
            img, _ = render_phantom(label, np.random.default_rng([cfg.data_seed, ci, i]), cfg.render_size)
            im = Image.fromarray(img).resize((cfg.size, cfg.size), Image.Resampling.BICUBIC)
            out.append(np.asarray(im, dtype=np.float32))
    x = torch.from_numpy(np.stack(out)) / 127.5 - 1.0
    return x[:, None].expand(-1, 3, -1, -1).contiguous()  # grey as RGB, as the PNGs are read


# --------------------------------------------------------------------------------------------------
# Training


class _Progress:
    """Prints step, mean loss since the last line, and ETA every ``every_s`` seconds (and at the end)."""

    def __init__(self, phase: str, total: int, every_s: float) -> None:
        self.phase, self.total, self.every_s = phase, total, every_s
        self.t0 = self.last = time.perf_counter()
        self.losses: list[float] = []

    def step(self, i: int, loss: float) -> None:
        self.losses.append(loss)
        now = time.perf_counter()
        if now - self.last < self.every_s and i < self.total:
            return
        per_step = (now - self.t0) / i
        print(
            f"[miniature] {self.phase} step {i}/{self.total} loss {np.mean(self.losses):.4f} "
            f"{per_step:.2f} s/step ETA {per_step * (self.total - i):.0f} s",
            flush=True,
        )
        self.last, self.losses = now, []


def _laplacian_l1(a: torch.Tensor, b: torch.Tensor, levels: int = 3) -> torch.Tensor:
    """L1 between the Laplacian pyramids of ``a`` and ``b`` (band-pass detail at 1, 1/2, 1/4 scale)."""
    loss = a.new_zeros(())
    for _ in range(levels):
        if min(a.shape[-2:]) < 2:
            break
        da, db = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)
        la = a - F.interpolate(da, scale_factor=2.0, mode="bilinear", align_corners=False)
        lb = b - F.interpolate(db, scale_factor=2.0, mode="bilinear", align_corners=False)
        loss = loss + (la - lb).abs().mean()
        a, b = da, db
    return loss


def _random_batch(x: torch.Tensor, bs: int, crop: int, g: torch.Generator) -> torch.Tensor:
    """``bs`` random images of ``x``, each cropped at random to ``crop`` px and mirrored half the time."""
    idx = torch.randint(len(x), (bs,), generator=g)
    offs = torch.randint(x.shape[-1] - crop + 1, (bs, 2), generator=g)
    flip = torch.rand(bs, generator=g) < 0.5
    out = []
    for i, (y0, x0), f in zip(idx.tolist(), offs.tolist(), flip.tolist(), strict=True):
        c = x[i, :, y0 : y0 + crop, x0 : x0 + crop]
        out.append(c.flip(-1) if f else c)
    return torch.stack(out)


def _adamw(params: Any, lr: float, steps: int) -> tuple[torch.optim.Optimizer, Any]:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    return opt, get_cosine_schedule_with_warmup(opt, min(50, steps // 10), steps)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean per-image PSNR (dB) of images in [-1, 1], on the [0, 1] scale."""
    mse = (((a - b) / 2.0) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1.0 / mse)).mean())


def train_vae(vae: AutoencoderKL, images: torch.Tensor, cfg: MiniatureConfig, every_s: float) -> float:
    """Trains ``vae`` in place on random crops; returns the mean loss of the last 10% of steps."""
    g = torch.Generator().manual_seed(_seed(cfg, 1))
    opt, sched = _adamw(vae.parameters(), cfg.vae_lr, cfg.vae_steps)
    progress, tail = _Progress("vae", cfg.vae_steps, every_s), []
    vae.train()
    for step in range(1, cfg.vae_steps + 1):
        x = _random_batch(images, cfg.vae_batch_size, cfg.vae_crop, g)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        loss = (rec - x).abs().mean() + cfg.vae_edge_weight * _laplacian_l1(rec, x)
        loss = loss + cfg.vae_kl_weight * post.kl().mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        progress.step(step, loss.item())
        tail.append(loss.item())
    vae.eval()
    return float(np.mean(tail[-max(1, len(tail) // 10) :]))


@torch.no_grad()
def _grey_output(vae: AutoencoderKL) -> None:
    """Every phantom is grey (R = G = B): tie the decoder's three output channels to their mean, so that
    it draws only grey. Off-manifold latents (early or imperfect samples) otherwise decode to colour casts;
    on grey images it changes little but noise (held-out PSNR 22.50 -> 22.61 dB, measured)."""
    conv = vae.decoder.conv_out
    conv.weight.copy_(conv.weight.mean(0, keepdim=True).expand_as(conv.weight))
    conv.bias.fill_(float(conv.bias.mean()))


@torch.no_grad()
def encode(vae: AutoencoderKL, images: torch.Tensor, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (unscaled latents)."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        d = vae.encode(images[i : i + batch]).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def encode_prompts(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str]) -> torch.Tensor:
    """The text encoder's last hidden states, as StableDiffusionPipeline computes them (padded to 77)."""
    n = tokenizer.model_max_length
    ids = tokenizer(prompts, padding="max_length", max_length=n, truncation=True, return_tensors="pt")
    return text_encoder(ids.input_ids)[0]


def train_unet(
    unet: UNet2DConditionModel,
    latents: tuple[torch.Tensor, torch.Tensor],
    context: torch.Tensor,
    noise_scheduler: DDPMScheduler,
    cfg: MiniatureConfig,
    every_s: float,
) -> float:
    """Trains ``unet`` in place on scaled latents (mean, std: a fresh posterior sample each step) against
    ``context`` = [caption, empty caption] hidden states; returns the mean loss of the last 10% of steps."""
    g = torch.Generator().manual_seed(_seed(cfg, 2))
    mean, std = latents
    alphas = noise_scheduler.alphas_cumprod
    opt, sched = _adamw(unet.parameters(), cfg.unet_lr, cfg.unet_steps)
    progress, tail = _Progress("unet", cfg.unet_steps, every_s), []
    bs = cfg.unet_batch_size
    unet.train()
    for step in range(1, cfg.unet_steps + 1):
        idx = torch.randint(len(mean), (bs,), generator=g)
        z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(noise_scheduler.config.num_train_timesteps, (bs,), generator=g)
        drop = (torch.rand(bs, generator=g) < cfg.caption_dropout).long()
        pred = unet(noise_scheduler.add_noise(z, noise, t), t, context[drop]).sample
        snr = alphas[t] / (1 - alphas[t])
        weight = snr.clamp(max=cfg.snr_gamma) / snr  # min-SNR-gamma for epsilon prediction
        loss = (weight * F.mse_loss(pred, noise, reduction="none").mean((1, 2, 3))).mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        progress.step(step, loss.item())
        tail.append(loss.item())
    unet.eval()
    return float(np.mean(tail[-max(1, len(tail) // 10) :]))


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {m.__name__: m.__version__ for m in (torch, diffusers, transformers)}


def _pretrain_into(cfg: MiniatureConfig, out: Path, every_s: float) -> None:
    """All three phases; writes the pipeline folder, recipe.json and metrics.json into ``out``."""
    seconds: dict[str, float] = {}
    t0, cpu0 = time.perf_counter(), time.process_time()
    with _one_thread():
        n_per_class = -(-cfg.n_images // len(CLASSES))
        train = phantom_images(cfg, 0, n_per_class)
        held = phantom_images(cfg, n_per_class, -(-cfg.n_held_out // len(CLASSES)))
        seconds["data"] = time.perf_counter() - t0

        comps = build_miniature(cfg)
        vae, unet = comps["vae"], comps["unet"]
        t = time.perf_counter()
        vae.requires_grad_(True)
        vae_loss = train_vae(vae, train, cfg, every_s)
        vae.requires_grad_(False)
        _grey_output(vae)
        with torch.no_grad():
            rec = vae.decode(vae.encode(held).latent_dist.mode()).sample.clamp(-1, 1)
        vae_psnr = psnr(rec, held)
        # Latents of every image and its mirror image (the UNet's flip augmentation), and SD's scale:
        # 1/std, so the UNet sees unit-variance latents.
        mean, std = encode(vae, torch.cat([train, train.flip(-1)]))
        scale = float(1.0 / mean.std())
        vae.register_to_config(scaling_factor=scale)
        seconds["vae"] = time.perf_counter() - t
        print(f"[miniature] vae: held-out PSNR {vae_psnr:.2f} dB, latent scale {scale:.4f}", flush=True)

        # The text encoder stays frozen at its random initialisation: with one caption for every image
        # there is nothing for it to learn here (training it would only fit a constant), and, as with
        # SD 1.5's frozen CLIP, fine-tuning must then carry the classes through cross-attention (LoRA)
        # and new token embeddings (TI). A fixed random CLIP still maps different prompts to different,
        # token-sensitive hidden states.
        context = encode_prompts(comps["tokenizer"], comps["text_encoder"], [cfg.caption, ""])
        t = time.perf_counter()
        unet.requires_grad_(True)
        noise_scheduler = DDPMScheduler.from_config(comps["scheduler"].config)
        unet_loss = train_unet(unet, (mean * scale, std * scale), context, noise_scheduler, cfg, every_s)
        unet.requires_grad_(False)
        seconds["unet"] = time.perf_counter() - t

        t = time.perf_counter()
        pipe = StableDiffusionPipeline(**comps, requires_safety_checker=False)
        pipe.save_pretrained(out, safe_serialization=True)
        seconds["save"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    cpu_seconds = time.process_time() - cpu0  # wall time on an idle core; wall on a shared machine is more
    n_params = {k: sum(p.numel() for p in comps[k].parameters()) for k in ("unet", "vae", "text_encoder")}
    metrics = {
        "vae_psnr_held_out_db": round(vae_psnr, 3),
        "vae_final_loss": vae_loss,
        "unet_final_loss": unet_loss,
        "scaling_factor": scale,
        "parameters": n_params,
        "n_train": len(train),
        "n_held_out": len(held),
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "cpu_seconds": round(cpu_seconds, 2),
    }
    info = {"id": miniature_id(cfg), "hash": recipe_hash(cfg), "recipe": recipe(cfg), "versions": _versions()}
    (out / "recipe.json").write_text(json.dumps(info, indent=2) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(
        f"[miniature] done: {seconds['total']:.0f} s, VAE PSNR {vae_psnr:.2f} dB, UNet loss {unet_loss:.4f}",
        flush=True,
    )
