"""What the HTTP layer is told at start (ServerSettings), and the routes it counts by name."""
from __future__ import annotations

from dataclasses import dataclass, field

ROUTES = ("/generate", "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize", "/v1/models",
          "/health", "/metrics", "/openapi.json", "/version")
CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection before the answer"


@dataclass
class ServerSettings:
    model_name: str
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = 1 << 20
    body_timeout_s: float = 30.0      # the whole body must arrive within this (a slow or endless body: 408)
    generate_max_tokens: int = 128    # /generate's default max_tokens (OpenAI completions default to 16)
    allowed_origins: tuple[str, ...] = ()  # CORS: off unless origins are named
    allow_special_tokens_in_content: bool = False
    draining: bool = field(default=False)
    dashboard: bool = True            # GET /dashboard and its stream GET /v1/engine/steps (api/dashboard.py)
