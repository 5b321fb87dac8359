"""Experiment tracking beside the JSONL step log, with TRL's `report_to` names and values: `none` (default),
`trackio`, `tensorboard`, or a list of them (`all` = both). Every scalar a recipe logs to log.jsonl goes to each
tracker at the same step, with the run's config; offline: TensorBoard event files in `<output_dir>/tensorboard`,
a local trackio project under `$TRACKIO_DIR` (default `<output_dir>/trackio`; the pipeline sets one for the whole
run). Both libraries are optional extras (`pip install 'distillability[tracking]'`)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError

TRACKERS = ("none", "trackio", "tensorboard", "all")


def _scalars(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Trackers:
    """The trackers `report_to` names, opened for one run (a recipe's output folder); `log` each step's row,
    `close` at the end."""

    def __init__(self, report_to: list[str], out: Path, run_name: str, config: dict):
        names = {n for n in report_to if n != "none"}
        if "all" in names:
            names = {"trackio", "tensorboard"}
        self.tb = self.trackio = None
        if "tensorboard" in names:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("config key 'runtime.report_to': tensorboard needs the tensorboard package "
                                  "(pip install 'distillability[tracking]')") from None
            self.tb = SummaryWriter(log_dir=str(out / "tensorboard"))
            import yaml

            self.tb.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```")
        if "trackio" in names:
            os.environ.setdefault("TRACKIO_DIR", str(out / "trackio"))
            try:
                import trackio
            except ImportError:
                raise ConfigError("config key 'runtime.report_to': trackio needs the trackio package "
                                  "(pip install 'distillability[tracking]')") from None
            self.trackio = trackio
            trackio.init(project=os.environ.get("TRACKIO_PROJECT", "distillability"), name=run_name, config=config,
                         embed=False, auto_log_gpu=False)

    def log(self, row: dict) -> None:
        scalars, step = _scalars(row), row.get("step")
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, global_step=step)
        if self.trackio is not None:
            self.trackio.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.trackio is not None:
            self.trackio.finish()
            self.trackio = None
