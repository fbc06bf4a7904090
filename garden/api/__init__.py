"""The local HTTP port: FastAPI app, metrics and the in-process uvicorn server."""
