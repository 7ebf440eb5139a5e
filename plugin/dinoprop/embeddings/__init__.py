"""Compute DINOv2 (or other backbone) embeddings for a FiftyOne collection.

:func:`compute_embeddings` is the fast, resumable alternative to FiftyOne's
``compute_embeddings``: DataLoader workers decode and resize, the model runs
in bf16/fp16 on GPUs (fp32 on CPU) with SDPA attention, and vectors are
written to the database in bulk chunks. Every chunk is committed, and the
model fingerprint and settings are recorded as a FiftyOne run on the dataset,
so calling it again after a crash embeds only what is missing.

With ``patches_field``, every box of a Detections (or Polylines) field is
cropped and embedded, and its vector is stored on the label itself.

One module per concern:

- :mod:`~dinoprop.embeddings.engine`: the storage-free engine
  (:func:`embed_files`, :class:`EmbeddingEngine`): files in, vectors out,
  no FiftyOne;
- :mod:`~dinoprop.embeddings.api`: :func:`compute_embeddings`, its
  argument checks and :class:`EmbeddingsResults`;
- :mod:`~dinoprop.embeddings.writer`: the engine's vectors committed to the
  dataset in bulk chunks, failures recorded;
- :mod:`~dinoprop.embeddings.runs`: the run recording a field's model and
  settings;
- :mod:`~dinoprop.embeddings.distributed`: ``engine="ray"``, the engine on a
  Ray cluster whose actors write the vectors (imported only when used).
"""

from dinoprop.embeddings.api import EmbeddingsResults, compute_embeddings
from dinoprop.embeddings.engine import EmbeddedBatch, EmbeddingEngine, embed_files
from dinoprop.embeddings.runs import (
    RUN_KEY_PREFIX,
    get_embeddings_run,
    recorded_setting,
    run_key_for,
)
from dinoprop.embeddings.writer import DEFAULT_CHUNK_SIZE, FAILURE_EXAMPLES, FLUSH_SECONDS

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "FAILURE_EXAMPLES",
    "FLUSH_SECONDS",
    "RUN_KEY_PREFIX",
    "EmbeddedBatch",
    "EmbeddingEngine",
    "EmbeddingsResults",
    "compute_embeddings",
    "embed_files",
    "get_embeddings_run",
    "recorded_setting",
    "run_key_for",
]
