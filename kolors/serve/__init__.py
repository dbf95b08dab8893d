"""`kolors serve`: the OpenAI Images API and the AUTOMATIC1111 API over one job queue, and the web page."""

from kolors.serve.app import ServerConfig, check_bind, create_app, run

__all__ = ["ServerConfig", "check_bind", "create_app", "run"]
