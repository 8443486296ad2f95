"""Which store rows a run trains and evaluates on, given the store's massive-activation outliers.

Why in the run layer: the trainer (`saekit.train`) knows batch sources, never stores, so leaving
outliers out of training is a choice of the rows the run hands it (`train.exclude_outliers` in the
run config, default true), and the evaluation's headline row set is likewise the run's choice. The
outliers themselves are the store's (`saekit.store.outliers`: kept, flagged in an `outlier` column).

    RunFolder.train_data()   what the SAE was trained on: rows, outliers excluded, the rule
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import Tensor

from saekit.artifacts import atomic_write_json, read_json
from saekit.store.reader import ActivationStore

log = logging.getLogger(__name__)


@dataclass
class TrainingRows:
    """The rows a run trains on and how they were chosen (recorded as `<train>/data.json`)."""

    rows: Tensor  # global store rows, int64, in store order
    train_rows: int  # rows of the training documents (held-out documents removed)
    excluded_outliers: int  # of those, outliers left out (0 when exclude_outliers is false)
    outliers_in_training_docs: int
    exclude_outliers: bool
    outlier_rule: dict
    store_outliers_derived: bool  # True: the store has no written `outlier` column (cached before it existed)

    def summary(self) -> dict:
        out = asdict(self)
        out.pop("rows")
        out["rows_used"] = int(len(self.rows))
        return out

    def describe(self) -> str:
        if not self.exclude_outliers:
            return (f"trained on all {self.train_rows} rows of the training documents, "
                    f"{self.outliers_in_training_docs} massive-activation outliers included (train.exclude_outliers: false)")
        return (f"excluded {self.excluded_outliers} massive-activation outlier rows of {self.train_rows} "
                f"({self.outlier_rule.get('description', 'see the store manifest')}); trained on {len(self.rows)} rows")


def training_rows(store: ActivationStore, train_rows: Tensor, exclude_outliers: bool) -> TrainingRows:
    """The training documents' rows, minus the store's flagged outliers when `exclude_outliers`."""
    outlier_N = store.outlier_mask()
    flagged = outlier_N[train_rows]
    kept = train_rows[~flagged] if exclude_outliers else train_rows
    return TrainingRows(rows=kept, train_rows=int(len(train_rows)),
                        excluded_outliers=int(flagged.sum()) if exclude_outliers else 0,
                        outliers_in_training_docs=int(flagged.sum()), exclude_outliers=exclude_outliers,
                        outlier_rule=store.outlier_rule.to_json(), store_outliers_derived=not store.has_outlier_column)


def write_training_rows(path: Path, rows: TrainingRows) -> Path:
    """Write the record to `path` (a run's `RunFolder.train_data()`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, rows.summary())
    return path


def read_training_rows(path: Path) -> dict | None:
    """A run's recorded training rows (`RunFolder.train_data()`); None for runs trained before it existed."""
    return read_json(path) if Path(path).exists() else None


@dataclass
class EvalRows:
    """Held-out rows split into the headline's ordinary rows and the outliers reported apart."""

    ordinary: Tensor
    outliers: Tensor
    rule: dict

    def row_set(self, heldout_rows: int) -> dict:
        """The report's statement of which rows its headline figures cover (`saekit compare` checks it)."""
        return {"headline": "ordinary rows (massive-activation outliers excluded)", "outlier_rule": self.rule,
                "heldout_rows": heldout_rows, "ordinary_rows": int(len(self.ordinary)),
                "outlier_rows": int(len(self.outliers))}


def eval_rows(store: ActivationStore, rows: Tensor) -> EvalRows:
    """Split `rows` (in their order) by the store's outlier flags."""
    flagged = store.outlier_mask()[rows]
    return EvalRows(ordinary=rows[~flagged], outliers=rows[flagged], rule=store.outlier_rule.to_json())


def chunked(rows: Tensor, batch_rows: int) -> list[Tensor]:
    return [rows[i: i + batch_rows] for i in range(0, len(rows), batch_rows)]

