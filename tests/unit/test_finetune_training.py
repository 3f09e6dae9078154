"""Training steps in one process (tiny model, 32 px, CPU): what trains and what must not, that the
placeholder reaches the text encoder, the paper's LoRA-then-TI order, and that a run resumed from a
checkpoint ends at the same weights as one that never stopped."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from busdiff.config import load_config
from busdiff.data.phantom import write_phantom
from busdiff.finetune.data import EpochBatches, shard_bounds
from busdiff.finetune.learner import Learner
from busdiff.finetune.model import TI_KEY, FinetuneModel
from busdiff.finetune.plain import local_rows, plain_train
from busdiff.finetune.recipe import phases
from busdiff.finetune.trainer import prepare
from busdiff.finetune.validation import validation_images
from busdiff.generate.prompts import render_prompt
from busdiff.models.presets import build_components

CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    """Every test here runs on one torch thread (tests/conftest.py says why)."""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft") / "busi"
    write_phantom(root, 4, seed=3, size=64)
    base = [
        f"data.root={root}",
        "model.preset=tiny",
        "finetune.resolution=32",
        "finetune.mixed_precision=no",
        "finetune.lora.batch_size=2",
        "finetune.ti.batch_size=2",
        "finetune.ti.grad_accum=1",
        "finetune.lora.lr=1e-2",
        "finetune.ti.lr=1e-2",
        "finetune.lora.steps=3",
        "finetune.ti.steps=3",
    ]
    cfg = load_config(None, base)
    return base, local_rows(cfg, prepare(cfg).records)


def _cfg(data, *sets):
    return load_config(None, [*data[0], *sets])


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _trainable(model: FinetuneModel) -> dict[str, torch.Tensor]:
    """A copy: on a CPU in float32, trainable_state() holds the live parameters themselves."""
    return {k: v.clone() for k, v in model.trainable_state().items()}


def test_ti_trains_only_the_placeholder_rows(data):
    cfg = _cfg(data, "finetune.method=ti")
    model = FinetuneModel(cfg, CPU)
    unet, text = _snapshot(model.unet), _snapshot(model.text_encoder)
    emb_before = model.embeddings.detach().clone()
    plain_train(cfg, data[1], model=model)
    emb = model.embeddings.detach()
    others = torch.ones(emb.shape[0], dtype=torch.bool)
    others[model.token_ids] = False
    assert torch.equal(emb[others], emb_before[others])  # bit-identical, every other row
    assert not torch.equal(emb[model.token_ids], emb_before[model.token_ids])
    after = _snapshot(model.text_encoder)
    assert [k for k in text if not torch.equal(after[k], text[k])] == ["embeddings.token_embedding.weight"]
    assert all(torch.equal(v, unet[k]) for k, v in _snapshot(model.unet).items())


def test_token_ids_reach_the_text_encoder(data):
    cfg = _cfg(data, "finetune.method=ti", "finetune.ti.num_vectors=2")
    model = FinetuneModel(cfg, CPU)
    seen: list[torch.Tensor] = []
    model.text_encoder.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0]))
    plain_train(cfg, data[1], model=model, stop=1)
    ids = model.tokenizer.convert_tokens_to_ids(["<bus>", "<bus>_1"])
    assert seen and all((batch == ids[0]).any(1).all() and (batch == ids[1]).any(1).all() for batch in seen)
    # The multi-vector caption is what a diffusers pipeline makes of the same prompt at generation time.
    pipe = model.pipeline()
    for label, caption in model.captions.items():
        assert pipe.maybe_convert_prompt(render_prompt(label, "<bus>"), model.tokenizer) == caption


def test_lora_then_ti_trains_lora_first_then_only_the_token(data):
    cfg = _cfg(data, "finetune.method=lora-then-ti")
    model = FinetuneModel(cfg, CPU)
    init_row = model.embeddings[model.tokenizer.convert_tokens_to_ids("ultrasound</w>")].detach().clone()
    lora0 = {n: p.detach().clone() for n, p in model.lora_parameters()}
    plain_train(cfg, data[1], model=model, stop=3)  # the LoRA phase
    lora1 = {n: p.detach().clone() for n, p in model.lora_parameters()}
    assert any(not torch.equal(lora0[n], lora1[n]) for n in lora0)
    assert torch.equal(model.embeddings[model.token_ids[0]], init_row)  # the token starts as "ultrasound"
    plain_train(cfg, data[1], model=model, start=3)  # the TI phase, LoRA frozen
    assert all(torch.equal(p, lora1[n]) for n, p in model.lora_parameters())
    assert not torch.equal(model.embeddings[model.token_ids[0]], init_row)


def test_pivotal_lora_plus_ti_trains_both_at_once(data):
    cfg = _cfg(data, "finetune.method=lora+ti", "finetune.lora.steps=2")
    model = FinetuneModel(cfg, CPU)
    lora0 = {n: p.detach().clone() for n, p in model.lora_parameters()}
    row0 = model.embeddings[model.token_ids].detach().clone()
    run = plain_train(cfg, data[1], model=model)
    assert len(run.losses) == 2 and all(np.isfinite(run.losses))
    assert any(not torch.equal(lora0[n], p) for n, p in model.lora_parameters())
    assert not torch.equal(model.embeddings[model.token_ids], row0)


def test_text_encoder_lora_trains_and_plain_diffusers_loads_it(data, tmp_path):
    from diffusers import StableDiffusionPipeline

    cfg = _cfg(data, "finetune.method=lora", "finetune.lora.text_encoder=true", "finetune.lora.steps=2")
    model = FinetuneModel(cfg, CPU)
    te_lora0 = {n: p.detach().clone() for n, p in model.lora_parameters() if n.startswith("text_encoder.")}
    te_base0 = {k: v.clone() for k, v in _snapshot(model.text_encoder).items() if "lora_" not in k}
    assert te_lora0, "no LoRA on the text encoder"
    plain_train(cfg, data[1], model=model)
    te_lora1 = {n: p for n, p in model.lora_parameters() if n.startswith("text_encoder.")}
    assert any(not torch.equal(te_lora0[n], te_lora1[n]) for n in te_lora0)
    te_base1 = _snapshot(model.text_encoder)
    assert all(torch.equal(v, te_base1[k]) for k, v in te_base0.items()), "text encoder base weights changed"

    meta = model.save_adapter(tmp_path / "adapter", trained_ids=["benign_0001"], extra={})
    assert meta["lora"]["text_encoder"]["tensors"] == len(te_lora0)
    trained = model.pipeline()
    plain = StableDiffusionPipeline(**build_components("tiny"), requires_safety_checker=False)
    plain.set_progress_bar_config(disable=True)

    def image(pipe):
        return pipe(
            render_prompt("benign"),
            num_inference_steps=2,
            height=32,
            width=32,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images[0]

    base = image(plain)
    plain.load_lora_weights(str(tmp_path / "adapter"))
    loaded, expected = image(plain), image(trained)
    np.testing.assert_allclose(loaded, expected, atol=1e-4)
    assert np.abs(loaded - base).max() > 1e-3


RESUME_SETS = (
    "finetune.method=lora-then-ti",
    "finetune.lora.steps=2",
    "finetune.ti.steps=2",
    "finetune.lora.grad_accum=2",
    "finetune.lora.dropout=0.1",
)


@pytest.fixture(scope="module")
def uninterrupted(data):
    return plain_train(_cfg(data, *RESUME_SETS), data[1]).model.trainable_state()


@pytest.mark.parametrize("resume_at", [1, 2, 3])  # inside the LoRA phase, at the boundary, inside TI
def test_resumed_run_ends_at_the_same_weights(data, uninterrupted, tmp_path, resume_at):
    cfg = _cfg(data, *RESUME_SETS)

    def checkpoint(step, learner):
        if step == resume_at:  # what the Ray Train loop writes: trainable tensors and learner state
            save_file(learner.model.trainable_state(), str(tmp_path / "trainable.safetensors"))
            torch.save(learner.state_dict(), tmp_path / "learner.pt")

    plain_train(cfg, data[1], stop=resume_at, on_step=checkpoint)
    fresh = FinetuneModel(cfg, CPU)  # a new process builds the model from scratch
    fresh.load_trainable_state(load_file(str(tmp_path / "trainable.safetensors")))
    state = torch.load(tmp_path / "learner.pt", weights_only=True)
    plain_train(cfg, data[1], model=fresh, start=resume_at, learner_state=state)
    resumed = fresh.trainable_state()
    assert resumed.keys() == uninterrupted.keys()
    for k in uninterrupted:  # the same operations in the same order on the CPU: bit-identical
        assert torch.equal(resumed[k], uninterrupted[k]), k


def test_seed_changes_the_weights(data):
    a = plain_train(_cfg(data, "finetune.method=lora", "finetune.lora.steps=1"), data[1]).model
    b = plain_train(
        _cfg(data, "finetune.method=lora", "finetune.lora.steps=1", "finetune.seed=1"), data[1]
    ).model
    sa, sb = a.trainable_state(), b.trainable_state()
    assert any(not torch.equal(sa[k], sb[k]) for k in sa)


def test_min_snr_weighting_and_noise_offset_change_the_loss(data):
    rows = data[1]
    x = torch.from_numpy(np.stack([r["image"] for r in rows[:2]])).permute(0, 3, 1, 2).float() / 127.5 - 1
    labels = [r["label"] for r in rows[:2]]
    model = FinetuneModel(_cfg(data, "finetune.method=lora"), CPU)
    model.set_phase(phases(model.cfg.finetune)[0])
    ft = model.cfg.finetune

    def loss(snr_gamma=None, noise_offset=0.0):
        ft.snr_gamma, ft.noise_offset = snr_gamma, noise_offset
        with torch.no_grad():
            return float(model.loss(x, labels, torch.Generator().manual_seed(5)))

    plain = loss()
    assert loss(snr_gamma=1e9) == pytest.approx(plain, rel=1e-6)  # min(snr, huge) / snr = 1
    assert loss(snr_gamma=1.0) < plain  # weights min(snr, 1) / snr <= 1
    assert loss(noise_offset=0.5) != pytest.approx(plain, rel=1e-6)


def test_micro_batches_are_seeded_and_use_each_row_once_per_epoch(data):
    rows = data[1][:5]  # a worker with one row more than the others: per_epoch from the smallest shard
    assert shard_bounds(9, 2) == (4, 5)

    def batches(seed=0, rank=0):
        eb = EpochBatches(rows, 2, 2, seed, rank, 32, random_flip=True, random_crop=True)
        return [eb.get(0, m) for m in range(6)]

    a, b = batches(), batches()
    for (xa, la, ia), (xb, lb, ib) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and la == lb and ia == ib
        assert xa.shape == (2, 3, 32, 32) and xa.min() >= -1 and xa.max() <= 1
    for epoch in range(3):
        ids = a[2 * epoch][2] + a[2 * epoch + 1][2]
        assert len(set(ids)) == 4  # 4 of the 5 rows, none twice
    left_out = [({r["id"] for r in rows} - set(a[2 * e][2] + a[2 * e + 1][2])).pop() for e in range(3)]
    assert len(set(left_out)) > 1 or len({tuple(a[2 * e][2]) for e in range(3)}) > 1
    assert [i for _, _, i in batches(rank=1)] != [i for _, _, i in a]


def test_lora_init_follows_finetune_seed_on_a_pretrained_base(data, tmp_path):
    from diffusers import StableDiffusionPipeline

    base = tmp_path / "base"  # loading it draws nothing from torch's RNG, unlike the seeded tiny preset
    StableDiffusionPipeline(**build_components("tiny"), requires_safety_checker=False).save_pretrained(base)

    def start(seed: int) -> dict[str, torch.Tensor]:
        sets = ("model.preset=pretrained", f"model.base={base}", "finetune.lora.text_encoder=true")
        cfg = _cfg(data, "finetune.method=lora", *sets, f"finetune.seed={seed}")
        return FinetuneModel(cfg, CPU).trainable_state()

    a, b, c = start(0), start(0), start(1)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    gaussian = [k for k in a if "lora_A" in k]  # lora_B starts at zero whatever the seed
    assert any(k.startswith("text_encoder.") for k in gaussian)
    assert all(not torch.equal(a[k], c[k]) for k in gaussian)


def _count_forwards(module: torch.nn.Module, counts: dict[str, int], key: str) -> None:
    counts[key] = 0
    module.register_forward_hook(lambda *_: counts.__setitem__(key, counts[key] + 1))


def test_gradient_checkpointing_recomputes_unet_and_text_encoder_blocks(data):
    def one_step(checkpointing: str) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
        sets = ("finetune.method=lora+ti", "finetune.lora.steps=1")
        cfg = _cfg(data, *sets, f"finetune.gradient_checkpointing={checkpointing}")
        model = FinetuneModel(cfg, CPU)
        counts: dict[str, int] = {}
        # Early modules of checkpointed blocks that gradients pass through (after the first LoRA / the
        # placeholder rows): backward runs them again (and stops recomputing after the block's last saved
        # tensor, so not a block's last module).
        _count_forwards(model.unet.up_blocks[0].resnets[0].conv1, counts, "unet")
        _count_forwards(model.text_encoder.encoder.layers[0].layer_norm1, counts, "text_encoder")
        plain_train(cfg, data[1], model=model)
        return counts, _trainable(model)

    (off, w_off), (on, w_on) = one_step("false"), one_step("true")
    assert off == {"unet": 1, "text_encoder": 1}
    assert on == {"unet": 2, "text_encoder": 2}
    for k in w_off:  # memory for compute: the same weights
        assert torch.equal(w_on[k], w_off[k]), k


def test_validation_prompts_reach_the_text_encoder_as_in_training(data):
    cfg = _cfg(data, "finetune.method=ti", "finetune.ti.num_vectors=2")
    model = FinetuneModel(cfg, CPU)
    seen: list[torch.Tensor] = []
    model.text_encoder.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.extend(args[0]))
    v = cfg.finetune.validation.model_copy(update={"n_per_class": 1, "steps": 1})
    validation_images(model, v, 32)
    with_token = [tuple(r.tolist()) for r in seen if (r == model.token_ids[0]).any()]
    assert sorted(with_token) == sorted(tuple(ids.tolist()) for ids in model.input_ids.values())


def test_lr_schedule_waits_for_steps_the_loss_scaler_skips(data, monkeypatch):
    cfg = _cfg(data, "finetune.method=lora", "finetune.lora.steps=4", "finetune.lr_scheduler=linear")
    model = FinetuneModel(cfg, CPU)
    learner = Learner(model, phases(cfg.finetune)[0], 0)
    learner.scaler = torch.amp.GradScaler("cpu")  # fp16's path (a GPU one); the scaler runs on CPU tensors
    batches = EpochBatches(data[1], 2, len(data[1]) // 2, 0, 0, 32, random_flip=False, random_crop=False)
    lr0, w0 = learner.lrs()["lr_lora"], _trainable(model)
    loss = model.loss
    monkeypatch.setattr(model, "loss", lambda *a: loss(*a) * float("inf"))  # gradients overflow, as in fp16
    learner.step(batches, 0)
    assert learner.scaler.get_scale() == 2.0**15  # the scaler skipped the update and backed off
    w1 = _trainable(model)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert learner.lrs()["lr_lora"] == lr0  # the schedule did not move either
    monkeypatch.setattr(model, "loss", loss)
    assert np.isfinite(learner.step(batches, 1))
    assert learner.lrs()["lr_lora"] == pytest.approx(0.75 * lr0)  # linear: 1 of 4 steps taken
    assert any(not torch.equal(w1[k], v) for k, v in model.trainable_state().items())


def test_bf16_mixed_precision_trains_and_validates_on_the_cpu(data):
    cfg = _cfg(data, "finetune.method=lora+ti", "finetune.lora.steps=2", "finetune.mixed_precision=bf16")
    model = FinetuneModel(cfg, CPU)
    assert model.vae.encoder.conv_in.weight.dtype == model.unet.conv_in.weight.dtype == torch.bfloat16
    assert {p.dtype for _, p in model.lora_parameters()} == {torch.float32}  # trainable weights stay fp32
    assert model.embeddings.dtype == torch.float32
    before = _trainable(model)
    run = plain_train(cfg, data[1], model=model)
    assert len(run.losses) == 2 and all(np.isfinite(run.losses))
    after = model.trainable_state()
    assert all(not torch.equal(before[k], after[k]) for k in after if "lora_B" in k or k == TI_KEY)
    v = cfg.finetune.validation.model_copy(update={"n_per_class": 1, "steps": 2})
    images = validation_images(model, v, 32)
    assert all(im.shape == (32, 32, 3) and im.std() > 0 for ims in images.values() for im in ims)


def test_cached_latents_encode_each_image_once_and_train_the_same_weights(data):
    sets = ("finetune.lora.steps=6", "finetune.ti.steps=4")  # more micro-batches than the rows: epochs repeat
    plain = _trainable(plain_train(_cfg(data, *sets), data[1]).model)
    cfg = _cfg(data, *sets, "finetune.cache_latents=true")
    model = FinetuneModel(cfg, CPU)
    encoded, encode = [], model.vae.encode
    model.vae.encode = lambda x, **kw: (encoded.append(len(x)), encode(x, **kw))[1]
    cached = _trainable(plain_train(cfg, data[1], model=model).model)
    rows, seen = len(data[1]), 2 * 10  # 10 micro-batches of 2 images, in both phases
    assert sum(encoded) == len(model._latent_cache) <= 2 * rows < seen  # each image (or its flip) once
    assert cached.keys() == plain.keys()
    # the same draws from the same Gaussians; only encoding an image in another batch may round otherwise
    for k in plain:
        torch.testing.assert_close(cached[k], plain[k], atol=1e-6, rtol=0, msg=k)


def test_cached_latents_refuse_random_crops(data):
    with pytest.raises(Exception, match="cache_latents needs crop: center"):
        _cfg(data, "finetune.cache_latents=true", "finetune.crop=random")
