"""`python -m lightning_eff`: the same app as the `lightning-eff` command."""

from lightning_eff.cli import main

main()
