"""One module per ``plmetric`` command: each holds ``add_parser(subparsers)``, which defines the
command's arguments and help, beside ``run(args) -> int``, which carries it out. A module imports
only the standard library and :mod:`plmetric.cli.common` at load time; the library (and torch) is
imported inside ``run``, so that ``plmetric --help`` stays fast. :mod:`plmetric.cli.dispatch` lists them.
"""
