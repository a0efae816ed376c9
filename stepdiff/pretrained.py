r"""The committed models: small networks trained by ``stepdiff train``, shipped inside the package.

Each committed model is a pair of files in ``stepdiff/weights/``: ``<name>.pt`` (the EMA weights,
float16 for the generators) and ``<name>.json`` (its record: the configuration, the exact command,
seed, commit, device, training time, the first steps' losses, and the evaluation metrics; see
{mod}`stepdiff.checkpoints`). They are found with ``importlib.resources``, so an installed
package and a notebook downloaded from the book find them as a checkout does:

```python
from stepdiff import pretrained
model, record = pretrained.load("digits-unet")
record["metrics"]          # what `stepdiff evaluate` measured
```

The provenance test (``tests/test_pretrained.py``) re-runs the first steps of every committed
model's recorded configuration and compares the losses with the recorded ones.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from torch import nn

__all__ = ["weights_dir", "available", "record", "load"]


def weights_dir() -> Path:
    """The folder of the committed models (inside the installed package)."""
    return Path(str(resources.files("stepdiff").joinpath("weights")))


def available() -> list[str]:
    """The names of the committed models (each ``<name>.json`` with its ``<name>.pt``)."""
    folder = weights_dir()
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.json") if p.with_suffix(".pt").is_file())


def _path(name: str) -> Path:
    if not isinstance(name, str) or name not in available():
        raise ValueError(f"unknown committed model {name!r}; the committed models are {available()}")
    return weights_dir() / f"{name}.json"


def record(name: str) -> dict:
    """The JSON record of the committed model ``name`` (no weights are read)."""
    return json.loads(_path(name).read_text(encoding="utf-8"))


def load(name: str) -> tuple[nn.Module, dict]:
    """``(model, record)``: the committed model ``name`` rebuilt from its record, weights checked
    against the recorded SHA-256, in eval mode, float32 on the CPU."""
    from .checkpoints import _load_export

    return _load_export(_path(name))
