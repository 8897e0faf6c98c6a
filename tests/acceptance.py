"""Acceptance floors for property and fuzz tests that count a refusal as a pass.

Such a test passes when every request is either done exactly or refused cleanly, so a tool that
refused everything would pass it too. Each of them therefore counts its outcomes in a
:class:`Tally` and, after hypothesis has run every example, fails when the share of accepted
requests is below a floor (set under the rate measured when the floor was written, with room
for the few points by which a rate moves between processes).

The measured rates are printed at the end of the run (``conftest.pytest_terminal_summary``)::

    ============================ acceptance rates ============================
    api widen 245/410 accepted (59.8%), floor 40.0%

Raise a floor when the tool learns to accept more; lower one only with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass

# Every tally checked in this session, for the summary at the end of the run.
RESULTS: list = []


@dataclass
class Tally:
    name: str
    floor: float  # minimum share of accepted requests, 0..1
    accepted: int = 0
    refused: int = 0

    def accept(self) -> None:
        self.accepted += 1

    def refuse(self) -> None:
        self.refused += 1

    @property
    def total(self) -> int:
        return self.accepted + self.refused

    @property
    def rate(self) -> float:
        return self.accepted / self.total if self.total else 0.0

    def line(self) -> str:
        return f"{self.name} {self.accepted}/{self.total} accepted ({self.rate:.1%}), floor {self.floor:.1%}"

    def check(self) -> None:
        """Record the rate for the summary, and fail below the floor."""
        RESULTS.append(self.line())
        assert self.total, f"{self.name}: no requests were run"
        assert self.rate >= self.floor, (
            f"{self.name}: only {self.rate:.1%} of {self.total} requests were accepted (floor {self.floor:.1%}); "
            "a tool that refuses everything would pass the property, so this is a failure"
        )
