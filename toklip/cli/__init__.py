"""Console entry points: each a thin Hydra main over a plain function."""

from pathlib import Path

# The Hydra configs live in conf/ at the top of the source tree (install with `pip install -e .`).
CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"
if not CONFIG_DIR.is_dir():
    raise ImportError(f"toklip's Hydra configs are missing: expected {CONFIG_DIR} (install from a clone with pip install -e .)")
