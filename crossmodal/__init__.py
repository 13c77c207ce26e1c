"""crossmodal: cross-modal (text <-> image) search over your own photos.

The distribution's packages, and where they live in the repository:
- `crossmodal` (crossmodal/): the command line and the launcher, the top that imports downwards;
- `crossmodal.indexer` (indexer/): collection -> embeddings -> FAISS indexes + database;
- `crossmodal.search` (search/): read-only search and the HTTP service;
- `crossmodal.ui` (ui/): the web UI, which reaches the service over HTTP only;
- `crossmodal.data` (data/): the offline default model's files and the sample captions.
"""

__version__ = "0.1.0"
