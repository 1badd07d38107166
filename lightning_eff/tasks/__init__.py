"""Reference tasks on real data that installed packages ship: nothing is downloaded at run time."""

from lightning_eff.tasks.digits import DigitsCNN, DigitsDataModule, DigitsMLP
from lightning_eff.tasks.gpt import TinyGPT
from lightning_eff.tasks.text import TextDataModule

__all__ = ["DigitsCNN", "DigitsDataModule", "DigitsMLP", "TextDataModule", "TinyGPT"]
