"""Train a T-EMDE dual encoder: ``accelerate launch examples/train_temde.py CONFIG.yaml [--flag value ...]``.

A thin shim over ``temde-hf train`` (`temde_hf.training.train.main`, with the command line's one-line
errors; ``--debug`` shows tracebacks); every setting is documented in `temde_hf/training/arguments.py`
and ``--help``.
"""

import sys

from temde_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
