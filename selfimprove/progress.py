"""Where a run is: a status line as each stage starts and ends, with elapsed time and an ETA.

1. A run is the fixed plan of stages its recipe declares; the progress lines number them from it.
2. The ETA sums, over the stages still to run, the mean time this run has taken for a stage of
   the same kind, read from finished stages' `timing.json` (so a resumed run knows its past).
   Until each remaining kind has finished once there is no honest estimate, and the line says so.
3. Lines go to stderr between stages, so they never fight the progress bars stages draw.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def eta_seconds(remaining: list[str], seconds_by_kind: dict[str, list[float]]) -> float | None:
    """Sum of the mean past time of each remaining stage kind; None if some kind has no past time yet."""
    if any(not seconds_by_kind.get(kind) for kind in remaining):
        return None
    return sum(sum(seconds_by_kind[k]) / len(seconds_by_kind[k]) for k in remaining)


def clock(seconds: float) -> str:
    """Seconds as h:mm:ss, or m:ss under an hour."""
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class RunProgress:
    """Prints the stage lines of one run; the driver calls it around every stage."""

    def __init__(self, run_dir: Path, stages: list[tuple[int, str]]):
        """`stages`: the plan's (iteration, stage kind), in the order they run."""
        from rich.console import Console

        self.run_dir, self.iterations = Path(run_dir), max(t for t, _ in stages)
        self.stages = list(stages)
        self.start = time.monotonic()
        self.console = Console(stderr=True)

    def starting(self, folder: Path, dtype: str | None = None) -> None:
        t, kind = self._where(folder)
        index = self.stages.index((t, kind))
        eta = eta_seconds([k for _, k in self.stages[index:]], self._past_seconds())
        self.console.print(
            f"── [bold]iteration {t}/{self.iterations} · {kind}[/] · stage {index + 1} of {len(self.stages)} · "
            + (f"{dtype} · " if dtype else "") +
            f"elapsed {clock(time.monotonic() - self.start)} · "
            + (f"ETA {clock(eta)}" if eta is not None else "no ETA until each stage kind has run once"), soft_wrap=True)

    def finished(self, folder: Path, seconds: float) -> None:
        t, kind = self._where(folder)
        self.console.print(f"[green]done[/] iteration {t} {kind} in {clock(seconds)}")

    def skipped(self, folder: Path) -> None:
        t, kind = self._where(folder)
        self.console.print(f"iteration {t} {kind}: finished earlier ({folder}), skipped")

    def damaged(self, folder: Path) -> None:
        t, kind = self._where(folder)
        self.console.print(f"iteration {t} {kind}: its _SUCCESS marker ({folder}) is empty or cut short, so it may "
                           "not have finished: running it again", soft_wrap=True)

    def _where(self, folder: Path) -> tuple[int, str]:
        return int(folder.parent.name.removeprefix("iter_")), folder.name

    def _past_seconds(self) -> dict[str, list[float]]:
        past: dict[str, list[float]] = {}
        for timing in sorted(self.run_dir.glob("iter_*/*/timing.json")):
            past.setdefault(timing.parent.name, []).append(json.loads(timing.read_text())["seconds"])
        return past
