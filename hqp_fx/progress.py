"""Progress of a long ``hqp compress`` run that a person can follow, on a terminal or in a log file.

On a terminal: rich progress bars. Anywhere else (nohup, CI, ``2>&1 | tee log``) rich draws nothing until the
end, so one plain, flushed line per phase and per round is written instead, with the elapsed time, the round's
top-1, drop, MACs and measured latency, and an estimate of the time left from the rounds so far.
"""
from __future__ import annotations

import math
import sys
import time
from typing import TextIO

from .prune_loop import RoundRecord

__all__ = ["RunProgress"]


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class RunProgress:
    """``phase(message)`` and ``round(record)`` sinks for ``compress``; a context manager.

    ``base_macs`` and ``target_macs`` (a fraction), or ``target_latency`` (a fraction of the dense model timed
    alongside), let the line mode estimate the rounds left to that target from the average reduction of the
    accepted rounds so far; without a target it states the rounds budget left.
    """

    def __init__(self, max_rounds: int, *, base_macs: int | None = None, target_macs: float | None = None,
                 target_latency: float | None = None, stream: TextIO | None = None, interactive: bool | None = None):
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.max_rounds, self.base_macs, self.target_macs = max_rounds, base_macs, target_macs
        self.target_latency = target_latency
        self.start = self.last = time.monotonic()
        self.durations: list[float] = []
        self.records: list[RoundRecord] = []

    def __enter__(self) -> "RunProgress":
        if self.interactive:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                TextColumn("{task.completed} rounds"), TimeElapsedColumn(),
                                console=Console(file=self.stream), transient=False)
            self.bar.__enter__()
            self.phase_task = self.bar.add_task("starting", total=None)
            self.round_task = self.bar.add_task("pruning rounds", total=self.max_rounds)
        return self

    def __exit__(self, *exc) -> None:
        if self.interactive:
            self.bar.update(self.round_task, total=len(self.records))
            self.bar.__exit__(*exc)

    def _line(self, text: str) -> None:
        print(f"[{_clock(time.monotonic() - self.start)}] {text}", file=self.stream, flush=True)

    def phase(self, message: str) -> None:
        if self.interactive:
            self.bar.update(self.phase_task, description=message)
        else:
            self._line(message)

    def round(self, r: RoundRecord) -> None:
        now = time.monotonic()
        self.durations.append(now - self.last)
        self.last = now
        self.records.append(r)
        text = (f"round {r.round}: {'accepted' if r.accepted else 'rolled back'}, top-1 {r.top1:.2f}% "
                f"(drop {r.drop:+.2f}{_se(r.drop_se)}{_retried(r)}), "
                f"MACs {r.macs / 1e6:.2f}M"
                + (f", latency {r.latency:.3f} ms" if r.latency is not None else "")
                + (f" ({r.latency / r.reference_latency:.3f} of dense timed alongside)"
                   if r.latency is not None and r.reference_latency else ""))
        if self.interactive:
            self.bar.advance(self.round_task)
            self.bar.update(self.phase_task, description=text)
        else:
            self._line(f"{text}; {self.estimate()}")

    def estimate(self) -> str:
        """Time left: rounds still to run (to the MACs or latency target when one is set) times the mean round."""
        mean = sum(self.durations) / len(self.durations)
        budget = self.max_rounds - (self.records[-1].round + 1)  # round numbers count skipped and resumed rounds too
        accepted = [r for r in self.records if r.accepted]
        if self.target_latency is not None and accepted and accepted[-1].latency and accepted[-1].reference_latency:
            what, target, fraction = "latency", self.target_latency, accepted[-1].latency / accepted[-1].reference_latency
        elif self.target_macs is not None and self.base_macs and accepted:
            what, target, fraction = "MACs", self.target_macs, accepted[-1].macs / self.base_macs
        else:
            return f"at most {budget} round(s) left, {_clock(budget * mean)} at the mean round of {_clock(mean)}"
        per_accept = fraction ** (1 / len(accepted))  # the average ratio of one accepted round
        if fraction <= target or per_accept >= 1:
            left = 0 if fraction <= target else budget
        else:
            accepts = math.ceil(math.log(target / fraction) / math.log(per_accept))
            left = min(budget, math.ceil(accepts * len(self.records) / len(accepted)))
        return f"~{left} round(s) to the {what} target, ETA {_clock(left * mean)} (mean round {_clock(mean)})"


def _se(se: float | None) -> str:
    return f" ± {se:.2f}" if se is not None else ""


def _retried(r: RoundRecord) -> str:
    """The drops before the retries too: they are what the retry gate (prune_loop) is judged by."""
    if not r.retries:
        return ""
    return f" after {r.retries} retried fine-tune(s), from {', '.join(f'{d:+.2f}' for d in r.drops_before)}"
