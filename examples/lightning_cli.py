"""lightning_eff from LightningCLI: the callbacks and strategies by class path or registered name.

    python examples/lightning_cli.py fit --trainer.max_epochs=3 \
        --trainer.callbacks+=lightning_eff.GradualPruning --trainer.callbacks.target_sparsity=0.8 \
        --trainer.callbacks+=lightning_eff.QuantizationAwareTraining --trainer.callbacks.scheme=int8_dynamic \
        --trainer.strategy=ddp_fp16 --trainer.accelerator=cpu --trainer.devices=2

or the same in a config file (`--config cli.yaml`):

    trainer:
      strategy: ddp_fp16
      callbacks:
        - class_path: lightning_eff.GradualPruning
          init_args: {target_sparsity: 0.8}
        - class_path: lightning_eff.QuantizationAwareTraining
          init_args: {scheme: int8_dynamic}

Needs `pip install 'lightning-eff[cli]'` (jsonargparse). `LightningEffCLI` is `LightningCLI` with the suite's
own config errors printed as one line (`lightning-eff: error: GradualPruning: target_sparsity=1.5: must be in
[0, 1)`, exit status 2); a plain `LightningCLI` works too. Put your own LightningModule and DataModule in
place of the digits task.
"""

import lightning_eff  # noqa: F401  (registers the ddp_* strategy names)
from lightning_eff.lightning_cli import LightningEffCLI
from lightning_eff.tasks import DigitsDataModule, DigitsMLP


def main() -> None:
    LightningEffCLI(DigitsMLP, DigitsDataModule)


if __name__ == "__main__":
    main()
