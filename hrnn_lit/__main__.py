"""Hydra entry point: ``python -m hrnn_lit [overrides]`` (config root: conf/)."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from hrnn_lit.errors import HrnnError


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from hrnn_lit.run import run  # heavy imports after Hydra has parsed the command line

    try:
        results = run(cfg)
    except HrnnError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    metric = cfg.get("optimized_metric")
    return results.get(metric) if metric else None


if __name__ == "__main__":
    main()
