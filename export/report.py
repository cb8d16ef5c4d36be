"""What `fold_batchnorm` did with each BatchNormalization layer, as data and as a table.

One `FoldRecord` per BN layer (the model's own in topological order, then each nested model's);
a `FoldReport` holds them and counts them by action:

    folded          merged into the kernel and bias of the layer before it; the BN is gone
    folded_forward  merged into the kernel and bias of the Dense or valid conv after it; gone
    refused         a fold was possible in shape but a precondition failed; the BN is kept as is
    kept            no layer to fold into; the BN stays, in inference a per-channel multiply-add
"""

from __future__ import annotations

from dataclasses import dataclass

ACTIONS = ("folded", "folded_forward", "refused", "kept")
_FOLDS = ("folded", "folded_forward")


@dataclass(frozen=True)
class FoldRecord:
    """The fate of one BN layer.

    Attributes:
        bn: the BN layer's name; inside a nested model, prefixed by the model's name and "/"
            (`"block_1/bn"`).
        producer: the layer the BN was folded into (the one before it for "folded", the one
            after it for "folded_forward"); for "refused" and "kept", the layer whose output
            the BN reads, or None when it reads a model input.
        action: one of "folded", "folded_forward", "refused", "kept".
        reason: why a BN was refused or kept, as a sentence; empty for folds.
    """

    bn: str
    producer: str | None
    action: str
    reason: str = ""

    def __post_init__(self):
        if self.action not in ACTIONS:
            raise ValueError(f"`action` must be one of {ACTIONS}. Received: action={self.action!r}")
        if (self.action in _FOLDS) == bool(self.reason):
            raise ValueError(
                "A fold has no reason and a refused or kept BN needs one. Received: "
                f"action={self.action!r}, reason={self.reason!r}"
            )


@dataclass(frozen=True)
class FoldReport:
    """All `FoldRecord`s of one `fold_batchnorm` call, in the order the BN layers were met.

    `folded`, `refused` and `kept` are tuples of records (their len() is the count); `str()`
    gives a summary line and a table.
    """

    records: tuple[FoldRecord, ...] = ()

    def __post_init__(self):
        # A list would make the frozen report mutable through the back door.
        object.__setattr__(self, "records", tuple(self.records))

    def _with(self, *actions) -> tuple[FoldRecord, ...]:
        return tuple(r for r in self.records if r.action in actions)

    @property
    def folded(self) -> tuple[FoldRecord, ...]:
        """BN layers removed: folded into the layer before ("folded") or after them."""
        return self._with(*_FOLDS)

    @property
    def refused(self) -> tuple[FoldRecord, ...]:
        return self._with("refused")

    @property
    def kept(self) -> tuple[FoldRecord, ...]:
        return self._with("kept")

    def summary(self) -> str:
        forward = len(self._with("folded_forward"))
        return (
            f"{len(self.records)} BatchNormalization layers: {len(self.folded)} folded "
            f"({forward} forward), {len(self.refused)} refused, {len(self.kept)} kept"
        )

    def lines(self) -> list[str]:
        """The summary, then one indented line per refused or kept BN with its reason: the
        short form the `kerasbn` command and `ExportReport` print (`str()` is the full table)."""
        reasons = [f"  {r.action} {r.bn}: {r.reason}" for r in self.refused + self.kept]
        return [self.summary(), *reasons]

    def __str__(self) -> str:
        rows = [("BN", "action", "into / after", "reason")]
        rows += [(r.bn, r.action, r.producer or "-", r.reason) for r in self.records]
        rows.insert(1, tuple("-" * len(cell) for cell in rows[0]))
        # The reason is last and unpadded: it is the one long, free-text column.
        widths = [max(len(row[i]) for row in rows) for i in range(3)]

        def line(row):
            cells = [cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)]
            return "  ".join([*cells, row[3]]).rstrip()

        return "\n".join([self.summary(), *map(line, rows)])
