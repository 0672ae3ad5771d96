"""toklip's Hydra configs (package data): `pkg://toklip.conf`."""
