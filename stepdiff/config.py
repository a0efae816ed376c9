r"""Run configurations: what ``stepdiff train`` reads from a TOML file, checked and completed.

A configuration is a small TOML file (the package ships its own in ``stepdiff/configs/``, found
by name with {func}`find_config`) whose tables say what to train:

```toml
name = "digits-unet"        # the run's name
kind = "diffusion"          # or "classifier" (an evaluation classifier)

[data]                      # digits | shapes | image-folder | mnist | fashion-mnist | cifar10
name = "digits"
size = 16
condition = "class"         # none | class | text (text: the shapes captions)

[model]                     # unet | dit, a preset, and any field of its config changed
arch = "unet"
preset = "tiny"
channels = 32

[objective]                 # schedule, what the network predicts, the loss weighting
schedule = "vp-cosine"
prediction = "v"
weighting = "min-snr"

[train]                     # stepdiff.train.train's arguments, and the CPU threads
steps = 4000
batch_size = 128

[sample]                    # the defaults of `stepdiff sample` and `stepdiff evaluate`
sampler = "ddim"
steps = 30
```

{func}`resolve` fills every missing key with its default ({data}`DEFAULTS`) and refuses an
unknown table, key, dataset, architecture or value with an error that names it, so that a
typo never trains the wrong model quietly. The resolved dictionary is what a checkpoint stores,
and {func}`build_model`, {func}`build_data` and {func}`build_objective` turn it back into the
objects, so a checkpoint alone rebuilds its model.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "KINDS",
    "DATASETS",
    "CONDITIONS",
    "ARCHS",
    "CLASSIFIER_ARCHS",
    "WEIGHTINGS",
    "AUTOCAST",
    "DEFAULTS",
    "ConfigError",
    "config_names",
    "find_config",
    "load_config",
    "resolve",
    "set_value",
    "TrainingData",
    "build_data",
    "balanced_subset",
    "held_out_data",
    "build_model",
    "build_objective",
    "autocast_dtype",
    "load_base",
    "adapter_training",
]

KINDS = ("diffusion", "classifier", "clip", "vae", "autoencoder", "controlnet", "distill", "inpaint")
PART_KINDS = ("clip", "vae", "autoencoder")  # the text-to-image stack's parts: stepdiff.pipelines.PART_KINDS
# Runs built on a trained diffusion model named in [base]: a ControlNet (stepdiff.models.controlnet) and a
# distilled student (stepdiff.distill).
ADAPTER_KINDS = ("controlnet", "distill")
DATASETS = ("digits", "shapes", "image-folder", "mnist", "fashion-mnist", "cifar10")
CONDITIONS = ("none", "class", "text")
ARCHS = ("unet", "dit")
CLASSIFIER_ARCHS = ("digits-cnn", "digits-mlp", "shapes-cnn")
WEIGHTINGS = ("none", "min-snr")
AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# Scenes of the "shapes" data: the generator trains on seed 0 and is evaluated against the
# classifiers' held-out seed (stepdiff.classifiers.SHAPES_HELD_OUT_SEED), which neither the
# generator nor the classifier saw.
SHAPES_GENERATOR_SEED = 0


class ConfigError(ValueError):
    """A configuration that cannot be run; the message names the table and key."""


_DATA = {
    "name": "digits",
    "size": None,  # digits: 8 or 16; shapes: 32 (or 16); image-folder: required; mnist/cifar: native
    "condition": "none",
    "path": None,  # image-folder, mnist, fashion-mnist, cifar10: where the files are
    "split": "train",  # mnist, fashion-mnist, cifar10: train | test (the digits train on their training split)
    "n_classes": None,  # class conditioning: set from the data (an image folder: its sub-folders)
    "n": 20_000,  # shapes: number of training scenes
    "n_held_out": 2_000,  # shapes: held-out scenes for evaluation (and the classifier's held-out scores)
    "n_objects": [1, 3],  # shapes: objects per scene, an inclusive range
    "caption_style": "mixed",  # shapes: positional | relational | shape | mixed
    "channels": 3,  # image-folder: 1 or 3
    "pad": 0,  # mnist, fashion-mnist: background added on every side (2 gives 32x32)
    # diffusion: a trained autoencoder (a committed model's name or a checkpoint): the run trains and
    # samples in its scaled latents (latent diffusion), and sampled latents are decoded to images
    "latent": "",
    # digits: train on only this many of the training digits, taken class by class in turn (0: all);
    # small sets show memorisation (chapter II.12)
    "subset": 0,
}
_MODEL_DIFFUSION = {"arch": "unet", "preset": "tiny", "text": {}}
# clip: a trained CLIP (a committed model's name or a checkpoint) whose text tower, frozen, encodes the
# captions instead of a text encoder trained with the model (dim, depth and heads are then the CLIP's);
# tune: train that tower on with the model (from CLIP's weights) instead of keeping it frozen;
# one_hot: no encoder, each token's context is its one-hot vector (needs depth = 0; dim is then the vocabulary size);
# word_rows: also a free N(0, 1) row per word, summed over the caption, added to the UNet's time embedding;
# word_row_objects: with word_rows, a separate table of rows for each of the caption's first k objects
# (an object's words run from its "a"/"an" to the next one's), so the sum keeps which object has which word;
# layout: also paint each located object's words into its cell of the 3x3 grid, a map added to the UNet's first
# feature map (layout grounding, stepdiff.models.layout); prompts are then given every object a cell before
# sampling (stepdiff.shapes.locate_caption)
_TEXT = {"dim": 64, "depth": 2, "heads": 4, "clip": "", "tune": False, "one_hot": False, "word_rows": False,
         "word_row_objects": 1, "layout": False}
_MODEL_CLASSIFIER = {"arch": "digits-cnn", "width": None, "feature_dim": None, "hidden": None}
_OBJECTIVE = {
    "schedule": "vp-cosine",
    "schedule_args": {},
    "prediction": "v",
    "weighting": "none",
    "min_snr_gamma": 5.0,
}
_TRAIN_DIFFUSION = {
    "steps": 1000,
    "batch_size": 128,
    "lr": 1e-3,
    "lr_warmup": 0,
    "lr_decay": "constant",
    "grad_clip": 1.0,
    "ema_decay": 0.999,
    "seed": 0,
    "label_dropout": 0.0,
    "micro_batches": 1,
    "autocast": "none",
    "threads": 0,  # 0: leave torch's default
    "checkpoint_every": 0,  # 0: only at the end
}
_TRAIN_CLASSIFIER = {
    "steps": 1500,
    "batch_size": 128,
    "lr": 2e-3,
    "weight_decay": 1e-4,
    "shift": None,  # pixels of random shift; None: 1 at 8x8, 2 above
    "noise": 0.05,
    "seed": 0,
    "threads": 0,
}
_SAMPLE = {
    "sampler": "ddim",
    "steps": 50,
    "spacing": "uniform",
    "t_max": 1.0,
    "guidance": 1.0,
    "rescale": 0.0,
    "interval": [],  # [t_lo, t_hi]: guide only inside; empty: everywhere
}
_EVALUATE = {
    "classifier": "",  # a committed classifier's name or a path; empty: chosen by the dataset
    "n": 1000,
    "guidance": [],  # the sweep of w; empty: [0, the sample table's guidance]
    "batch_size": 250,
    "seed": 1,
}

_MODEL_PART = {"preset": ""}  # and any field of the part's config dataclass (stepdiff.pipelines.part_config)
_BASE = {"model": ""}  # the trained diffusion model: a committed model's name or a checkpoint / export path
_MODEL_CONTROLNET = {"control": "mask", "hint_widths": [16, 32]}  # control: mask | edges (of the shapes)
_DISTILL = {
    "method": "progressive",  # progressive | consistency
    "teacher_steps": 8,  # progressive: the teacher's grid (the student takes half); consistency: N intervals
    "spacing": "uniform",  # progressive: the grid's spacing (stepdiff.schedules.time_grid)
    "t_max": 1.0,  # progressive: the grid's first time
    "solver": "heun",  # consistency: the teacher's ODE step (ddim | euler | heun)
    # consistency: mu of the target network. 0 (Song & Dhariwal 2023): the target is the student without
    # gradient, so nothing outside the checkpoint is needed and a resumed run is exact; with mu > 0 the
    # target, which the checkpoint does not hold, restarts from the student on resume.
    "target_decay": 0.0,
    "t_min": 0.002,  # consistency: where f(x, t_min) = x
}
_TRAIN_PART = {k: v for k, v in _TRAIN_DIFFUSION.items() if k != "label_dropout"}

DEFAULTS: dict[str, dict[str, Any]] = {
    "diffusion": {
        "data": _DATA,
        "model": _MODEL_DIFFUSION,
        "objective": _OBJECTIVE,
        "train": _TRAIN_DIFFUSION,
        "sample": _SAMPLE,
        "evaluate": _EVALUATE,
    },
    "classifier": {"data": _DATA, "model": _MODEL_CLASSIFIER, "train": _TRAIN_CLASSIFIER},
    **{kind: {"data": _DATA, "model": _MODEL_PART, "train": _TRAIN_PART} for kind in PART_KINDS},
    "controlnet": {"base": _BASE, "data": _DATA, "model": _MODEL_CONTROLNET, "train": _TRAIN_DIFFUSION},
    # A diffusion model that also reads a mask and the masked image (stepdiff.editing.MaskedInputDenoiser),
    # trained on random box masks: the tables of a diffusion run.
    "inpaint": {"data": _DATA, "model": _MODEL_DIFFUSION, "objective": _OBJECTIVE, "train": _TRAIN_DIFFUSION,
                "sample": _SAMPLE, "evaluate": _EVALUATE},
    "distill": {"base": _BASE, "data": _DATA, "distill": _DISTILL, "train": _TRAIN_DIFFUSION},
}
"""Every table of a configuration of each kind, with the default of each key."""


# --- finding and reading configurations -------------------------------------------------------


def _configs_dir():
    return resources.files("stepdiff").joinpath("configs")


def config_names() -> list[str]:
    """The configurations shipped with the package (``stepdiff/configs/*.toml``), by name."""
    folder = _configs_dir()
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def find_config(name_or_path: str | Path) -> Path | Any:
    """A configuration file: an existing path, or the name of a shipped one (``digits-unet``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.suffix in ("", ".toml") and path.parent == Path("."):
        shipped = _configs_dir().joinpath(path.stem + ".toml")
        if shipped.is_file():
            return shipped
    raise FileNotFoundError(
        f"no configuration {str(name_or_path)!r}: not a file, and not one of the shipped configurations "
        f"{config_names()}"
    )


def load_config(name_or_path: str | Path) -> dict:
    """Read a TOML configuration (a path or a shipped name) and {func}`resolve` it."""
    source = find_config(name_or_path)
    try:
        raw = tomllib.loads(source.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{name_or_path}: not valid TOML: {err}") from None
    return resolve(raw, source=str(name_or_path))


def set_value(config: dict, assignment: str) -> dict:
    """Apply one ``table.key=value`` override (the value in TOML syntax, or a bare word) to a raw
    configuration dict, in place; returns it. ``train.lr=3e-4``, ``model.channel_mult=[1, 2]``,
    ``data.name=shapes``."""
    if "=" not in assignment:
        raise ConfigError(f"an override is table.key=value; got {assignment!r}")
    dotted, text = assignment.split("=", 1)
    keys = [k.strip() for k in dotted.strip().split(".")]
    if not all(keys):
        raise ConfigError(f"an override is table.key=value; got {assignment!r}")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()  # a bare word: a string
    node = config
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {k} is not a table")
    node[keys[-1]] = value
    return config


# --- resolving: defaults, names and types checked ---------------------------------------------


def _type_ok(value: Any, default: Any) -> bool:
    if default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def _merge(table: str, given: Any, defaults: dict, open_keys: bool = False) -> dict:
    if not isinstance(given, dict):
        raise ConfigError(f"[{table}] must be a table; got {given!r}")
    out = copy.deepcopy(defaults)
    for key, value in given.items():
        if key not in defaults:
            if open_keys:
                out[key] = value
                continue
            raise ConfigError(f"unknown key {key!r} in [{table}]; the keys are {sorted(defaults)}")
        if not _type_ok(value, defaults[key]):
            raise ConfigError(
                f"[{table}] {key} must be a {type(defaults[key]).__name__}; got {value!r}"
            )
        out[key] = float(value) if isinstance(defaults[key], float) else value
    return out


def _choice(table: str, key: str, value: Any, options) -> None:
    if value not in options:
        raise ConfigError(f"unknown {key} {value!r} in [{table}]; choose one of {list(options)}")


def resolve(raw: dict, *, source: str = "the configuration") -> dict:
    """Fill in every default and check names and types; returns a new, complete configuration.

    Raises {class}`ConfigError` naming the table and key of anything unknown or ill-typed: an
    unknown dataset, architecture, preset, schedule, prediction, weighting or sampler, an unknown
    key, a wrong type. Model fields beyond ``arch``/``preset``/``text`` are changes to the preset's
    config dataclass, checked against its fields.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a configuration is a table; got {type(raw).__name__}")
    raw = copy.deepcopy(raw)
    kind = raw.pop("kind", "diffusion")
    _choice("top level", "kind", kind, KINDS)
    name = raw.pop("name", "run")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{source}: name must be a non-empty string; got {name!r}")
    tables = DEFAULTS[kind]
    unknown = sorted(set(raw) - set(tables))
    if unknown:
        raise ConfigError(f"{source}: unknown table(s) {unknown} for kind {kind!r}; the tables are {sorted(tables)}")
    cfg: dict[str, Any] = {"name": name, "kind": kind}
    for table, defaults in tables.items():
        cfg[table] = _merge(table, raw.get(table, {}), defaults,
                            open_keys=(table == "model" and kind in ("diffusion", "inpaint", *PART_KINDS)))

    data = cfg["data"]
    _choice("data", "name", data["name"], DATASETS)
    _choice("data", "condition", data["condition"], CONDITIONS)
    if data["name"] in ("image-folder", "mnist", "fashion-mnist", "cifar10") and not data["path"]:
        raise ConfigError(f"[data] name = {data['name']!r} needs path (the folder holding its files)")
    if data["name"] == "image-folder" and not data["size"]:
        raise ConfigError("[data] name = 'image-folder' needs size (the side the images are resized to)")
    if data["condition"] == "text" and data["name"] != "shapes":
        raise ConfigError(f"[data] condition = 'text' needs captions: only the shapes data has them, "
                          f"not {data['name']!r}")
    lo_hi = data["n_objects"]
    if not (len(lo_hi) == 2 and all(isinstance(v, int) for v in lo_hi) and 1 <= lo_hi[0] <= lo_hi[1] <= 3):
        raise ConfigError(f"[data] n_objects must be [lo, hi] with 1 <= lo <= hi <= 3; got {lo_hi!r}")
    data["n_objects"] = list(lo_hi)
    if data["latent"] and kind != "diffusion":
        raise ConfigError(f"[data] latent (latent diffusion) is for kind 'diffusion', not {kind!r}")
    if data["subset"] and data["name"] != "digits":
        raise ConfigError(f"[data] subset cuts the digits' training set; got [data] name = {data['name']!r}")
    if data["subset"] < 0:
        raise ConfigError(f"[data] subset must be 0 (all) or a positive number of digits; got {data['subset']!r}")

    if kind in ("diffusion", "inpaint"):
        _resolve_diffusion(cfg)
        if kind == "inpaint" and data["condition"] == "text":
            raise ConfigError("kind 'inpaint' takes [data] condition = 'none' or 'class', not 'text'")
    elif kind in PART_KINDS:
        _resolve_part(cfg)
    elif kind in ADAPTER_KINDS:
        _resolve_adapter(cfg)
    else:
        _choice("model", "arch", cfg["model"]["arch"], CLASSIFIER_ARCHS)
        wants = "shapes" if cfg["model"]["arch"] == "shapes-cnn" else "digits"
        if data["name"] != wants:
            raise ConfigError(f"[model] arch = {cfg['model']['arch']!r} reads {wants} data, not {data['name']!r}")
        _positive(cfg["train"], "train", ("steps", "batch_size"))
    return cfg


def _positive(table: dict, name: str, keys) -> None:
    for key in keys:
        if table[key] < 1:
            raise ConfigError(f"[{name}] {key} must be a positive integer; got {table[key]!r}")


def _resolve_diffusion(cfg: dict) -> None:
    from .parametrize import PREDICTIONS
    from .samplers import SAMPLERS
    from .schedules import SCHEDULES, SPACINGS
    from .train import LR_DECAYS

    model, obj, train, sample, data = cfg["model"], cfg["objective"], cfg["train"], cfg["sample"], cfg["data"]
    _choice("model", "arch", model["arch"], ARCHS)
    model["text"] = _merge("model.text", model["text"], _TEXT)
    if model["text"]["clip"]:
        if data["condition"] != "text":
            raise ConfigError(f"[model.text] clip encodes captions: it needs [data] condition = 'text', "
                              f"not {data['condition']!r}")
        if model["arch"] != "unet":
            raise ConfigError(f"[model.text] clip: the CLIP-conditioned model is a UNet ([model] arch = 'unet'), "
                              f"not {model['arch']!r}")
        load_part(model["text"]["clip"], "clip", "[model.text] clip")
    if model["text"]["one_hot"] and (model["text"]["clip"] or model["text"]["depth"] != 0):
        raise ConfigError("[model.text] one_hot = true gives each token its one-hot vector, with no encoder: it "
                          f"needs depth = 0 and no clip; got depth {model['text']['depth']!r}, "
                          f"clip {model['text']['clip']!r}")
    if model["text"]["word_rows"] and data["condition"] != "text":
        raise ConfigError("[model.text] word_rows = true adds the caption's words: it needs [data] condition = "
                          f"'text', not {data['condition']!r}")
    objects = model["text"]["word_row_objects"]
    if objects < 1 or (objects > 1 and not model["text"]["word_rows"]):
        raise ConfigError(f"[model.text] word_row_objects must be a positive integer, and above 1 only with "
                          f"word_rows = true; got {objects!r} (word_rows = {model['text']['word_rows']!r})")
    if model["text"]["word_rows"] and model["arch"] != "unet":
        raise ConfigError(f"[model.text] word_rows = true adds to a UNet's time embedding: it needs [model] arch = "
                          f"'unet', not {model['arch']!r}")
    if model["text"]["layout"] and (data["condition"] != "text" or data["name"] != "shapes"
                                    or model["arch"] != "unet"):
        raise ConfigError("[model.text] layout = true paints the caption's objects into the shapes grid's cells for "
                          "a UNet: it needs [data] name = 'shapes', condition = 'text' and [model] arch = 'unet'; got "
                          f"{data['name']!r}, {data['condition']!r} and {model['arch']!r}")
    if model["text"]["tune"] and not model["text"]["clip"]:
        raise ConfigError("[model.text] tune = true fine-tunes a CLIP's text tower: it needs [model.text] clip "
                          "(a text encoder learned from scratch is always trained)")
    if data["latent"]:
        load_part(data["latent"], "autoencoder", "[data] latent")
        sample_shape(cfg)  # checks that the images fit the autoencoder
    _model_config(cfg)  # checks the preset and the changes
    _choice("objective", "schedule", obj["schedule"], SCHEDULES)
    _choice("objective", "prediction", obj["prediction"], PREDICTIONS)
    _choice("objective", "weighting", obj["weighting"], WEIGHTINGS)
    _choice("train", "lr_decay", train["lr_decay"], LR_DECAYS)
    _choice("train", "autocast", train["autocast"], AUTOCAST)
    _choice("sample", "sampler", sample["sampler"], SAMPLERS)
    _choice("sample", "spacing", sample["spacing"], SPACINGS)
    _positive(train, "train", ("steps", "batch_size", "micro_batches"))
    _positive(sample, "sample", ("steps",))
    if not 0.0 <= train["label_dropout"] <= 1.0:
        raise ConfigError(f"[train] label_dropout must lie in [0, 1]; got {train['label_dropout']}")
    if train["label_dropout"] > 0 and data["condition"] == "none":
        raise ConfigError("[train] label_dropout > 0 needs a conditional model ([data] condition = 'class' or 'text')")
    if sample["guidance"] < 0:
        raise ConfigError(f"[sample] guidance (w) must be >= 0; got {sample['guidance']}")
    if any(w < 0 for w in cfg["evaluate"]["guidance"]):
        raise ConfigError(f"[evaluate] guidance values (w) must be >= 0; got {cfg['evaluate']['guidance']}")
    if sample["interval"] and len(sample["interval"]) != 2:
        raise ConfigError(f"[sample] interval must be [] or [t_lo, t_hi]; got {sample['interval']!r}")
    try:
        build_objective(cfg)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"[objective]: {err}") from None


def _resolve_part(cfg: dict) -> None:
    from .train import LR_DECAYS

    kind, data, train = cfg["kind"], cfg["data"], cfg["train"]
    _choice("train", "lr_decay", train["lr_decay"], LR_DECAYS)
    _choice("train", "autocast", train["autocast"], AUTOCAST)
    _positive(train, "train", ("steps", "batch_size", "micro_batches"))
    want = "text" if kind == "clip" else "none"
    if data["condition"] != want:
        raise ConfigError(f"[data] condition must be {want!r} for kind {kind!r}"
                          + (" (it trains on the captions)" if kind == "clip" else " (it is unconditional)"))
    if data["name"] not in ("digits", "shapes"):
        raise ConfigError(f"kind {kind!r} trains on the digits or the shapes; got [data] name = {data['name']!r}")
    _part_config(cfg)  # checks the preset and the fields


def _part_config(cfg: dict):
    """The config dataclass of a clip / vae / autoencoder run (see {func}`stepdiff.pipelines.part_config`)."""
    from .pipelines import part_config

    data = cfg["data"]
    size = _digits_size(data) if data["name"] == "digits" else _shapes_size(data)
    # The VAE scores the data's discrete values: 17 for the 8x8 digits, 256 for the 8-bit shapes.
    levels = {("digits", 8): 17}.get((data["name"], size), 256 if data["name"] == "shapes" else None)
    if cfg["kind"] == "vae" and levels is None:
        raise ConfigError("kind 'vae' scores discrete data: the digits at size 8 (17 levels) or the shapes "
                          f"(256 levels); got {data['name']} at size {size}")
    try:
        return part_config(cfg["kind"], cfg["model"], (_channels(data), size, size), levels)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"[model]: {err}") from None


def _resolve_adapter(cfg: dict) -> None:
    """A ControlNet or distillation run: [base] names the trained model; [data] must be its data
    (checked when the base is loaded, so resolving reads no file)."""
    from .distill import METHODS, SOLVERS
    from .models.controlnet import CONTROLS
    from .schedules import SPACINGS
    from .train import LR_DECAYS

    kind, train = cfg["kind"], cfg["train"]
    if not isinstance(cfg["base"]["model"], str) or not cfg["base"]["model"]:
        raise ConfigError(f"[base] model must name the trained diffusion model a {kind} run builds on "
                          "(a committed model's name or a checkpoint path)")
    _choice("train", "lr_decay", train["lr_decay"], LR_DECAYS)
    _choice("train", "autocast", train["autocast"], AUTOCAST)
    _positive(train, "train", ("steps", "batch_size", "micro_batches"))
    if not 0.0 <= train["label_dropout"] <= 1.0:
        raise ConfigError(f"[train] label_dropout must lie in [0, 1]; got {train['label_dropout']}")
    if kind == "controlnet":
        model = cfg["model"]
        _choice("model", "control", model["control"], CONTROLS)
        if cfg["data"]["name"] != "shapes":
            raise ConfigError(f"kind 'controlnet' reads the shapes' masks or edges; got [data] name = "
                              f"{cfg['data']['name']!r}")
        widths = model["hint_widths"]
        if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
            raise ConfigError(f"[model] hint_widths must be positive integers; got {widths!r}")
        return
    d = cfg["distill"]
    _choice("distill", "method", d["method"], METHODS)
    _choice("distill", "spacing", d["spacing"], SPACINGS)
    _choice("distill", "solver", d["solver"], SOLVERS)
    _positive(d, "distill", ("teacher_steps",))
    if d["method"] == "progressive" and d["teacher_steps"] % 2:
        raise ConfigError(f"[distill] teacher_steps must be even for progressive distillation (the student "
                          f"takes half); got {d['teacher_steps']}")
    if not 0.0 < d["t_max"] <= 1.0 or not 0.0 < d["t_min"] < 1.0 or not 0.0 <= d["target_decay"] < 1.0:
        raise ConfigError(f"[distill] needs 0 < t_max <= 1, 0 < t_min < 1 and 0 <= target_decay < 1; got "
                          f"t_max={d['t_max']}, t_min={d['t_min']}, target_decay={d['target_decay']}")


# --- building the objects ---------------------------------------------------------------------


def autocast_dtype(cfg: dict) -> torch.dtype | None:
    """The ``torch.autocast`` dtype of ``[train] autocast`` (``None`` for ``"none"``)."""
    return AUTOCAST[cfg["train"].get("autocast", "none")]


def build_objective(cfg: dict):
    """``(schedule, prediction, weighting)`` of a diffusion configuration's ``[objective]``."""
    from .schedules import get_schedule
    from .train import min_snr_weighting

    obj = cfg["objective"]
    schedule = get_schedule(obj["schedule"], **obj["schedule_args"])
    weighting = None
    if obj["weighting"] == "min-snr":
        weighting = min_snr_weighting(schedule, obj["prediction"], obj["min_snr_gamma"])
    return schedule, obj["prediction"], weighting


@dataclass
class TrainingData:
    """What a run trains on: ``images [N, C, H, W]`` in $[-1, 1]$, ``labels`` (class ids ``[N]``,
    token rows ``[N, L]`` or ``None``), the class names and, for shapes, the captions."""

    images: Tensor
    labels: Tensor | None
    classes: list[str]
    captions: list[str] | None = None
    targets: Tensor | None = None  # shapes: [N, 9, 3]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])


def _digits_size(data: dict) -> int:
    size = data["size"] or 8
    if size not in (8, 16):
        raise ConfigError(f"[data] size must be 8 or 16 for the digits; got {size!r}")
    return size


def _shapes_size(data: dict) -> int:
    size = data["size"] or 32
    if size not in (16, 32):
        raise ConfigError(f"[data] size must be 32 (or 16) for the shapes; got {size!r}")
    return size


def build_data(cfg: dict) -> TrainingData:
    """The training data of a configuration (its ``[data]`` table), labelled as ``condition`` asks.

    - ``digits``: the 1497 training digits of {func}`stepdiff.image_data.load_digits` at ``size``,
      or, with ``subset`` $= n > 0$, the first $n$ of them taken class by class in turn
      ({func}`balanced_subset`);
    - ``shapes``: ``n`` scenes of {func}`stepdiff.shapes.make_shapes` (seed 0; a classifier run uses
      {data}`stepdiff.classifiers.SHAPES_TRAIN_SEED`), class labels the first object's shape,
      text labels the captions tokenized by {class}`stepdiff.text.Tokenizer`;
    - ``image-folder``, ``mnist``, ``fashion-mnist``, ``cifar10``: the files under ``path``.
    """
    from . import image_data

    data = cfg["data"]
    name, condition = data["name"], data["condition"]
    captions = targets = None
    if name == "digits":
        s = image_data.load_digits("train", size=_digits_size(data))
        images, labels, classes = s.images, s.labels, s.classes
        if data["subset"]:
            if data["subset"] > len(labels):
                raise ConfigError(f"[data] subset = {data['subset']} but there are only {len(labels)} training digits")
            keep = balanced_subset(labels, data["subset"])
            images, labels = images[keep], labels[keep]
    elif name == "shapes":
        from .classifiers import SHAPES_TRAIN_SEED
        from .shapes import make_shapes

        seed = SHAPES_TRAIN_SEED if cfg["kind"] == "classifier" else SHAPES_GENERATOR_SEED
        d = make_shapes(data["n"], seed=seed, size=_shapes_size(data), n_objects=tuple(data["n_objects"]),
                        caption_style=data["caption_style"], masks=False)
        images, labels, classes, captions, targets = d.images, d.labels, d.classes, d.captions, d.targets
        if condition == "text":
            from .text import Tokenizer

            labels = Tokenizer().encode(captions)
    elif name == "image-folder":
        s = image_data.load_image_folder(data["path"], data["size"], data["channels"])
        images, labels, classes = s.images, s.labels, s.classes
    elif name in ("mnist", "fashion-mnist"):
        load = image_data.load_mnist if name == "mnist" else image_data.load_fashion_mnist
        s = load(data["path"], data["split"], pad=data["pad"])
        images, labels, classes = s.images, s.labels, s.classes
    else:
        s = image_data.load_cifar10(data["path"], data["split"])
        images, labels, classes = s.images, s.labels, s.classes
    if condition == "none" and cfg["kind"] != "classifier":
        labels = None
    return TrainingData(images, labels, list(classes), captions, targets)


def balanced_subset(labels: Tensor, n: int) -> Tensor:
    r"""Indices of ``n`` rows of a labelled set, as even across the classes as the set allows.

    Each row gets its rank $r$ within its class (in the set's order) and the rows are taken in the
    order of $(r, \text{class})$: one of each class, then a second of each, and so on, so that
    $n = 10k$ digits hold $k$ of each digit. Returned sorted (the set's order); ``n`` between 1 and
    the number of rows.
    """
    labels = torch.as_tensor(labels)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= labels.shape[0]:
        raise ValueError(f"n must be an integer in [1, {labels.shape[0]}]; got {n!r}")
    rank = torch.empty_like(labels)
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        rank[members] = torch.arange(members.numel())
    order = sorted(range(labels.shape[0]), key=lambda i: (int(rank[i]), int(labels[i])))
    return torch.tensor(sorted(order[:n]), dtype=torch.long)


def held_out_data(cfg: dict) -> TrainingData:
    """Real images the run never trained on, for evaluation: the 300 held-out digits, or
    ``n_held_out`` shapes scenes of the classifiers' held-out seed from the training distribution
    (with their captions and targets). Other datasets: their ``test`` split where there is one."""
    from . import image_data

    data = cfg["data"]
    name = data["name"]
    if name == "digits":
        s = image_data.load_digits("heldout", size=_digits_size(data))
        return TrainingData(s.images, s.labels, list(s.classes))
    if name == "shapes":
        from .classifiers import SHAPES_HELD_OUT_SEED
        from .shapes import make_shapes

        d = make_shapes(data["n_held_out"], seed=SHAPES_HELD_OUT_SEED, size=_shapes_size(data),
                        n_objects=tuple(data["n_objects"]), caption_style=data["caption_style"], masks=False)
        return TrainingData(d.images, d.labels, list(d.classes), d.captions, d.targets)
    if name in ("mnist", "fashion-mnist", "cifar10"):
        held = copy.deepcopy(cfg)
        held["data"]["split"] = "test"
        held["kind"] = "classifier"  # keep the labels
        return build_data(held)
    raise ConfigError(f"no held-out split for [data] name = {name!r}; evaluate needs one")


def _model_changes(cfg: dict) -> dict:
    return {k: v for k, v in cfg["model"].items() if k not in _MODEL_DIFFUSION}


def _model_config(cfg: dict, image_channels: int | None = None):
    """The UNetConfig / DiTConfig of a diffusion configuration (preset plus changes, with the
    input channels and conditioning set from ``[data]``)."""
    from .models import DiTConfig, UNetConfig

    model, data = cfg["model"], cfg["data"]
    cls = UNetConfig if model["arch"] == "unet" else DiTConfig
    changes = _model_changes(cfg)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in [model] for arch {model['arch']!r}; "
                          f"the keys are arch, preset, text and the fields {sorted(known)}")
    for key in ("in_channels", "n_classes", "context_dim"):
        if key in changes:
            raise ConfigError(f"[model] {key} is set from [data] (its images and condition); remove it")
    changes["in_channels"] = image_channels or sample_shape(cfg)[0]
    if data["condition"] == "class":
        changes["n_classes"] = _n_classes(data)
    elif data["condition"] == "text":
        changes["context_dim"] = _text_dim(model["text"])
    for key, value in list(changes.items()):
        if isinstance(value, list):
            changes[key] = tuple(value)
    try:
        return cls.preset(model["preset"], **changes)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"[model]: {err}") from None


def load_part(source: str, kind: str, where: str) -> nn.Module:
    """A trained part another run builds on (``kind`` ``autoencoder`` or ``clip``), named by ``where``
    (the configuration's table and key) in any error: its own copy, frozen and in eval mode, so that
    the caller may move or wrap it without touching anyone else's."""
    try:
        model, record = _load_cached(str(source))
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"{where} = {source!r}: {err}") from None
    if record.get("kind") != kind:
        raise ConfigError(f"{where} = {source!r} is a {record.get('kind')} model, not a {kind} model")
    return copy.deepcopy(model).requires_grad_(False).eval()


_PART_CACHE: dict[tuple, tuple[nn.Module, dict]] = {}


def _load_cached(source: str) -> tuple[nn.Module, dict]:
    # A configuration is resolved several times per run (and per load): read each part once, keyed by
    # the file's identity so that a rewritten checkpoint is read again.
    from . import checkpoints

    path = Path(source)
    key = (source, path.stat().st_mtime_ns, path.stat().st_size) if path.exists() else (source,)
    if key not in _PART_CACHE:
        if len(_PART_CACHE) > 8:
            _PART_CACHE.clear()
        _PART_CACHE[key] = checkpoints.load(source)
    return _PART_CACHE[key]


def part_provenance(source: str) -> dict:
    """Which trained part a run used: its source, name, commit and weights' digest (from its record)."""
    rec = _record(str(source))
    return {"source": str(source), "name": rec.get("name"), "commit": rec.get("commit"),
            "sha256": (rec.get("weights") or {}).get("sha256"), "step": rec.get("step")}


def sample_shape(cfg: dict) -> tuple[int, int, int]:
    r"""The shape ``(C, H, W)`` a diffusion configuration's model denoises: the images', or, with
    ``[data] latent``, the autoencoder's latents of them ($c \times H/f \times W/f$)."""
    data = cfg["data"]
    size = data["size"] or {"digits": 8, "shapes": 32, "mnist": 28 + 2 * data["pad"],
                            "fashion-mnist": 28 + 2 * data["pad"], "cifar10": 32}.get(data["name"])
    shape = (_channels(data), size, size)
    if not data.get("latent"):
        return shape
    ae = load_part(data["latent"], "autoencoder", "[data] latent")
    if ae.config.in_channels != shape[0]:
        raise ConfigError(f"[data] latent = {data['latent']!r} encodes {ae.config.in_channels}-channel images; "
                          f"the {data['name']} images have {shape[0]}")
    try:
        return ae.latent_shape(size)
    except ValueError as err:
        raise ConfigError(f"[data] latent = {data['latent']!r}: {err}") from None


def latent_training_images(cfg: dict, images: Tensor) -> Tensor:
    r"""What a diffusion run trains on: ``images``, or with ``[data] latent`` their scaled latents
    $z = s\,\mu_\phi(x)$ ({func}`stepdiff.pipelines.encode_dataset`)."""
    if not cfg["data"].get("latent"):
        return images
    from .pipelines import encode_dataset

    return encode_dataset(load_part(cfg["data"]["latent"], "autoencoder", "[data] latent"), images)


def _channels(data: dict) -> int:
    return {"digits": 1, "shapes": 3, "mnist": 1, "fashion-mnist": 1, "cifar10": 3}.get(data["name"], data["channels"])


def _n_classes(data: dict) -> int:
    if data["n_classes"]:
        return data["n_classes"]
    if data["name"] == "image-folder":
        raise ConfigError("[data] n_classes is needed for a class-conditional model of an image folder")
    if data["name"] == "shapes":
        from .shapes import SHAPES

        return len(SHAPES)
    return 10  # digits, MNIST, Fashion-MNIST, CIFAR-10 (an image folder: set by its sub-folders)


def build_model(cfg: dict, *, seed: int | None = None) -> nn.Module:
    """The network of a configuration, its initial weights drawn from ``seed`` (default: ``[train]
    seed``) without touching the global random state.

    Diffusion: a {class}`~stepdiff.models.unet.UNet` or {class}`~stepdiff.models.dit.DiT` (class-conditional
    with a null class, or wrapped with a {class}`~stepdiff.models.text.TextEncoder` in a
    {class}`~stepdiff.models.text.TextConditioned` for text). Classifier: {class}`~stepdiff.classifiers.DigitsCNN`,
    {class}`~stepdiff.classifiers.DigitsMLP` or {class}`~stepdiff.classifiers.ShapesClassifier`.
    """
    seed = cfg["train"]["seed"] if seed is None else seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if cfg["kind"] == "classifier":
            return _build_classifier(cfg)
        if cfg["kind"] in PART_KINDS:
            from .pipelines import build_part

            return build_part(cfg["kind"], _part_config(cfg))
        if cfg["kind"] in ADAPTER_KINDS:
            return _build_adapter(cfg)
        from .models import DiT, TextConditioned, TextEncoder, UNet

        channels = _channels(cfg["data"])
        inpaint = cfg["kind"] == "inpaint"  # x_t, the masked image and the mask as input channels
        config = _model_config(cfg, image_channels=2 * channels + 1 if inpaint else None)
        if cfg["data"]["condition"] == "text" and cfg["model"]["text"]["clip"]:
            from .pipelines import latent_text_model

            clip = load_part(cfg["model"]["text"]["clip"], "clip", "[model.text] clip")
            model = latent_text_model(clip, config, freeze_encoder=not cfg["model"]["text"]["tune"],
                                      word_rows=cfg["model"]["text"]["word_rows"],
                                      word_row_objects=cfg["model"]["text"]["word_row_objects"],
                                      layout=cfg["model"]["text"]["layout"])
            if not cfg["model"]["text"]["tune"]:
                # The frozen tower is the committed CLIP's, bit for bit: an export need not store it again
                # (stepdiff.checkpoints.frozen_base_prefixes), loading takes it from the CLIP.
                model.frozen_encoder_source = cfg["model"]["text"]["clip"]
            return model
        net = (UNet if cfg["model"]["arch"] == "unet" else DiT)(config)
        if inpaint:
            from .editing import MaskedInputDenoiser

            return MaskedInputDenoiser(net, channels)
        if cfg["data"]["condition"] != "text":
            return net
        from .text import Tokenizer

        tok, text = Tokenizer(), cfg["model"]["text"]
        try:
            encoder = TextEncoder(tok.vocab_size, _text_dim(text), text["depth"], text["heads"], tok.max_len,
                                  pad_id=tok.pad_id, one_hot=text["one_hot"])
        except ValueError as err:
            raise ConfigError(f"[model.text]: {err}") from None
        return TextConditioned(net, encoder, tok.pad_id, tok.empty(1)[0], word_rows=text["word_rows"],
                               word_row_objects=text["word_row_objects"], object_start_ids=tok.article_ids,
                               layout=text["layout"], tokens=tok.tokens)


def _text_dim(text: dict) -> int:
    """The width of the context a ``[model.text]`` table gives: its ``dim``, or the caption vocabulary's
    size for one-hot tokens."""
    if text["one_hot"]:
        from .text import Tokenizer

        return Tokenizer().vocab_size
    return text["dim"]


def _record(source: str) -> dict:
    """The record of a committed model, a checkpoint or an export, without building its model."""
    import json

    from . import checkpoints, pretrained

    path = Path(source)
    if not path.exists():
        if source in pretrained.available():
            return pretrained.record(source)
        raise FileNotFoundError(f"no checkpoint {source!r}: not a file, and not a committed model "
                                f"({pretrained.available()})")
    kind, found = checkpoints._read_any(path)
    return json.loads(found.read_text(encoding="utf-8")) if kind == "export" else checkpoints.record_of(found)


def load_base(cfg: dict) -> tuple[nn.Module, dict]:
    """The trained diffusion model a ControlNet or distillation run builds on (``[base] model``), in
    eval mode, and the configuration of the diffusion run it comes from (for a progressive student,
    its first teacher's, whose objective it keeps); its ``[data]`` must be the run's."""
    from .checkpoints import load

    source = str(cfg["base"]["model"])
    base, record = load(source)
    base_cfg = resolve(record["config"], source=source)
    while base_cfg["kind"] == "distill" and base_cfg["distill"]["method"] == "progressive":
        source = str(base_cfg["base"]["model"])
        base_cfg = resolve(_record(source)["config"], source=source)
    if base_cfg["kind"] != "diffusion":
        raise ConfigError(f"[base] model {cfg['base']['model']!r} is a {base_cfg['kind']} model, not a diffusion "
                          "model (or a progressive student of one)")
    differ = sorted(k for k in base_cfg["data"] if base_cfg["data"][k] != cfg["data"].get(k))
    if differ:
        has = ", ".join(f"{k}={base_cfg['data'][k]!r}" for k in differ)
        raise ConfigError(f"[data] must be the data of the base model {cfg['base']['model']!r}; it differs in "
                          f"{differ} (the base has {has})")
    return base, base_cfg


def _build_adapter(cfg: dict) -> nn.Module:
    """A ControlNet on the base model, or the student of a distillation run (a copy of the teacher)."""
    base, base_cfg = load_base(cfg)
    if cfg["kind"] == "controlnet":
        from .models.controlnet import ControlNetConfig, controlnet_for

        try:
            widths = tuple(cfg["model"]["hint_widths"])
            return controlnet_for(base, ControlNetConfig(hint_channels=1, hint_widths=widths))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"[base] / [model]: {err}") from None
    from .distill import student_for

    schedule, prediction, _ = build_objective(base_cfg)
    return student_for(base, cfg["distill"]["method"], schedule, prediction, t_min=cfg["distill"]["t_min"])


def adapter_training(cfg: dict, model: nn.Module, data: TrainingData) -> tuple[Tensor, Any]:
    """What a ControlNet or distillation run trains on and with: ``(images, loss_fn)`` for
    {func}`stepdiff.train.train`. A ControlNet's images carry their control maps as one more channel
    ({func}`stepdiff.models.controlnet.packed_loss_fn`); a student learns from the frozen base
    ({func}`stepdiff.distill.distillation_loss_fn`). The objective is the base model's."""
    base, base_cfg = load_base(cfg)
    base = base.to(next(model.parameters()).device)
    schedule, prediction, weighting = build_objective(base_cfg)
    if cfg["kind"] == "controlnet":
        from .models.controlnet import control_maps, packed_loss_fn
        from .shapes import make_shapes

        d = cfg["data"]
        scenes = make_shapes(d["n"], seed=SHAPES_GENERATOR_SEED, size=_shapes_size(d),
                             n_objects=tuple(d["n_objects"]), caption_style=d["caption_style"], masks=True)
        control = control_maps(scenes.masks, scenes.edges, cfg["model"]["control"])
        images = torch.cat([data.images, control], 1)
        return images, packed_loss_fn(schedule, data.images.shape[1], prediction=prediction, weighting=weighting)
    from .distill import distillation_loss_fn
    from .schedules import time_grid

    d = cfg["distill"]
    grid = time_grid(d["teacher_steps"], d["spacing"], schedule, t_max=d["t_max"])
    teacher = base.requires_grad_(False)
    return data.images, distillation_loss_fn(d["method"], teacher, model, schedule, prediction, grid,
                                             solver=d["solver"], target_decay=d["target_decay"])


def _build_classifier(cfg: dict) -> nn.Module:
    from .classifiers import DigitsCNN, DigitsMLP, ShapesClassifier

    model = cfg["model"]
    sizes = {k: model[k] for k in ("width", "feature_dim", "hidden") if model[k] is not None}
    try:
        if model["arch"] == "shapes-cnn":
            sizes.pop("hidden", None)
            return ShapesClassifier.for_dataset(**sizes)
        if model["arch"] == "digits-cnn":
            sizes.pop("hidden", None)
            return DigitsCNN(image_size=_digits_size(cfg["data"]), **sizes)
        sizes.pop("width", None)
        return DigitsMLP(image_size=_digits_size(cfg["data"]), **sizes)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"[model]: {err}") from None
