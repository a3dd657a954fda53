"""`python -m gateway`: serve the gateway with uvicorn on uvloop and httptools."""

from __future__ import annotations

import logging

import uvicorn

from gateway.app import create_app
from llmops.settings import Settings


def main() -> None:
    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        log_level=settings.log_level,
        access_log=False,  # per-request logging costs more than the proxying itself
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    main()
