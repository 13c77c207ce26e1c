"""Search: read-only queries over a published build, and the HTTP service."""
