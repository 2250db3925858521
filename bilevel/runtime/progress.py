"""Rich progress bars that degrade to nothing when output is not a terminal (tests, CI logs)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)
#: Log lines printed instead of a live bar when stderr is not a terminal.
log_console = Console(stderr=True, width=None if console.is_terminal else 140)


@contextmanager
def progress_bar(description: str, total: int, completed: int = 0) -> Iterator[Callable[..., None]]:
    """Yields advance(n, **metrics); metrics are shown beside the bar."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[metrics]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    ) as progress:
        task = progress.add_task(description, total=total, completed=completed, metrics="")

        def advance(n: int = 1, **metrics: float) -> None:
            shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            progress.update(task, advance=n, metrics=shown)

        yield advance
