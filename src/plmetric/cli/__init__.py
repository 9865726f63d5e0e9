"""The ``plmetric`` command line: :mod:`plmetric.cli.dispatch` builds the parser and dispatches,
:mod:`plmetric.cli.commands` holds one module per command (its options and help beside its code),
and :mod:`plmetric.cli.common` what the commands share; beside them, parts of one or two commands
(:mod:`~plmetric.cli.errors`: an error's one line and exit status; :mod:`~plmetric.cli.rank_shards` and
:mod:`~plmetric.cli.index_ranks`: shard-per-rank under torchrun; :mod:`~plmetric.cli.index_options`,
:mod:`~plmetric.cli.storage`, :mod:`~plmetric.cli.calibrate`, :mod:`~plmetric.cli.search_outputs`).
``python -m plmetric.cli`` (and ``torchrun -m plmetric.cli``) runs it, as does the ``plmetric`` console
script (``plmetric.cli:main``). It is the application on top of the library: nothing imports it.

May import: every layer of the library (core, manifold, data, evaluation, config, methods, training,
retrieval, studies), always inside the functions that need them, so that ``--help`` stays fast.
"""

from plmetric.cli.dispatch import build_parser, main

__all__ = ["build_parser", "main"]
