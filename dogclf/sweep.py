"""Sweep specs: a list and/or a grid of job-spec overrides, one training run per point.

```yaml
# jobs/sweeps/<name>.yaml
base:                 # overrides shared by every point (optional)
  trainer.max_epochs: 15
runs:                 # explicit points (optional)
  - {optim.loss: ce}
  - {optim.loss: focal, optim.focal_gamma: 2.0}
grid:                 # every combination (optional), crossed with each entry of `runs`
  trainer.seed: [0, 1, 2]
```
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import yaml

from dogclf.config import ConfigError, JobConfig, load_job


def load_sweep(path: str | Path) -> list[dict[str, Any]]:
    """The sweep's points, each a {dotted key: value} override mapping (keys are checked by `sweep_jobs`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path} does not exist: pass an existing file, e.g. jobs/sweeps/<name>.yaml")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"sweep file {path} is not valid YAML: {err}".replace("\n", " ")) from None
    unknown = set(spec) - {"base", "runs", "grid"} if isinstance(spec, dict) else {"(not a mapping)"}
    if unknown:
        raise ConfigError(f"sweep file {path}: unknown top-level key(s) {sorted(unknown)}; use `base:`, `runs:`, "
                          "`grid:`")
    base = spec.get("base") or {}
    if not isinstance(base, dict):
        raise ConfigError(f"sweep file {path}: `base` must be a {{key: value}} mapping")
    runs = spec.get("runs") or [{}]
    grid = spec.get("grid") or {}
    if not isinstance(runs, list) or not all(isinstance(run, dict) for run in runs):
        raise ConfigError(f"sweep file {path}: `runs` must be a list of {{key: value}} mappings")
    if not isinstance(grid, dict) or not all(isinstance(values, list) and values for values in grid.values()):
        raise ConfigError(f"sweep file {path}: `grid` must map each key to a non-empty list of values")
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    points = [{**base, **run, **combo} for run in runs for combo in combos]
    if not spec.get("runs") and not grid:
        raise ConfigError(f"sweep file {path} defines no runs: add `runs:` or `grid:` entries")
    return points


def sweep_jobs(mode: str, base_overrides: list, points: list[dict[str, Any]]) -> list[JobConfig]:
    """One job config per point: the mode's spec, then the common overrides, then the point's (all validated)."""
    jobs = []
    for point in points:
        overrides = list(base_overrides) + list(point.items())
        try:
            jobs.append(load_job(mode, overrides))
        except ConfigError as err:
            raise ConfigError(f"sweep point {point}: {err}") from None
    return jobs

