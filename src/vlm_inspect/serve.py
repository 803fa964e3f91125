"""`vlm-inspect serve`: the tuned model as an inspection service for the line (the app: `service/`).

The server binds 127.0.0.1 unless told otherwise and checks an API key in constant time; the model is loaded
and, on a GPU, compiled before the first request.

Run as: vlm-inspect serve --model M [--adapter A] [--host 127.0.0.1] [--port 8000] [--api-key-file F]
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

from vlm_inspect.config import ServeConfig
from vlm_inspect.errors import ConfigError
from vlm_inspect.inference import Predictor
from vlm_inspect.service.app import create_app
from vlm_inspect.service.http import bind, is_loopback, run_server
from vlm_inspect.service.limits import resolve_api_key
from vlm_inspect.station.line_settings import line_problems


def check_serve_config(cfg: ServeConfig) -> None:
    """Raise one ConfigError listing every unusable setting."""
    problems = cfg.model_problems()
    if not 1 <= cfg.port <= 65535:
        problems.append(f"port: {cfg.port} is not between 1 and 65535")
    if not 0.0 <= cfg.threshold <= 1.0:
        problems.append(f"threshold: {cfg.threshold} is not between 0 and 1")
    for name in ("max_batch", "max_queue", "max_new_tokens"):
        if getattr(cfg, name) < 1:
            problems.append(f"{name}: {getattr(cfg, name)} must be at least 1")
    if cfg.max_prompt_chars < 1:
        problems.append(f"max_prompt_chars: {cfg.max_prompt_chars} must be at least 1")
    for name in ("max_upload_mb", "request_timeout_s", "body_timeout_s"):
        if getattr(cfg, name) <= 0:
            problems.append(f"{name}: {getattr(cfg, name)} must be more than 0")
    if cfg.api_key is not None and not cfg.api_key.strip():
        problems.append("api_key: empty; leave it unset or give a key")
    problems += line_problems(cfg)
    if problems:
        raise ConfigError(problems)


def serve(cfg: ServeConfig) -> None:
    """Load the model once and serve it until interrupted.

    Args:
        cfg: Model, adapter, address and limits (see `ServeConfig`).

    Raises:
        ConfigError: a setting is unusable, or the address cannot be bound.
        ModelFolderError: the model or adapter folder cannot be loaded.
    """
    check_serve_config(cfg)
    cfg = dataclasses.replace(cfg, api_key=resolve_api_key(cfg.api_key, cfg.api_key_file, dict(os.environ)))
    sock = bind(cfg.host, cfg.port)
    try:
        predictor = Predictor.load(cfg)
        if predictor.device.type == "cuda":
            print("vlm-inspect serve: compiling for the GPU before the first request (1–3 minutes)", flush=True)
        predictor.warm_up(cfg.max_batch, cfg.max_new_tokens)
        app = create_app(predictor, cfg)
        _announce(cfg, predictor)
        run_server(app, sock, "info")
    finally:
        sock.close()


def _announce(cfg: ServeConfig, predictor: Any) -> None:
    shown = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    url = f"http://{shown}:{cfg.port}"
    print(f"vlm-inspect serve: model {predictor.name} at {url}", flush=True)
    print(f"  operator page {url}/   inspect POST {url}/v1/inspect   OpenAI API {url}/v1", flush=True)
    if not is_loopback(cfg.host) and not cfg.api_key:
        print(
            f"  warning: listening on {cfg.host} without an API key: anyone who can reach this machine can use it",
            file=sys.stderr,
            flush=True,
        )
