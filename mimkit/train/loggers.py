"""Where a run's scalars and pictures go: ``metrics.jsonl`` always, and what ``run.loggers`` adds.

=============  ===========================================  =========================================
logger         files                                        resumed run
=============  ===========================================  =========================================
jsonl          ``RUN/metrics.jsonl``, one JSON line a       lines past the checkpoint are dropped
               record, appended and flushed                 when the run resumes (the trainer)
csv            ``RUN/metrics.csv``, one row a record,       rebuilt from ``metrics.jsonl`` on start
               a column per key ever logged
tensorboard    ``RUN/tensorboard/events.out.tfevents.*``    the new writer purges events from the
               (``torch.utils.tensorboard``)                step after the checkpoint on (TensorBoard's
                                                            ``purge_step``; from step 0 on a fresh start)
wandb          ``RUN/wandb/`` (W&B's offline run unless     the same run id; what the run logged up to
               ``WANDB_MODE`` says otherwise), the          the checkpoint is sent again where the
               recipe as its config and as a file           killed process could not finish its log
=============  ===========================================  =========================================

Only rank 0 logs. A resumed run is bit-identical to the uninterrupted one, so the steps a killed
process logged after its last checkpoint would be logged again with the same values: each logger
keeps them once. Every record is written as it comes (the files are flushed), so a killed run
loses nothing it had logged, except in W&B's own buffered log, which the resumed run refills.
Scalars keep their ``metrics.jsonl`` names in every logger;
pictures go to TensorBoard and W&B as images (the PNG files are the trainer's).
"""

from __future__ import annotations

import csv
import io
import json
import os
import uuid
from pathlib import Path
from typing import Any

from mimkit.files import atomic_write_text

LOGGERS = ("jsonl", "csv", "tensorboard", "wandb")
METRICS_FILE = "metrics.jsonl"
CSV_FILE = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
WANDB_STATE = "mimkit-wandb.json"  # the run id and whether its process finished, inside WANDB_DIR
IMAGES_DIR = "images"  # RUN/images/stepNNNNNNNN.png, the reconstructions during training
IMAGE_TAG = "reconstructions"


class MissingLoggerPackage(ImportError):
    """A logger in ``run.loggers`` needs a package that is not installed; the message names the extra."""


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in record.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class JsonlLogger:
    """``metrics.jsonl``: the record as one JSON line, appended and flushed."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / METRICS_FILE

    def scalars(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def image(self, tag: str, picture, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class CsvLogger:
    """``metrics.csv``: one row a record; a key not seen before rewrites the file with its column.

    Records hold different keys (training steps, evaluations, monitor runs), so the header is the
    union of all keys in first-seen order and a record leaves the others empty. The file mirrors
    ``metrics.jsonl``: it is rebuilt from it when the run starts (after a resume has trimmed it).
    """

    def __init__(self, run_dir: Path):
        self.path = run_dir / CSV_FILE
        self.records: list[dict[str, Any]] = []
        self.columns: list[str] = []
        jsonl = run_dir / METRICS_FILE
        if jsonl.is_file():
            from mimkit.visualize import read_metrics

            self.records = read_metrics(jsonl)
        for record in self.records:
            self._add_columns(record)
        self._rewrite()

    def _add_columns(self, record: dict[str, Any]) -> bool:
        new = [k for k in record if k not in self.columns]
        self.columns.extend(new)
        return bool(new)

    def _rows(self, records: list[dict[str, Any]], header: bool) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=self.columns, restval="", lineterminator="\n")
        if header:
            writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in records)
        return out.getvalue()

    def _rewrite(self) -> None:
        atomic_write_text(self.path, self._rows(self.records, header=True))

    def scalars(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self._add_columns(record):
            self._rewrite()
            return
        with open(self.path, "a") as f:
            f.write(self._rows([record], header=False))

    def image(self, tag: str, picture, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """TensorBoard event files under ``RUN/tensorboard``, flushed after every record."""

    def __init__(self, run_dir: Path, resumed_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise MissingLoggerPackage(_install_hint("tensorboard", "tensorboard", err)) from None
        # purge_step hides, in every reader, what an earlier process wrote past the checkpoint (all
        # of it on a fresh start: a run killed before its first checkpoint starts over)
        purge = 0 if resumed_step is None else resumed_step + 1
        self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR), purge_step=purge)

    def scalars(self, record: dict[str, Any]) -> None:
        for key, value in _scalars(record).items():
            self.writer.add_scalar(key, value, global_step=record["step"])
        self.writer.flush()

    def image(self, tag: str, picture, step: int) -> None:
        self.writer.add_image(tag, picture, global_step=step, dataformats="CHW")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """A W&B run in ``RUN/wandb``: offline unless ``WANDB_MODE`` is set, resumed under the same id.

    W&B buffers its offline log in memory until the run finishes: a killed process's log can be
    empty. So a process resuming after one that did not finish replays ``metrics.jsonl`` (already
    cut at the checkpoint) and ``RUN/images`` into the run before going on, and its offline run
    (``RUN/wandb/offline-run-*``, the latest) holds the whole run, every step once: sync that one.
    """

    def __init__(self, run_dir: Path, config: dict[str, Any], resumed_step: int | None):
        try:
            import wandb
        except ImportError as err:
            raise MissingLoggerPackage(_install_hint("wandb", "wandb", err)) from None
        self.wandb = wandb
        directory = run_dir / WANDB_DIR
        directory.mkdir(parents=True, exist_ok=True)
        self.state_path = directory / WANDB_STATE
        state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
        if resumed_step is None or "id" not in state:
            state = {"id": uuid.uuid4().hex[:12], "finished": True}
        replay = resumed_step is not None and not state["finished"]
        self.run = wandb.init(
            dir=str(run_dir),
            project=os.environ.get("WANDB_PROJECT", "mimkit"),
            name=run_dir.name,
            id=state["id"],
            resume="allow",
            mode=os.environ.get("WANDB_MODE", "offline"),
            config=config,
        )
        recipe = run_dir / "recipe.yaml"
        if recipe.is_file():
            self.run.save(str(recipe), base_path=str(run_dir), policy="now")
        self.state = {**state, "finished": False}
        atomic_write_text(self.state_path, json.dumps(self.state))
        if replay:
            self._replay(run_dir, resumed_step)

    def _replay(self, run_dir: Path, resumed_step: int) -> None:
        """What the run logged up to ``resumed_step``, one W&B row per step, pictures included."""
        from mimkit.visualize import read_metrics

        rows: dict[int, dict[str, Any]] = {}
        jsonl = run_dir / METRICS_FILE
        for record in read_metrics(jsonl) if jsonl.is_file() else []:
            rows.setdefault(record["step"], {}).update(_scalars(record))
        for png in sorted((run_dir / IMAGES_DIR).glob("step*.png")):
            step = int(png.stem.removeprefix("step"))
            if step <= resumed_step:
                rows.setdefault(step, {})[IMAGE_TAG] = self.wandb.Image(str(png))
        for step in sorted(rows):
            self.run.log(rows[step], step=step)

    def scalars(self, record: dict[str, Any]) -> None:
        self.run.log(_scalars(record), step=record["step"])

    def image(self, tag: str, picture, step: int) -> None:
        image = picture.permute(1, 2, 0).mul(255).round().byte().numpy()
        self.run.log({tag: self.wandb.Image(image)}, step=step)

    def close(self) -> None:
        self.run.finish()
        atomic_write_text(self.state_path, json.dumps({**self.state, "finished": True}))


def _install_hint(logger: str, extra: str, err: ImportError) -> str:
    return (
        f"run.loggers includes {logger}, which needs a package that is not installed ({err}); "
        f"install it with: pip install 'mimkit[{extra}]' (or remove {logger} from run.loggers)"
    )


class RunLoggers:
    """Every logger of a run behind one ``scalars(record)`` / ``image(tag, picture, step)``.

    ``active`` is False on ranks other than 0: nothing is written there. ``resumed_step`` is the
    checkpoint's step on a resumed run, None on a fresh one. A logger whose package is missing
    raises :class:`MissingLoggerPackage` here, before any training.
    """

    def __init__(
        self,
        run_dir: Path,
        names: list[str] | tuple[str, ...],
        config: dict[str, Any],
        resumed_step: int | None,
        active: bool,
    ):
        self.loggers: list[Any] = []
        if not active:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.loggers.append(JsonlLogger(run_dir))
        for name in dict.fromkeys(names):  # in order, once each
            if name == "csv":
                self.loggers.append(CsvLogger(run_dir))
            elif name == "tensorboard":
                self.loggers.append(TensorBoardLogger(run_dir, resumed_step))
            elif name == "wandb":
                self.loggers.append(WandbLogger(run_dir, config, resumed_step))
            elif name != "jsonl":
                raise ValueError(f"unknown logger {name!r}; valid: {', '.join(LOGGERS)}")

    def scalars(self, record: dict[str, Any]) -> None:
        """Log ``record`` (it has a ``step``; its numeric entries are the scalars) everywhere."""
        for logger in self.loggers:
            logger.scalars(record)

    def image(self, tag: str, picture, step: int) -> None:
        """Log ``picture``, a (C, H, W) float tensor in [0, 1], where images can go."""
        for logger in self.loggers:
            logger.image(tag, picture, step)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def check_available(names: list[str] | tuple[str, ...]) -> None:
    """Raise :class:`MissingLoggerPackage` for a logger whose package is missing, without starting it."""
    import importlib.util

    for name, module in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if name in names and importlib.util.find_spec(module) is None:
            raise MissingLoggerPackage(_install_hint(name, name, ImportError(f"no module named {module!r}")))
