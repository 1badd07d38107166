"""`python -m lightning_eff.frontier SWEEP_DIR`, the same as `lightning-eff-frontier SWEEP_DIR`."""

from lightning_eff.frontier.cli import main

main()
