"""The HTTP server: FastAPI routes, OpenAI error bodies, API-key auth, Prometheus metrics, and `run_server`."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from stepserve.api import protocol as P
from stepserve.api.metrics import Metrics
from stepserve.api.serving import Serving
from stepserve.config import ServerArgs
from stepserve.errors import AuthenticationError, InvalidRequestError, StepserveError

logger = logging.getLogger(__name__)

_GRACEFUL_SHUTDOWN_S = 10  # a backstop: streams end on their own at shutdown (see _Server)
_OPEN_PATHS = ("/health", "/health_generate", "/metrics")  # probes and scrapers carry no key
_ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/health_generate", "/metrics",
           "/get_model_info", "/start_profile", "/stop_profile"}


def _error(exc: StepserveError) -> JSONResponse:
    return JSONResponse(exc.to_dict(), status_code=exc.status_code)


class _CountStatus:
    """ASGI middleware counting responses by route and status (pure ASGI: streaming and disconnects untouched)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in _ROUTES else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(route=route, status=str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


def build_app(args: ServerArgs, engine) -> FastAPI:
    metrics = Metrics(engine.stats)
    serving = Serving(args, engine, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        await asyncio.to_thread(serving.images.start)
        try:
            yield
        finally:
            await engine.shutdown()
            serving.pool.shutdown(wait=False, cancel_futures=True)
            serving.images.shutdown()

    app = FastAPI(title="stepserve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serving = serving
    app.add_middleware(_CountStatus, metrics=metrics)

    @app.exception_handler(StepserveError)
    async def _stepserve_error(request: Request, exc: StepserveError):
        return _error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        err = StepserveError(f"{request.method} {request.url.path}: {exc.detail}")
        err.status_code, err.error_type = exc.status_code, "NotFoundError" if exc.status_code == 404 else "HTTPError"
        return _error(err)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        logger.exception("unhandled error on %s", request.url.path)
        return _error(StepserveError(f"internal error: {type(exc).__name__}: {exc}"))

    def check_key(request: Request) -> None:
        if args.api_key is None or request.url.path.startswith(_OPEN_PATHS):
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), args.api_key.encode()):
            raise AuthenticationError("missing or wrong API key (send `Authorization: Bearer <key>`)")

    async def body_of(request: Request, cls):
        check_key(request)
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise InvalidRequestError(f"the request body is not valid JSON: {e}") from None
        return P.parse_request(cls, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        arrival = time.monotonic()  # before the body is read: the latency metrics include receiving and parsing it
        return await serving.chat(await body_of(request, P.ChatCompletionRequest), request, arrival)

    @app.post("/v1/completions")
    async def completions(request: Request):
        arrival = time.monotonic()
        return await serving.completion(await body_of(request, P.CompletionRequest), request, arrival)

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        card = P.ModelCard(id=serving.served_name, root=args.model or engine.model_name,
                           max_model_len=engine.context_length)
        return P.ModelList(data=[card]).model_dump(mode="json")

    @app.get("/get_model_info")
    async def model_info(request: Request):
        check_key(request)
        return {"model_path": args.model or engine.model_name, "tokenizer_path": args.tokenizer or args.model,
                "served_model_name": serving.served_name, "is_generation": True,
                "has_image_understanding": True, "context_length": engine.context_length,
                "image_token_id": engine.image_token_id, "reasoning_parser": args.reasoning_parser,
                "tool_call_parser": args.tool_call_parser}

    @app.get("/health")
    async def health():
        return Response(status_code=200)

    @app.get("/health_generate")
    async def health_generate():
        await serving.health_generate()
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics_route():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/start_profile")
    async def start_profile(request: Request):
        """Optional JSON body {"num_steps": N (stop by itself after N engine steps), "with_stack": bool}."""
        check_key(request)
        body = await body_of(request, P.ProfileRequest) if (await request.body()).strip() else P.ProfileRequest()
        trace = await engine.call(engine.profiler.start, body.num_steps, body.with_stack)
        return {"trace": trace}

    @app.post("/stop_profile")
    async def stop_profile(request: Request):
        check_key(request)
        return {"trace": await engine.call(engine.profiler.stop)}

    return app


class _Server(uvicorn.Server):
    """uvicorn's server, plus: Ctrl-C / SIGTERM aborts every generation in flight, so open streams end at once
    (finish_reason "abort", then [DONE]) instead of holding the shutdown until they complete."""

    def __init__(self, config: uvicorn.Config, engine):
        super().__init__(config)
        self.engine = engine
        self.loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        if self.loop is not None:  # a signal handler can interrupt the loop anywhere: let the loop do it
            self.loop.call_soon_threadsafe(self.engine.abort_all)


def run_server(args: ServerArgs) -> None:
    """Load the engine, then serve until Ctrl-C / SIGTERM (lifespan stops the engine)."""
    from stepserve.engine.engine import AsyncEngine

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = AsyncEngine.from_config(args.engine_config())
    app = build_app(args, engine)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, timeout_keep_alive=30,
                            timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S)
    try:
        asyncio.run(_Server(config, engine).serve())
    except KeyboardInterrupt:
        pass
