"""Console entry points: each a thin `@hydra.main` over a task of `toklip.tasks`."""

from ..config import CONFIG_MODULE

CONFIG_PATH = f"pkg://{CONFIG_MODULE}"  # the configs ship inside the package
