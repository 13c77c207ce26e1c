"""The HTTP API's routes, one APIRouter per kind of resource (FastAPI's "bigger applications" layout)."""
