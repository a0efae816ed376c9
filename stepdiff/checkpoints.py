r"""Checkpoints and their provenance: what a run was, and the committed form of a trained model.

A run of ``stepdiff train`` writes one checkpoint file ({func}`stepdiff.train.save_checkpoint`):
the weights, the optimiser and the EMA, the step, every step's loss, and a **record** of where
it came from ({func}`provenance`):

- ``config``: the resolved configuration ({func}`stepdiff.config.resolve`), enough to rebuild
  the model and its data;
- ``command``: the exact command line (``argv``) and ``seed``;
- ``version`` and ``commit`` of the package (the git commit, and whether the package's files
  differed from it), ``python`` and ``torch`` versions;
- ``device`` (the processor or GPU, and the threads or processes used);
- filled in when read ({func}`record_of`): ``step``, ``wall_s`` and ``cpu_s`` (over resumed
  parts too), ``losses_head`` (the losses of the first {data}`LOSSES_HEAD` steps, which the
  provenance test re-computes), ``final_loss``; and ``metrics`` once ``stepdiff evaluate`` has
  run ({func}`add_metrics`).

A **committed model** ({func}`export`) is the EMA weights alone, in float16 by default, as
``<name>.pt`` beside ``<name>.json``, the record with the weights file's size and SHA-256. The
``.pt`` is PyTorch's own zip format with its entries deflate-compressed ({func}`save_compressed`):
``torch.load`` reads it as it is, and it is about 8 % smaller, which the 40 MB budget of all
committed weights needs. The
chapters read their numbers from that JSON; {func}`load` rebuilds the model from either form.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import platform
import subprocess
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "LOSSES_HEAD",
    "EXPORT_DTYPES",
    "git_commit",
    "device_description",
    "provenance",
    "read_checkpoint",
    "portable_command",
    "record_of",
    "load",
    "add_metrics",
    "export",
    "write_json",
    "file_sha256",
    "save_compressed",
]

LOSSES_HEAD = 50
"""How many first-step losses a record keeps (what the provenance test re-runs)."""

EXPORT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# --- facts about the machine and the code -----------------------------------------------------


def git_commit() -> dict:
    """``{"commit", "dirty"}`` of the git checkout holding the package, or ``None`` values when the
    package is not in one (an installed copy). ``dirty``: the package's files differ from the commit."""
    root = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": bool(status.strip())}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description(device: torch.device | str = "cpu") -> str:
    """The device in words: the GPU's name, or the processor's model and core count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_name()}, {os.cpu_count()} cores"


def provenance(config: dict, argv: list[str] | None, *, device: torch.device | str = "cpu",
               world_size: int = 1) -> dict:
    """The record of a run about to start (see the module docstring)."""
    from . import __version__

    git = git_commit()
    record = {
        "name": config["name"],
        "kind": config["kind"],
        "config": config,
        "command": list(argv) if argv is not None else None,
        "seed": config["train"]["seed"],
        "version": __version__,
        "commit": git["commit"],
        "dirty": git["dirty"],
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "device": device_description(device),
        "threads": torch.get_num_threads(),
        "world_size": world_size,
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    # Plain JSON types only: the record travels inside checkpoints read with weights_only=True.
    return json.loads(json.dumps(record, default=_jsonable))


# --- reading checkpoints ----------------------------------------------------------------------


def read_checkpoint(path: str | Path) -> dict:
    """The stored dictionary of a training checkpoint written by ``stepdiff train``, checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which file
        raise ValueError(f"{path} is not a readable checkpoint: {err}") from None
    if not isinstance(state, dict) or "model" not in state or not isinstance(state.get("metadata"), dict):
        raise ValueError(f"{path} is not a checkpoint written by `stepdiff train` (no model and record)")
    return state


def record_of(state: dict) -> dict:
    """The full record of a checkpoint: its provenance plus the step, the time and the first losses."""
    record = dict(state["metadata"])
    losses = [float(v) for v in torch.as_tensor(state["losses"]).tolist()]
    elapsed = state.get("elapsed") or {}
    record.update(
        step=int(state["step"]),
        wall_s=float(elapsed.get("wall_s", 0.0)),
        cpu_s=float(elapsed.get("cpu_s", 0.0)),
        losses_head=losses[:LOSSES_HEAD],
        final_loss=(sum(losses[-50:]) / len(losses[-50:])) if losses else None,
    )
    return record


def frozen_base_prefixes(model: nn.Module) -> tuple[str, ...]:
    """The state-dict prefixes of a model's frozen base, for a model built on a committed one (a
    ControlNet: ``base.``; on a text model: ``text.`` and ``controlnet.base.``; a text model whose
    encoder is a committed CLIP's frozen text tower: ``encoder.``); ``()`` otherwise."""
    from .models.controlnet import ControlNet, TextControlNet
    from .models.text import TextConditioned

    if isinstance(model, TextControlNet):
        return ("text.", "controlnet.base.")
    if isinstance(model, ControlNet):
        return ("base.",)
    if isinstance(model, TextConditioned) and getattr(model, "frozen_encoder_source", None):
        return ("encoder.",)
    return ()


def _base_name(config: dict) -> str:
    """The committed model a frozen base comes from: an adapter's base, or a text model's CLIP."""
    return config["base"]["model"] if "base" in config else config["model"]["text"]["clip"]


def tensors_sha256(tensors: dict) -> str:
    """The SHA-256 of named tensors (names sorted; each name, dtype, shape and raw bytes), so two
    sets of weights are equal bit for bit exactly when their digests are."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        # reshape(-1): a 0-dim tensor (a scalar buffer) cannot be viewed as bytes of another width
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _base_digest(state: dict, prefixes: tuple[str, ...], dtype: torch.dtype) -> str:
    """The digest of a model's frozen base (the tensors under ``prefixes``) as exported in ``dtype``."""
    return tensors_sha256({k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()
                           if k.startswith(prefixes)})


def _rebuild(record: dict, weights: dict, where: str) -> nn.Module:
    from .config import build_model, resolve

    config = resolve(record["config"], source=where)
    model = build_model(config)
    base_sha = (record.get("weights") or {}).get("base_sha256")
    if base_sha:
        # Adapter-only weights: the frozen base comes from its committed model, which must be, bit
        # for bit, the base this adapter was trained and exported with.
        prefixes = frozen_base_prefixes(model)
        dtype = EXPORT_DTYPES[record["weights"]["dtype"]]
        if not prefixes or _base_digest(model.state_dict(), prefixes, dtype) != base_sha:
            raise ValueError(f"{where} holds a {config['kind']} model trained on the frozen {_base_name(config)!r}, "
                             f"but that base as found now is not the one it was trained with (weights digest differs)")
        missing, unexpected = model.load_state_dict(weights, strict=False)
        stray = [k for k in missing if not k.startswith(prefixes)] + list(unexpected)
        if stray:
            raise ValueError(f"the weights in {where} do not match the model of its record: {stray[:5]}")
    else:
        try:
            model.load_state_dict(weights)
        except RuntimeError as err:
            raise ValueError(f"the weights in {where} do not match the model of its record "
                             f"({config['kind']} {config['model'].get('arch')}): {err}") from None
    if record.get("kind") == "classifier" and "held_out" in record:
        model.held_out = dict(record["held_out"])
    return model.eval()


def _read_any(path: Path) -> tuple[str, Any]:
    """``("checkpoint", state)`` for a training checkpoint, ``("export", json_path)`` for an exported
    model (its ``.pt`` or its ``.json``)."""
    if path.suffix == ".json":
        return "export", path
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which file
        raise ValueError(f"{path} is not a readable checkpoint: {err}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state.get("metadata"), dict):
        return "checkpoint", state
    json_path = path.with_suffix(".json")
    if not json_path.is_file():
        raise ValueError(f"{path} is neither a checkpoint written by `stepdiff train` nor exported weights "
                         f"with their record {json_path.name} beside them")
    return "export", json_path


def load(source: str | Path, *, ema: bool = True) -> tuple[nn.Module, dict]:
    """``(model, record)`` from a training checkpoint, an exported ``<name>.pt`` (with its JSON
    beside it), or the name of a committed model ({mod}`stepdiff.pretrained`).

    A checkpoint gives its EMA weights (``ema=False``: the raw weights); the model is rebuilt
    from the record's configuration and returned in eval mode, in float32 on the CPU.
    """
    path = Path(source)
    if not path.exists():
        from . import pretrained

        if str(source) in pretrained.available():
            return pretrained.load(str(source))
        raise FileNotFoundError(
            f"no checkpoint {str(source)!r}: not a file, and not a committed model ({pretrained.available()})"
        )
    kind, found = _read_any(path)
    if kind == "export":
        return _load_export(found)
    state = found
    if "step" not in state:
        raise ValueError(f"{path} is not a checkpoint written by `stepdiff train` (no step)")
    weights = state["model"]
    if ema and state.get("ema") is not None:
        weights = state["ema"]["model"]
    record = record_of(state)
    return _rebuild(record, weights, str(path)), record


def _load_export(json_path: Path) -> tuple[nn.Module, dict]:
    record = json.loads(json_path.read_text(encoding="utf-8"))
    info = record.get("weights") or {}
    weights_path = json_path.with_name(info.get("file", json_path.stem + ".pt"))
    if not weights_path.is_file():
        raise FileNotFoundError(f"the record {json_path} names the weights {weights_path}, which do not exist")
    digest = file_sha256(weights_path)
    if info.get("sha256") and digest != info["sha256"]:
        raise ValueError(f"{weights_path} does not match its record {json_path} (SHA-256 {digest[:12]}..., "
                         f"recorded {info['sha256'][:12]}...)")
    weights = torch.load(weights_path, map_location="cpu", weights_only=True)
    return _rebuild(record, weights, str(weights_path)), record


# --- writing ----------------------------------------------------------------------------------


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, as hex (what a committed model's record names its weights by)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_compressed(obj: Any, f) -> None:
    """``torch.save(obj)`` into the open binary file ``f``, with every entry of PyTorch's zip archive
    deflate-compressed (level 9) instead of stored. ``torch.load`` reads the result unchanged (its
    zip reader inflates), though not with ``mmap=True``. The bytes are a function of ``obj`` alone:
    the entries keep PyTorch's names, order and fixed timestamps, so an export is reproducible."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with zipfile.ZipFile(buffer) as src, zipfile.ZipFile(f, "w") as out:
        for info in src.infolist():
            packed = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            packed.external_attr = info.external_attr
            out.writestr(packed, src.read(info), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)


def _atomic(path: Path, write) -> Path:
    """Write ``path`` through a temporary file in its folder, replaced in one step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    text = json.dumps(data, indent=1, sort_keys=False, default=_jsonable) + "\n"
    return _atomic(Path(path), lambda f: f.write(text.encode("utf-8")))


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def add_metrics(path: str | Path, metrics: dict) -> Path:
    """Store ``metrics`` (e.g. ``stepdiff evaluate``'s report) in a checkpoint's record, or in the
    JSON record of an exported model; the file is replaced atomically. Returns the file written."""
    kind, found = _read_any(Path(path))
    metrics = json.loads(json.dumps(metrics, default=_jsonable))
    if kind == "export":
        record = json.loads(found.read_text(encoding="utf-8"))
        record["metrics"] = metrics
        return write_json(found, record)
    found["metadata"] = dict(found["metadata"], metrics=metrics)
    return _atomic(Path(path), lambda f: torch.save(found, f))


def portable_command(argv: list[str]) -> list[str]:
    """The recorded command line with its ``--out`` path reduced to the file name: the folder was the
    training machine's and means nothing elsewhere, while the file name still replays the run.

    >>> portable_command(["stepdiff", "train", "--config", "digits-unet", "--out", "../runs/2026/d.pt"])
    ['stepdiff', 'train', '--config', 'digits-unet', '--out', 'd.pt']
    >>> portable_command(["stepdiff", "train", "--out=runs/d.pt"])
    ['stepdiff', 'train', '--out=d.pt']
    """
    out, after_flag = [], False
    for arg in argv:
        if after_flag:
            arg, after_flag = Path(arg).name, False
        elif arg == "--out":
            after_flag = True
        elif arg.startswith("--out="):
            arg = "--out=" + Path(arg[len("--out="):]).name
        out.append(arg)
    return out


def export(checkpoint: str | Path, directory: str | Path, name: str | None = None, *,
           dtype: str = "float16") -> tuple[Path, Path]:
    """Write a checkpoint's EMA weights (a classifier's weights) as ``<directory>/<name>.pt`` in
    ``dtype`` and its record as ``<name>.json``; returns both paths.

    The record gains ``weights`` (file name, dtype, bytes, SHA-256, parameter count) and keeps
    ``metrics`` if the checkpoint has been evaluated. Float tensors are cast to ``dtype``; integer
    buffers are kept as they are. A model built on a frozen committed base (a ControlNet) keeps only
    its own weights: the export first checks that the checkpoint's base equals the committed base bit
    for bit, and records the base's digest (``weights.base_sha256``), which loading checks again.
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(EXPORT_DTYPES)}")
    state = read_checkpoint(checkpoint)
    record = record_of(state)
    name = name or record["name"]
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"a model name is a plain file stem; got {name!r}")
    weights = state["ema"]["model"] if state.get("ema") is not None else state["model"]
    target = EXPORT_DTYPES[dtype]
    model = _rebuild(record, weights, str(checkpoint))  # the weights load into the recorded model
    base_sha = None
    prefixes = frozen_base_prefixes(model)
    if prefixes:
        # A model built on a committed base stores only what it trained. Its base must still be the
        # committed one bit for bit, in the training precision, or the adapter would be exported
        # for a base it was not trained with.
        from .config import build_model, resolve

        # The raw trained weights are compared, not the EMA's: an average x + (1 - beta)(p - x) of a
        # constant keeps its value but turns a -0.0 into +0.0, so only the raw copy can be equal in bits.
        committed = build_model(resolve(record["config"], source=str(checkpoint))).state_dict()
        raw = {k: v for k, v in state["model"].items() if k.startswith(prefixes)}
        changed = [k for k, v in raw.items() if tensors_sha256({k: v}) != tensors_sha256({k: committed[k].to(v.dtype)})]
        if changed or set(raw) != {k for k in committed if k.startswith(prefixes)}:
            base_name = _base_name(record["config"])
            raise ValueError(f"{checkpoint}: the frozen base differs from the committed {base_name!r} "
                             f"in {len(changed)} tensors ({changed[:3]}); not exported")
        base_sha = _base_digest(committed, prefixes, target)
        weights = {k: v for k, v in weights.items() if not k.startswith(prefixes)}
    weights = {k: (v.to(target) if v.is_floating_point() else v).contiguous() for k, v in weights.items()}
    directory = Path(directory)
    weights_path = _atomic(directory / f"{name}.pt", lambda f: save_compressed(weights, f))
    record["name"] = name
    if record.get("command"):
        record["command"] = portable_command(record["command"])
    record["weights"] = {
        "file": weights_path.name,
        "dtype": dtype,
        "bytes": weights_path.stat().st_size,
        "sha256": file_sha256(weights_path),
        "parameters": int(sum(v.numel() for v in weights.values() if v.is_floating_point())),
        "exported_from_step": record["step"],
    }
    if base_sha:
        record["weights"]["base_sha256"] = base_sha  # the base's tensors (not stored here), as exported
    record_path = write_json(directory / f"{name}.json", record)
    return weights_path, record_path
