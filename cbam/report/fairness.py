"""Is the comparison fair? Runs may differ in their attention config and their seed, nothing else."""

import json
from dataclasses import dataclass

from cbam.engine.records import flatten

from .runs import Run

# Per-run by nature (what is compared, or bookkeeping), or no influence on training: where results go.
IGNORED = ("seed", "attention", "resume", "tags", "group", "logger", "hydra")
MISSING = "<missing>"


@dataclass
class Difference:
    key: str  # dotted, e.g. optim.optimizer.lr
    values: list[tuple[object, list[str]]]  # (value, names of the runs holding it), the most common first

    def __str__(self) -> str:
        return f"{self.key}: " + " vs ".join(f"{_show(v)} ({', '.join(names)})" for v, names in self.values)


def _show(value) -> str:
    return value if value is MISSING else json.dumps(value)


def config_differences(runs: list[Run]) -> list[Difference]:
    """Every config key (outside IGNORED) on which the runs disagree, with the runs holding each value.

    One Difference per key covers every unfair pair: any two runs listed under different values.
    """
    flat = [{k: v for k, v in flatten(run.config).items() if k.split(".")[0] not in IGNORED} for run in runs]
    differences = []
    for key in sorted(set().union(*flat)):
        holders: dict[str, tuple[object, list[str]]] = {}
        for run, cfg in zip(runs, flat, strict=True):
            value = cfg.get(key, MISSING)
            token = "\0missing" if value is MISSING else json.dumps(value, sort_keys=True)
            holders.setdefault(token, (value, []))[1].append(run.name)
        if len(holders) > 1:
            values = sorted(holders.values(), key=lambda h: -len(h[1]))  # stable: ties keep run order
            differences.append(Difference(key, values))
    return differences
