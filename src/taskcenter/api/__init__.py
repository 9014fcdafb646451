"""The REST API (FastAPI) over the application services; ``create_app`` builds it from a runtime."""

from taskcenter.api.app import create_app

__all__ = ["create_app"]
