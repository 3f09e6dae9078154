"""The Ray Data graph of generation, and ``run_generate(cfg)``:

    from_items(plan rows not yet in the sink)
      -> map_batches(Text2Img, actor pool)            (or: read the real images of generate.source)
      -> map_batches(Img2Img, actor pool)             (generate.refine)
      -> map_batches(write_batch, tasks)              PNGs + a journal part per batch
      -> the driver collects small rows for the summary

Needs a connected Ray cluster (busdiff.raycluster.connect); the library never calls ray.init.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from busdiff.config import BusdiffConfig, ConfigError, GenerateConfig, dump_config
from busdiff.generate.masks import condition_masks
from busdiff.generate.plan import Plan, build_plan
from busdiff.generate.sink import MASKS, METADATA, SAMPLES, TEXT2IMG, Sink, write_batch
from busdiff.generate.stages import Img2Img, Text2Img, read_source_images
from busdiff.provenance import package_versions
from busdiff.storage import absolute, write_text

STAGES = (("text2img", "t2i"), ("img2img", "img2img"), ("write", "write"))


@dataclass
class StageStats:
    images: int
    seconds: float  # from the stage's first batch start to its last batch end
    images_per_s: float  # images / seconds: the rate the stage kept up (waits for input included)
    busy_seconds: float = 0.0  # summed over the stage's batches (its workers' compute time)
    busy_images_per_s: float = 0.0  # images / busy_seconds: what one worker of the stage does


@dataclass
class GenerateResult:
    out: str
    planned: int
    skipped: int  # already in the sink
    written: int
    seconds: float
    images_per_s: float  # written / seconds (the whole run, actor start-up included)
    busy_seconds: float = 0.0  # from the first model call to the last file written (start-up excluded)
    stages: dict[str, StageStats] = field(default_factory=dict)
    metadata: str = ""
    recipe_hash: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pool(ray: Any, actors: int | tuple[int, int]) -> Any:
    if isinstance(actors, int):
        return ray.data.ActorPoolStrategy(size=actors)
    return ray.data.ActorPoolStrategy(min_size=actors[0], max_size=actors[1])


def check_recipe(sink: Sink, plan: Plan, out: str) -> None:
    """One recipe per sink: refuse to add images made another way to ``out``."""
    if not sink.exists("plan.json"):
        return
    old = json.loads(sink.read_bytes("plan.json"))
    if old.get("recipe_hash") == plan.recipe_hash or sink.read_metadata().num_rows == 0:
        return  # same recipe, or nothing written yet
    before, after = old.get("recipe", {}), plan.recipe
    diff = [
        f"{k}: {before.get(k)!r} -> {after.get(k)!r}"
        for k in sorted(set(before) | set(after))
        if before.get(k) != after.get(k)
    ]
    raise ConfigError(
        f"generate.out={out!r} already holds images of another recipe (hash {old.get('recipe_hash')}, now "
        f"{plan.recipe_hash}); differences: {'; '.join(diff)}. Choose another generate.out, or delete it"
    )


def _stage_stats(rows: list[dict[str, Any]]) -> dict[str, StageStats]:
    stats = {}
    for name, key in STAGES:
        spans = [(r[f"{key}_t0"], r[f"{key}_t1"]) for r in rows if f"{key}_t0" in r]
        if spans:
            n = len(spans)
            seconds = max(b for _, b in spans) - min(a for a, _ in spans)
            busy = sum(b - a for a, b in set(spans))  # each batch once: its rows share (t0, t1)
            stats[name] = StageStats(
                n,
                round(seconds, 3),
                round(n / max(seconds, 1e-9), 3),
                round(busy, 3),
                round(n / max(busy, 1e-9), 3),
            )
    return stats


def _busy_seconds(rows: list[dict[str, Any]]) -> float:
    starts = [r[k] for r in rows for k in ("t2i_t0", "img2img_t0") if k in r]
    return round(max(r["write_t1"] for r in rows) - min(starts), 3) if starts else 0.0


def resource_warnings(g: GenerateConfig, mode: str, cluster: dict[str, float]) -> list[str]:
    """What would leave the run waiting forever on this cluster: an actor asking for more CPUs or GPUs than
    the cluster has (right for an autoscaling cluster that adds them on demand, a hang on a fixed one), or
    actor pools that leave no CPU for the writer tasks."""
    pools = ([("text2img", g.text2img)] if mode == "text2img" else []) + ([("img2img", g.img2img)] * g.refine)
    out = []
    for name, pool in pools:
        for res, need in (("CPU", pool.num_cpus), ("GPU", pool.num_gpus)):
            have = cluster.get(res, 0)
            if need > have:
                out.append(
                    f"generate.{name}.num_{res.lower()}s={need:g} but the cluster has {have:g} {res}s now: "
                    "the run waits until an autoscaler adds them (a fixed cluster never does)"
                )
    lo = sum((p.actors if isinstance(p.actors, int) else p.actors[0]) * p.num_cpus for _, p in pools)
    if cluster.get("CPU", 0) - lo < g.writer_num_cpus:
        out.append(
            f"the actor pools take {lo:g} of the cluster's {cluster.get('CPU', 0):g} CPUs, leaving less than "
            f"generate.writer_num_cpus={g.writer_num_cpus:g} for the writer: the run may stall"
        )
    return out


def build_dataset(cfg: BusdiffConfig, plan: Plan, rows: list[dict[str, Any]], out: str) -> Any:
    """The Ray Data graph over ``rows`` (plan rows), ending in the sink at ``out``; lazy until consumed."""
    import ray

    g = cfg.generate
    # Workers may run in another directory than the driver: give them absolute paths.
    adapters = absolute(g.adapters) if g.adapters else None
    model = cfg.model.model_dump()
    common = dict(scheduler=g.scheduler, adapters=adapters, channels_last=g.channels_last, compile=g.compile)
    if g.controlnet is not None:
        cn = g.controlnet
        local = cn.model != "preset" and Path(cn.model).expanduser().exists()  # else "preset" or a hub id
        common["controlnet"] = dict(model=absolute(cn.model) if local else cn.model,
                                    conditioning=cn.conditioning, scale=cn.scale)
    # Ray Data's actor pools restart dead actors and retry their lost batches without limit by default
    # (max_restarts=-1, max_task_retries=-1 in ray 2.60); only a chosen cap is passed on.
    retries = {} if g.max_task_retries == -1 else dict(max_task_retries=g.max_task_retries)
    first = g.text2img if plan.mode == "text2img" else g.img2img
    ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / first.batch_size)))
    if plan.mode == "refine":
        ds = ds.map_batches(
            read_source_images,
            fn_kwargs=dict(size=g.size),
            batch_size=first.batch_size,
            num_cpus=g.writer_num_cpus,
        )
    else:
        if g.controlnet is not None:  # each row's conditioning mask, read and transformed beside the actors
            ds = ds.map_batches(condition_masks, fn_kwargs=dict(size=g.size), batch_size=first.batch_size,
                                num_cpus=g.writer_num_cpus)
        # Latents go on to img2img with the latent hand-off; they are decoded too only to keep the images.
        latent = g.refine and g.handoff == "latent"
        output = ("both" if g.keep_text2img else "latent") if latent else "image"
        ds = ds.map_batches(
            Text2Img,
            fn_constructor_kwargs=dict(
                model=model, steps=g.steps, guidance=g.guidance, size=g.size, output=output, **common
            ),
            batch_size=g.text2img.batch_size,
            num_cpus=g.text2img.num_cpus,
            num_gpus=g.text2img.num_gpus,
            compute=_pool(ray, g.text2img.actors),
            **retries,
        )
    if g.refine:
        ds = ds.map_batches(
            Img2Img,
            fn_constructor_kwargs=dict(
                model=model, steps=g.refine_steps, guidance=g.refine_guidance, strength=g.strength, **common
            ),
            batch_size=g.img2img.batch_size,
            num_cpus=g.img2img.num_cpus,
            num_gpus=g.img2img.num_gpus,
            compute=_pool(ray, g.img2img.actors),
            **retries,
        )
    t2i = plan.mode == "text2img"
    static = {  # provenance columns shared by every row of the run
        "scheduler": g.scheduler,
        "steps": g.steps if t2i else 0,
        "guidance": g.guidance if t2i else 0.0,
        "strength": g.strength if g.refine else 0.0,
        "refine_steps": g.refine_steps if g.refine else 0,
        "refine_guidance": g.refine_guidance if g.refine else 0.0,
        "handoff": plan.recipe["img2img"]["handoff"] if g.refine else "",
        "base_model": plan.base_model,
        "adapter_hash": plan.adapter_hash,
        "plan": g.name,
        "recipe_hash": plan.recipe_hash,
        "controlnet": (plan.recipe.get("controlnet") or {}).get("model", ""),
    }
    return ds.map_batches(
        write_batch,
        fn_kwargs=dict(out=out, static=static, keep_text2img=g.keep_text2img),
        batch_size=None,
        num_cpus=g.writer_num_cpus,
    )


def _plan_json(cfg: BusdiffConfig, plan: Plan) -> bytes:
    """plan.json as this run writes it."""
    g = cfg.generate
    plan_json = {
        "name": g.name,
        "recipe_hash": plan.recipe_hash,
        "recipe": plan.recipe,
        "counts": plan.counts,
        "tokens": plan.tokens,
        "adapters": g.adapters,
        "provenance": plan.provenance(),
        "packages": package_versions(),
    }
    return (json.dumps(plan_json, indent=2) + "\n").encode()


def finished_result(cfg: BusdiffConfig, plan: Plan) -> GenerateResult | None:
    """The answer of a sink that already holds this very run, else None (then run_generate makes what is
    missing, or refuses another recipe, as before). Finished: config.yaml and plan.json hold what this run
    would write, summary.json is a finished run's of this plan, and samples/metadata.parquet lists every
    planned id with its PNG (and with keep_text2img its text2img PNG) present. Reads those files and lists
    the image folders; decodes no image, writes nothing, needs no Ray."""
    t0 = time.time()
    sink, meta_rel = Sink(cfg.generate.out), f"{SAMPLES}/{METADATA}"
    wanted = {"config.yaml": dump_config(cfg).encode(), "plan.json": _plan_json(cfg, plan)}
    if not all(sink.exists(rel) and sink.read_bytes(rel) == data for rel, data in wanted.items()):
        return None
    if not (sink.exists("summary.json") and sink.exists(meta_rel)):
        return None
    summary = json.loads(sink.read_bytes("summary.json"))
    if (summary.get("recipe_hash"), summary.get("planned")) != (plan.recipe_hash, len(plan.rows)):
        return None
    masks = cfg.generate.controlnet is not None  # (a sink of such a recipe has the mask columns)
    columns = ["id", "file_name", "text2img_path"] + (["mask_path"] if masks else [])
    meta = pq.read_table(pa.BufferReader(sink.read_bytes(meta_rel)), columns=columns).to_pylist()
    listed = [
        sink.fs.get_file_info(pafs.FileSelector(f"{sink.root}/{d}", allow_not_found=True, recursive=True))
        for d in (SAMPLES, TEXT2IMG, MASKS)
    ]
    present = {f.path for files in listed for f in files}
    done = {
        m["id"]
        for m in meta
        if f"{sink.root}/{SAMPLES}/{m['file_name']}" in present
        and (not cfg.generate.keep_text2img or f"{sink.root}/{m['text2img_path']}" in present)
        and (not masks or f"{sink.root}/{m['mask_path']}" in present)
    }
    if not set(plan.ids) <= done:
        return None
    n, seconds = len(plan.rows), round(time.time() - t0, 3)
    return GenerateResult(
        sink.out, n, n, 0, seconds, 0.0, metadata=sink.url(meta_rel), recipe_hash=plan.recipe_hash
    )


def format_finished(res: GenerateResult, plan: Plan) -> str:
    """The line a rerun of finished work prints."""
    return (f"generate: {res.out} already holds all {res.planned} planned images (recipe "
            f"{plan.recipe_hash}): nothing to do")


def run_generate(cfg: BusdiffConfig, plan: Plan | None = None, check_finished: bool = True) -> GenerateResult:
    """Generate the images of ``cfg.generate`` that the sink lacks; see the module docstring. A sink that
    already holds this run (:func:`finished_result`) answers at once and is left untouched
    (``check_finished=False``: the caller has just asked :func:`finished_result` itself)."""
    t_start = time.time()
    g = cfg.generate
    plan = plan or build_plan(cfg)  # every config error surfaces here, before any actor starts
    finished = finished_result(cfg, plan) if check_finished else None
    if finished is not None:
        print(format_finished(finished, plan), flush=True)
        return finished
    import ray

    sink = Sink(g.out)
    check_recipe(sink, plan, g.out)
    sink.remove_stale_temp_files()
    sink.write_if_changed("config.yaml", dump_config(cfg).encode())
    sink.write_if_changed("plan.json", _plan_json(cfg, plan))

    done = sink.written_ids(plan.ids, keep_text2img=g.keep_text2img)
    todo = [r for r in plan.rows if r["id"] not in done]
    print(
        f"generate: {len(plan.rows)} planned ({plan.mode}, recipe {plan.recipe_hash}), "
        f"{len(done)} already in {sink.out}, {len(todo)} to make",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    if todo:
        for warning in resource_warnings(g, plan.mode, ray.cluster_resources()):
            print(f"generate: warning: {warning}", flush=True)
        rows = list(build_dataset(cfg, plan, todo, sink.out).iter_rows())
    metadata = sink.consolidate()
    seconds = time.time() - t_start
    result = GenerateResult(
        out=sink.out,
        planned=len(plan.rows),
        skipped=len(done),
        written=len({r["id"] for r in rows}),
        seconds=round(seconds, 3),
        images_per_s=round(len(rows) / seconds, 3),
        busy_seconds=_busy_seconds(rows),
        stages=_stage_stats(rows),
        metadata=metadata,
        recipe_hash=plan.recipe_hash,
    )
    write_text(sink.url("summary.json"), json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def format_summary(res: GenerateResult) -> str:
    """The closing summary: counts, then images/s per stage."""
    lines = [
        f"generate: {res.written} written, {res.skipped} skipped (already there), {res.planned} planned; "
        f"{res.seconds:.1f} s, {res.images_per_s:.2f} images/s overall",
        f"  images: {res.out}/{SAMPLES}/<class>/<id>.png   metadata: {res.metadata}",
    ]
    if res.stages:
        lines.append(
            f"  {'stage':<10}{'images':>8}{'seconds':>10}{'images/s':>10}{'busy s':>10}"
            f"{'images/s per worker':>21}"
        )
        for name, s in res.stages.items():
            lines.append(
                f"  {name:<10}{s.images:>8}{s.seconds:>10.1f}{s.images_per_s:>10.2f}"
                f"{s.busy_seconds:>10.1f}{s.busy_images_per_s:>21.2f}"
            )
    return "\n".join(lines)
