"""The identity of a checkpoint: a hash of its config and weights.

Anything derived from a checkpoint (a gallery index, ONNX graphs) records this, so a later user can be
told plainly when the derived files and the model they are about to use do not belong together.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK = 1 << 22  # 4 MiB reads: hashing a 100 MB checkpoint takes a fraction of a second


def checkpoint_fingerprint(checkpoint: str | Path) -> str:
    """SHA-256 (hex, first 16 characters) of ``config.json`` and every ``*.safetensors`` file.

    Raises:
        ValueError: When the folder has no ``config.json`` or no safetensors weights.
    """
    checkpoint = Path(checkpoint)
    weights = sorted(checkpoint.glob("*.safetensors"))
    if not (checkpoint / "config.json").is_file() or not weights:
        raise ValueError(
            f"{checkpoint} is not a checkpoint folder (needs config.json and *.safetensors weights)"
        )
    digest = hashlib.sha256()
    for path in [checkpoint / "config.json", *weights]:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            while block := handle.read(_CHUNK):
                digest.update(block)
    return digest.hexdigest()[:16]
