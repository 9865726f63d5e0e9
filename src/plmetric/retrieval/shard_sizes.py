"""The sizes that decide an index's layout (:mod:`plmetric.retrieval.stored`), in a module that imports
nothing: the command line's parser names them in its help without importing NumPy or torch."""

from __future__ import annotations

DEFAULT_SHARD_ROWS = 1_000_000
"""Rows a shard holds by default, and the most rows ``plmetric index`` writes as one version-2 file
(1M float32 512-d vectors: 2 GB, the size past which the issue's memory targets need mapping)."""
SINGLE_FILE_PATH_BYTES = 32 * 2**20
"""The most UTF-8 bytes of paths a version-2 file holds in its JSON header (safetensors refuses a
header over 100 MB; JSON escaping can double a name's bytes, and then some)."""
