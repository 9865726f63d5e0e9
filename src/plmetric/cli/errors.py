"""What an error becomes on the command line: :func:`error_line`, its one line, and
:func:`known_errors`, the errors that are bad input (exit status 2) rather than a bug (exit status 1).
:func:`plmetric.cli.dispatch.main` reports with them, and so does a torchrun rank that sends its error
to rank 0 (:mod:`plmetric.cli.rank_shards`), without importing the commands."""

from __future__ import annotations

from plmetric.cli.common import CLIError
from plmetric.core.names import shown

#: The longest error line printed; plmetric's own messages cut what they echo (:func:`plmetric.core.validation.shown`).
MAX_ERROR_CHARS = 4000


def error_line(err: BaseException) -> str:
    """The one-line form of a user-facing error (first line of the message, a layout hint), control
    characters of the names in it escaped (:func:`plmetric.core.names.shown`)."""
    text = str(err).strip()
    if isinstance(err, KeyError | OSError) and len(err.args) == 1 and isinstance(err.args[0], str):
        text = err.args[0]  # KeyError's str() adds quotes; OSError(str) is fine either way
    line = text.split("\n")[0] if text else type(err).__name__  # only a line feed ends the line
    if len(line) > MAX_ERROR_CHARS:  # a user's huge value echoed by a library's message
        line = f"{line[:MAX_ERROR_CHARS]}... ({len(line):,} characters)"
    line = shown(line)
    hint = getattr(err, "layout_hint", None)
    return f"{line} (expected layout: {hint})" if hint else line


def known_errors() -> tuple[type[BaseException], ...]:
    """The errors that are bad input (exit status 2), not a bug."""
    import yaml
    from PIL import Image

    from plmetric.data.backbones import WeightsUnavailableError
    from plmetric.retrieval.export import ExportDependencyError
    from plmetric.training.loop import NonFiniteLossError

    return (
        CLIError,
        FileNotFoundError,
        FileExistsError,
        NotADirectoryError,
        IsADirectoryError,
        PermissionError,
        ValueError,
        yaml.YAMLError,
        Image.DecompressionBombError,
        WeightsUnavailableError,
        NonFiniteLossError,
        ExportDependencyError,
    )
