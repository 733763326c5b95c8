"""Train a T-EMDE dual encoder: ``accelerate launch examples/train_temde.py CONFIG.yaml [--flag value ...]``.

A thin shim over `temde_hf.training.train.main` (also available as ``temde-hf train``); every setting
is documented in `temde_hf/training/arguments.py` and ``--help``.
"""

from temde_hf.training.train import main

if __name__ == "__main__":
    main()
