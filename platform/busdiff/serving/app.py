"""The hybrid pipeline on Ray Serve: a FastAPI ingress and a batched, autoscaled model deployment.

    serve run serve/config.yaml              # or: busdiff serve CONFIG
    curl -X POST localhost:8000/v1/generate -H 'content-type: application/json' \\
         -d '{"class": "benign", "seed": 1}' -o benign.png
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at run time,
# and the request model is a local of build_app (limits come from the config).
import asyncio
import base64
import hashlib
import hmac
import io
import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from ray import serve
from ray.serve.exceptions import BackPressureError

from busdiff import __version__
from busdiff.config import BusdiffConfig, ConfigError, ModelConfig, ServeConfig
from busdiff.serving.gallery import GALLERY_HTML
from busdiff.serving.model import HybridModel, WorkItem
from busdiff.serving.schemas import (
    ClassName,
    ErrorResponse,
    GenerateResponse,
    ModelsResponse,
    generate_request_model,
)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _error(status: int, message: str, field: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message, "field": field})


@serve.deployment
class ModelDeployment:
    """One set of text2img + img2img components; single-image work items batched across requests."""

    def __init__(self, model: dict[str, Any], serve_cfg: dict[str, Any]) -> None:
        cfg = ServeConfig(**serve_cfg)
        self.model = HybridModel(ModelConfig(**model), cfg)
        self.generate_item.set_max_batch_size(cfg.max_batch_size if cfg.batching else 1)
        self.generate_item.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s if cfg.batching else 0.0)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def generate_item(self, items: list[WorkItem]) -> list[dict[str, Any]]:
        # The forward pass runs in a thread so the replica's event loop keeps answering health checks.
        results = await asyncio.to_thread(self.model.run, items)
        return [
            {"text2img": _png(r.text2img), "png": _png(r.refined), "metadata": r.metadata} for r in results
        ]

    async def refine(
        self, image_png: bytes, label: str, strength: float, steps: int, guidance: float, seed: int, size: int
    ) -> bytes:
        image = (
            Image.open(io.BytesIO(image_png)).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        )
        out = await asyncio.to_thread(
            self.model.refine_images, [image], [self.model.prompt(label)], strength, steps, guidance, [seed]
        )
        return _png(out[0])

    def describe(self) -> dict[str, Any]:
        return self.model.describe()

    def check_health(self) -> None:
        self.model.probe()


def _token_digest(cfg: ServeConfig) -> str | None:
    """sha256 of the bearer token (from the env var or the file), or None when auth is off.
    Only the digest travels to the replicas."""
    token = os.environ.get(cfg.auth_token_env, "")
    if cfg.auth_token_file:
        path = Path(cfg.auth_token_file)
        if not path.is_file():
            raise ConfigError(f"serve.auth_token_file: {path} does not exist")
        token = path.read_text().strip()
    if token:
        return hashlib.sha256(token.encode()).hexdigest()
    try:
        loopback = ipaddress.ip_address(cfg.host).is_loopback
    except ValueError:
        loopback = cfg.host == "localhost"
    if not loopback and not cfg.allow_unauthenticated_remote:
        raise ConfigError(
            f"serve.host={cfg.host!r} is reachable from the network but no auth token is set: set "
            f"${cfg.auth_token_env} or serve.auth_token_file (or serve.allow_unauthenticated_remote=true)"
        )
    return None


def build_app(cfg: BusdiffConfig) -> serve.Application:
    """The Serve application for ``cfg``: ingress + model deployment, options from ``cfg.serve``."""
    s = cfg.serve
    token_digest = _token_digest(s)
    GenerateRequest = generate_request_model(s)  # noqa: N806 - a class
    api = FastAPI(
        title="busdiff",
        version=__version__,
        description="Hybrid diffusion augmentation of breast ultrasound images (text2img + img2img).",
    )

    @api.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return _error(400, f"malformed JSON body: {first.get('ctx', {}).get('error', 'cannot parse')}")
        field = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return _error(422, f"{field or 'request'}: {first.get('msg', 'invalid request')}", field)

    unauthorized = {401: {"model": ErrorResponse}}
    busy = {503: {"model": ErrorResponse}, 422: {"model": ErrorResponse}}

    @serve.deployment
    @serve.ingress(api)
    class Ingress:
        def __init__(self, model: Any) -> None:
            self.model = model

        def _denied(self, request: Request) -> JSONResponse | None:
            if token_digest is None:
                return None
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            digest = hashlib.sha256(token.strip().encode()).hexdigest()
            if scheme.lower() != "bearer" or not hmac.compare_digest(digest, token_digest):
                return _error(401, "missing or wrong bearer token (Authorization: Bearer <token>)")
            return None

        @api.get("/", response_class=HTMLResponse, include_in_schema=False)
        async def gallery(self) -> HTMLResponse:
            return HTMLResponse(GALLERY_HTML)

        @api.get("/healthz")
        async def healthz(self) -> dict[str, str]:
            return {"status": "ok"}

        @api.get("/readyz", responses={503: {"model": ErrorResponse}})
        async def readyz(self) -> Any:
            try:
                await asyncio.wait_for(self.model.describe.remote(), timeout=5)
            except Exception as e:  # not ready: no replica yet, or it is failing
                return _error(503, f"model not ready: {type(e).__name__}")
            return {"status": "ready"}

        @api.get("/v1/models", response_model=ModelsResponse, responses=unauthorized)
        async def models(self, request: Request) -> Any:
            if denied := self._denied(request):
                return denied
            info = await self.model.describe.remote()
            limits = {
                k: getattr(s, k)
                for k in ("max_n", "max_steps", "max_guidance", "min_size", "max_size", "max_upload_bytes")
            }
            return {**info, "classes": list(info["prompts"]), "limits": limits}

        @api.post(
            "/v1/generate",
            responses={
                200: {"content": {"image/png": {}}, "model": GenerateResponse},
                **unauthorized,
                **busy,
            },
        )
        async def generate(self, body: GenerateRequest, request: Request) -> Any:  # type: ignore[valid-type]
            if denied := self._denied(request):
                return denied
            if body.format == "png" and body.n != 1:
                return _error(422, "format png returns one image: use n=1, or format json", "format")
            items = [
                WorkItem(body.label, body.seed + i, body.steps, body.guidance, body.strength, body.size)
                for i in range(body.n)
            ]
            try:
                results = await asyncio.gather(*(self.model.generate_item.remote(it) for it in items))
            except BackPressureError:
                return _error(503, "server busy: too many queued requests, retry later")
            if body.format == "png":
                meta = results[0]["metadata"]
                headers = {"X-Busdiff-Seed": str(meta["seed"]), "X-Busdiff-Base-Model": meta["base_model"]}
                return Response(results[0]["png"], media_type="image/png", headers=headers)
            images = []
            for r in results:
                m = r["metadata"]
                images.append(
                    {
                        "id": f"{m['class']}-{m['seed']}-{m['steps']}-{m['size']}",
                        "png": base64.b64encode(r["png"]).decode(),
                        "text2img_png": base64.b64encode(r["text2img"]).decode()
                        if body.include_text2img
                        else None,
                        "metadata": {**m, "busdiff_version": __version__},
                    }
                )
            return {"images": images}

        @api.post(
            "/v1/refine",
            responses={
                200: {"content": {"image/png": {}}},
                413: {"model": ErrorResponse},
                415: {"model": ErrorResponse},
                **unauthorized,
                **busy,
            },
        )
        async def refine(
            self,
            request: Request,
            image: Annotated[UploadFile, File(description="PNG or JPEG to refine")],
            strength: Annotated[float, Form(gt=0, le=1)] = s.default_strength,
            label: Annotated[ClassName, Form(alias="class")] = "benign",
            seed: Annotated[int, Form(ge=0, le=2**31 - 1)] = 0,
            steps: Annotated[int, Form(ge=1, le=s.max_steps)] = s.default_steps,
            guidance: Annotated[float, Form(ge=0, le=s.max_guidance)] = s.default_guidance,
            size: Annotated[int, Form(ge=s.min_size, le=s.max_size)] = s.default_size,
        ) -> Any:
            if denied := self._denied(request):
                return denied
            if size % 8:
                return _error(422, f"size must be a multiple of 8, got {size}", "size")
            data = await image.read(s.max_upload_bytes + 1)
            if len(data) > s.max_upload_bytes:
                return _error(413, f"upload over the limit of {s.max_upload_bytes} bytes", "image")
            try:
                with Image.open(io.BytesIO(data)) as im:
                    im.verify()
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
                return _error(415, "the upload is not an image PIL can read (PNG or JPEG expected)", "image")
            try:
                png = await self.model.refine.remote(data, label, strength, steps, guidance, seed, size)
            except BackPressureError:
                return _error(503, "server busy: too many queued requests, retry later")
            return Response(png, media_type="image/png")

    model = ModelDeployment.options(
        ray_actor_options={"num_cpus": s.num_cpus_per_replica, "num_gpus": s.num_gpus_per_replica},
        autoscaling_config={
            "min_replicas": s.min_replicas,
            "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests,
        },
        max_ongoing_requests=s.max_ongoing_requests,
        max_queued_requests=s.max_queued_requests,
    ).bind(cfg.model.model_dump(), s.model_dump())
    return Ingress.options(
        ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4 * s.max_ongoing_requests
    ).bind(model)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """For ``serve run``/``serve deploy`` config files: ``args: {config: PATH, set: [KEY=VALUE, ...]}``."""
    from busdiff.config import load_config

    return build_app(load_config(args.get("config"), list(args.get("set") or [])))


def run_serve(cfg: BusdiffConfig, blocking: bool = True) -> None:
    """Start Serve's HTTP proxy on cfg.serve.host:port and deploy (the caller connects to Ray)."""
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(build_app(cfg), name=cfg.serve.app_name, route_prefix=cfg.serve.route_prefix, blocking=blocking)
