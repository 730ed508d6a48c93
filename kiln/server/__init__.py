"""`kiln serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the scheduler of
kiln/runtime/scheduler.py. create_app(llm, ...) builds the app."""

from __future__ import annotations

from kiln.server.app import create_app

__all__ = ["create_app"]
