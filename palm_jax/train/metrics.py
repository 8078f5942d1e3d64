"""Per-epoch metrics: one JSON object per line in `metrics.jsonl`, and TensorBoard scalars when the
`tensorboard` package is importable (its event writer needs no TensorFlow; without the package, no events).

Each record holds: phase ("train" or "finetune"), epoch, step, loss, objective (loss + l1 * sum|scale|),
train_accuracy, eval_loss, eval_accuracy, lr, zero_fraction (of BN scales, or of xi for prox), seconds.
"""

import json
import time
from pathlib import Path

from palm_jax.utils import atomic_write

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: Path, phase: str | None = None) -> list[dict]:
    """The records of `run_dir/metrics.jsonl` (optionally of one phase), in the order written."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if phase is None or r.get("phase") == phase]


def keep_records(run_dir: Path, keep) -> None:
    """Rewrite `run_dir/metrics.jsonl` (if any) with only the records for which `keep(record)` is true."""
    path = Path(run_dir) / METRICS_FILE
    if path.exists():
        records = [r for r in read_metrics(run_dir) if keep(r)]
        atomic_write(path, "".join(json.dumps(r) + "\n" for r in records))


class MetricsWriter:
    """Appends epoch records; `keep_until=(phase, epoch)` first drops that phase's records after `epoch` (the
    epochs a resumed run redoes)."""

    def __init__(self, run_dir: Path, keep_until: tuple[str, int] | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        if keep_until is not None:
            phase, epoch = keep_until
            keep_records(self.run_dir, lambda r: r["phase"] != phase or r["epoch"] <= epoch)
        self._tb = _tensorboard_writer(self.run_dir / "tensorboard")

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            self._tb(record)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _tensorboard_writer(logdir: Path):
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError:
        return None
    return _TensorBoard(EventFileWriter(str(logdir)), event_pb2, summary_pb2)


class _TensorBoard:
    """Scalars `<phase>/<name>` at step = epoch, written with tensorboard's own event writer."""

    def __init__(self, writer, event_pb2, summary_pb2):
        self._writer, self._event, self._summary = writer, event_pb2, summary_pb2

    def __call__(self, record: dict) -> None:
        values = [
            self._summary.Summary.Value(tag=f"{record['phase']}/{name}", simple_value=float(value))
            for name, value in record.items()
            if isinstance(value, (int, float))
            and not isinstance(value, bool)
            and name not in ("epoch", "step")
        ]
        event = self._event.Event(
            wall_time=time.time(), step=int(record["epoch"]), summary=self._summary.Summary(value=values)
        )
        self._writer.add_event(event)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
