"""One exception type for every user-facing failure.

Its message is a single line that names the file, line, field, module or adapter at fault;
the CLI prints it without a traceback and exits 2.
"""


class PeftkitError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class DataError(PeftkitError):
    """Invalid dataset records; `problems` holds every `FILE:LINE: reason` found."""

    def __init__(self, problems: list[str], total: int | None = None, limit: int = 20):
        self.problems = problems
        total = len(problems) if total is None else total
        shown = problems[:limit]
        more = f"\n... and {total - len(shown)} more" if total > len(shown) else ""
        super().__init__("\n".join(shown) + more)
