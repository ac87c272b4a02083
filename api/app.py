"""The HTTP layer's assembly: the Starlette app over an engine. No model or scheduling logic lives here.

Routes: POST /generate (jitney's own), POST /v1/completions and /v1/chat/completions (OpenAI-compatible, with
SSE streaming), POST /tokenize and /detokenize (vLLM's shape), GET /v1/models, /health, /metrics and
/openapi.json (the contract, generated from the same field tables the checks use), and the dashboard's two.
Where each idea lives: the handlers in api/routes.py, the response shapes in api/formats.py, request bodies in
api/bodies.py, errors and their handlers in api/errors.py, the middleware in api/gatekeeper.py (and the
dashboard's KeyFromQuery in api/dashboard.py), the settings in api/settings.py.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc

from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Route

from batcher.engine_client import EngineClient

from .dashboard import KeyFromQuery, dashboard_routes
from .errors import HANDLERS
from .gatekeeper import Gatekeeper
from .looplag import LoopLag
from .metrics import Metrics
from .routes import Routes
from .settings import ServerSettings


def build_app(engine: EngineClient, settings: ServerSettings):
    """The app over any engine that implements EngineClient (one process, or replicas): it asks nothing else."""
    metrics = Metrics(engine, settings.model_name)
    routes = Routes(engine, settings, metrics)
    lag = LoopLag(metrics.registry)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await engine.warm_up()  # before any request (response_format's vocabulary)
        if not engine.alive:
            await engine.start()
        watch = asyncio.create_task(lag.run())  # jitney_event_loop_lag_seconds (api/looplag.py)
        # What is loaded now (modules, model, tokenizer) lives as long as the process: out of the cyclic GC's
        # sight, so that no full collection, with the GIL held, walks it again (a stall of every stream). What is
        # garbage already is collected first, not kept forever.
        gc.collect()
        gc.freeze()
        yield
        watch.cancel()
        routes.prep.close()
        if engine.alive:  # a drain (server.py) normally stopped it already
            await engine.stop()

    app = Starlette(routes=[
        Route("/generate", routes.generate, methods=["POST"]),
        Route("/v1/completions", routes.completions, methods=["POST"]),
        Route("/v1/chat/completions", routes.chat_completions, methods=["POST"]),
        Route("/tokenize", routes.tokenize, methods=["POST"]),
        Route("/detokenize", routes.detokenize, methods=["POST"]),
        Route("/v1/models", routes.models, methods=["GET"]),
        Route("/openapi.json", routes.openapi, methods=["GET"]),
        Route("/health", routes.health, methods=["GET"]),
        Route("/metrics", routes.metrics_route, methods=["GET"]),
        Route("/version", routes.version_route, methods=["GET"]),
    ], lifespan=lifespan)
    if settings.dashboard:  # --no-dashboard leaves both routes out
        app.router.routes.extend(dashboard_routes(engine))
    # "/generate/" is a 404 like any unknown path: Starlette's default answers it with a redirect whose
    # Location is built from the client's own Host header.
    app.router.redirect_slashes = False
    for kind, handler in HANDLERS.items():
        app.add_exception_handler(kind, handler)
    app.state.engine, app.state.metrics, app.state.settings = engine, metrics, settings
    outer = Gatekeeper(app, settings, metrics)
    if settings.dashboard:
        outer = KeyFromQuery(outer)  # the page's ?api_key= (api/dashboard.py)
    if settings.allowed_origins:
        # Outside the key check: a browser's preflight (OPTIONS) carries no key, and must be answered.
        outer = CORSMiddleware(outer, allow_origins=list(settings.allowed_origins), allow_methods=["GET", "POST"],
                               allow_headers=["Authorization", "Content-Type", "X-API-Key"])
    outer.metrics = metrics  # whatever wraps the app, its owner finds the registry in one place
    return outer
