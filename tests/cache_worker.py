"""``plmetric train`` in its own process with small cache chunks, for the caching-pass crash tests:
``cache_worker.py CHUNK_IMAGES ARGS...`` (ARGS as for ``plmetric``; the exit status is the command's)."""

import sys

import plmetric.training.view_cache as view_cache
from plmetric.cli import main

if __name__ == "__main__":
    view_cache.CHUNK_IMAGES = int(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
