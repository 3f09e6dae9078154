"""The hybrid pipeline on Ray Serve: a FastAPI ingress and a batched, autoscaled model deployment.

    serve run serve/config.yaml              # or: busdiff serve CONFIG
    curl -X POST localhost:8000/v1/generate -H 'content-type: application/json' \\
         -d '{"class": "benign", "seed": 1}' -o benign.png
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at run time,
# and the request models are locals of build_app (limits come from the config).
import asyncio
import base64
import hashlib
import hmac
import io
import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any

from fastapi import File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi_offline import FastAPIOffline
from PIL import Image
from ray import serve
from ray.serve.exceptions import BackPressureError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from busdiff import __version__
from busdiff.config import BusdiffConfig, ConfigError, ModelConfig, ServeConfig
from busdiff.serving.gallery import GALLERY_HTML
from busdiff.serving.model import HybridModel, WorkItem
from busdiff.serving.schemas import ErrorResponse, GenerateResponse, ModelsResponse, request_models
from busdiff.serving.upload import UploadError, decode_upload

RETRY_AFTER = {"Retry-After": "1"}  # seconds, on every 503
JSON_BODY_LIMIT = 64 * 1024  # a generate body is well under 1 KB
FORM_OVERHEAD = 64 * 1024  # multipart headers and the form fields beside the uploaded image
# What a 4xx that is not about one request field is about.
STATUS_FIELD = {400: "body", 401: "authorization", 404: "path", 405: "method", 413: "body"}


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _error(
    status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message, "field": field}, headers=headers)


@serve.deployment
class ModelDeployment:
    """One set of text2img + img2img components; single-image work items (text2img + img2img, or
    img2img of an upload) batched across requests. One batch runs at a time: a pipeline call is not
    reentrant (see busdiff.serving.model)."""

    def __init__(self, model: dict[str, Any], serve_cfg: dict[str, Any]) -> None:
        cfg = ServeConfig(**serve_cfg)
        self.model = HybridModel(ModelConfig(**model), cfg)
        self.run.set_max_batch_size(cfg.max_batch_size if cfg.batching else 1)
        self.run.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s if cfg.batching else 0.0)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def run(self, items: list[WorkItem]) -> list[dict[str, Any]]:
        # In a thread, so the replica's event loop keeps answering health checks.
        return await asyncio.to_thread(self._run, items)

    def _run(self, items: list[WorkItem]) -> list[dict[str, Any]]:
        return [
            {
                "text2img": None if r.text2img is None else _png(r.text2img),
                "png": _png(r.refined),
                "metadata": r.metadata,
            }
            for r in self.model.run(items)
        ]

    def describe(self) -> dict[str, Any]:
        return self.model.describe()

    def check_health(self) -> None:
        self.model.probe()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _token_digest(cfg: ServeConfig, http_host: str) -> str | None:
    """sha256 of the bearer token (from the env var or the file), or None when auth is off, which is
    refused for an ``http_host`` reachable from the network. Only the digest travels to the replicas."""
    token = os.environ.get(cfg.auth_token_env, "").strip()
    if cfg.auth_token_file:
        path = Path(cfg.auth_token_file)
        if not path.is_file():
            raise ConfigError(f"serve.auth_token_file: {path} does not exist")
        token = path.read_text().strip()
        if not token:
            raise ConfigError(f"serve.auth_token_file: {path} is empty (it would turn auth off)")
    if token:
        return hashlib.sha256(token.encode()).hexdigest()
    if not _is_loopback(http_host) and not cfg.allow_unauthenticated_remote:
        raise ConfigError(
            f"the HTTP host {http_host!r} is reachable from the network but no auth token is set: set "
            f"${cfg.auth_token_env} or serve.auth_token_file (or serve.allow_unauthenticated_remote=true)"
        )
    return None


def check_auth(cfg: ServeConfig) -> None:
    """The auth checks of serving ``cfg.host``, for a CLI to run before it even connects to Ray."""
    _token_digest(cfg, cfg.host)


class _Guard:
    """ASGI middleware that answers from the headers, before the app reads a body (FastAPI parses
    bodies before it runs any dependency): 401 for a /v1 call without the bearer token (when
    ``digest`` is set), 413 for a body over its path's limit, declared or counted as it streams in."""

    def __init__(self, app: ASGIApp, digest: str | None, limits: dict[str, int]) -> None:
        self.app, self.digest, self.limits = app, digest, limits

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        digest = hashlib.sha256(token.strip().encode()).hexdigest()
        return scheme.lower() == "bearer" and hmac.compare_digest(digest, self.digest or "")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        headers = Headers(scope=scope)
        if self.digest and path.startswith("/v1/") and not self._authorized(headers.get("authorization", "")):
            message = "missing or wrong bearer token (Authorization: Bearer <token>)"
            return await _error(401, message, "authorization", {"WWW-Authenticate": "Bearer"})(
                scope, receive, send
            )
        limit = self.limits.get(path, JSON_BODY_LIMIT)
        too_large = f"request body over the limit of {limit} bytes"
        if int(headers.get("content-length") or 0) > limit:
            return await _error(413, too_large, "body")(scope, receive, send)
        received = 0

        async def counted() -> Message:  # a chunked body has no length up front
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise HTTPException(413, too_large)  # FastAPI re-raises it to the app's handler
            return message

        await self.app(scope, counted, send)


def build_app(cfg: BusdiffConfig, http_host: str | None = None) -> serve.Application:
    """The Serve application for ``cfg``: ingress + model deployment, options from ``cfg.serve``.
    ``http_host`` is where Serve's HTTP proxy listens (default ``serve.host``), for the auth check."""
    s = cfg.serve
    token_digest = _token_digest(s, http_host or s.host)
    GenerateRequest, RefineForm = request_models(s)  # noqa: N806 - classes
    api = FastAPIOffline(  # /docs and /redoc with their assets served from here, not a CDN
        title="busdiff",
        version=__version__,
        description="Hybrid diffusion augmentation of breast ultrasound images (text2img + img2img).",
    )
    api.add_middleware(_Guard, digest=token_digest, limits={"/v1/refine": s.max_upload_bytes + FORM_OVERHEAD})

    @api.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            error = first.get("ctx", {}).get("error", "cannot parse")
            return _error(400, f"malformed JSON body: {error}", "body")
        field = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        return _error(422, f"{field}: {first.get('msg', 'invalid request')}", field)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        field = STATUS_FIELD.get(exc.status_code, "request") if exc.status_code < 500 else None
        return _error(exc.status_code, str(exc.detail), field, exc.headers)

    unauthorized = {401: {"model": ErrorResponse}}
    busy = {503: {"model": ErrorResponse}, 422: {"model": ErrorResponse}}

    @serve.deployment
    @serve.ingress(api)
    class Ingress:
        def __init__(self, model: Any) -> None:
            self.model = model

        async def _run(self, items: list[WorkItem]) -> list[dict[str, Any]]:
            try:
                return await asyncio.gather(*(self.model.run.remote(it) for it in items))
            except BackPressureError as e:
                raise HTTPException(
                    503,
                    "server busy: too many queued requests, retry later",
                    RETRY_AFTER,
                ) from e

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
                return _error(503, f"model not ready: {type(e).__name__}", None, RETRY_AFTER)
            return {"status": "ready"}

        @api.get("/v1/models", response_model=ModelsResponse, responses=unauthorized)
        async def models(self) -> Any:
            info = await self.model.describe.remote()
            limits = {
                k: getattr(s, k)
                for k in (
                    "max_n",
                    "max_steps",
                    "max_guidance",
                    "min_size",
                    "max_size",
                    "max_request_pixels",
                    "max_upload_bytes",
                    "max_upload_pixels",
                )
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
        async def generate(self, body: GenerateRequest) -> Any:  # type: ignore[valid-type]
            items = [
                WorkItem(body.label, body.seed + i, body.steps, body.guidance, body.strength, body.size)
                for i in range(body.n)
            ]
            results = await self._run(items)
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
            image: Annotated[UploadFile, File(description="PNG or JPEG to refine")],
            form: Annotated[RefineForm, Form()],  # type: ignore[valid-type]
        ) -> Any:
            data = await image.read(s.max_upload_bytes + 1)
            if len(data) > s.max_upload_bytes:
                return _error(413, f"upload over the limit of {s.max_upload_bytes} bytes", "image")
            try:  # decoding is CPU work: off the event loop
                picture = await asyncio.to_thread(decode_upload, data, s.max_upload_pixels, form.size)
            except UploadError as e:
                return _error(e.status, str(e), "image")
            item = WorkItem(
                form.label, form.seed, form.steps, form.guidance, form.strength, form.size, picture
            )
            (result,) = await self._run([item])
            return Response(result["png"], media_type="image/png")

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
    from ray.serve.context import _get_global_client

    from busdiff.config import load_config

    # Serve listens where the config file's http_options say (serve.host plays no part), and has bound
    # that address before it builds the app: check auth against it, so a refusal deploys nothing.
    http_host = _get_global_client().http_config.host
    return build_app(load_config(args.get("config"), list(args.get("set") or [])), http_host=http_host)


def run_serve(cfg: BusdiffConfig, blocking: bool = True) -> None:
    """Build the app (refusing an unauthenticated remote host), then start Serve's HTTP proxy on
    cfg.serve.host:port and deploy (the caller connects to Ray)."""
    app = build_app(cfg)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(app, name=cfg.serve.app_name, route_prefix=cfg.serve.route_prefix, blocking=blocking)
