"""Tests for stepdiff.checkpoints and stepdiff.config: the provenance record, reading checkpoints,
exporting a committed model, storing metrics, and configurations with clear errors.

Every run here is a few steps of a tiny model on the 8x8 digits, on one thread.
"""

import json

import pytest
import torch

from stepdiff import checkpoints as ckpt
from stepdiff import config as C
from stepdiff.runs import make_config, train_run

TINY = ["model.channels=8", "model.channel_mult=[1, 2]", "model.attn_levels=[1]", "model.heads=2",
        "model.norm_groups=4"]
DIGITS = ["data.name=digits", "data.size=8", "data.condition=class", "train.batch_size=16",
          "train.label_dropout=0.2", "train.steps=6", *TINY]


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("run") / "g.pt"
    result = train_run(None, path, overrides=DIGITS, argv=["train", "--data", "digits"])
    return path, result


# --- configurations ---------------------------------------------------------------------------


def test_resolve_fills_defaults_and_keeps_changes():
    cfg = make_config(None, DIGITS)
    assert cfg["kind"] == "diffusion" and cfg["train"]["steps"] == 6 and cfg["model"]["channels"] == 8
    assert cfg["objective"] == C.DEFAULTS["diffusion"]["objective"]
    assert C.resolve(cfg) == cfg  # resolving is idempotent: a stored config rebuilds the same run
    assert json.loads(json.dumps(cfg)) == cfg  # plain JSON


@pytest.mark.parametrize("override, message", [
    ("data.name=fmnist", "unknown name 'fmnist' in \\[data\\]"),
    ("model.arch=vit", "unknown arch 'vit' in \\[model\\]"),
    ("model.preset=huge", "unknown UNet preset 'huge'"),
    ("model.chanels=16", "unknown key\\(s\\) \\['chanels'\\] in \\[model\\]"),
    ("train.stpes=3", "unknown key 'stpes' in \\[train\\]"),
    ("train.steps=0", "steps must be a positive integer"),
    ("train.lr='fast'", "\\[train\\] lr must be a float"),
    ("objective.prediction=noise", "unknown prediction 'noise'"),
    ("objective.schedule=linear", "unknown schedule 'linear'"),
    ("sample.sampler=euler_a", "unknown sampler 'euler_a'"),
    ("sample.guidance=-1.0", "guidance \\(w\\) must be >= 0"),
    ("model.n_classes=3", "n_classes is set from \\[data\\]"),
    ("data.condition=text", "needs captions"),
    ("extra.key=1", "unknown table"),
])
def test_bad_configurations_name_what_is_wrong(override, message):
    with pytest.raises(C.ConfigError, match=message):
        make_config(None, [*DIGITS, override])


def test_shipped_configurations_resolve():
    """Every configuration shipped in stepdiff/configs resolves, and its model builds (a run built on
    trained models, a ControlNet, a distilled student or a latent text-to-image model, once the models
    it names are committed)."""
    import tomllib

    from stepdiff import pretrained

    for name in C.config_names():
        raw = tomllib.loads(C.find_config(name).read_text(encoding="utf-8"))
        named = [raw.get("data", {}).get("latent"), raw.get("model", {}).get("text", {}).get("clip")]
        if any(n and n not in pretrained.available() for n in named):
            continue
        cfg = C.load_config(name)
        assert cfg["name"] == name
        if cfg["kind"] in C.ADAPTER_KINDS and cfg["base"]["model"] not in pretrained.available():
            continue
        assert sum(p.numel() for p in C.build_model(cfg).parameters()) > 0


def test_set_value_parses_toml_and_bare_words():
    raw = {}
    C.set_value(raw, "model.channel_mult=[1, 2]")
    C.set_value(raw, "data.name=shapes")
    C.set_value(raw, "train.lr=3e-4")
    assert raw == {"model": {"channel_mult": [1, 2]}, "data": {"name": "shapes"}, "train": {"lr": 3e-4}}
    with pytest.raises(C.ConfigError, match="table.key=value"):
        C.set_value(raw, "train.lr")


def test_build_model_is_seeded_and_leaves_the_global_rng_alone():
    cfg = make_config(None, DIGITS)
    state = torch.random.get_rng_state()
    a, b = C.build_model(cfg), C.build_model(cfg)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = C.build_model(cfg, seed=1)
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_text_condition_builds_a_text_conditioned_model():
    from stepdiff.models import TextConditioned
    from stepdiff.text import Tokenizer

    cfg = make_config(None, ["data.name=shapes", "data.condition=text", "data.n=64", *TINY, "model.text.dim=16",
                             "model.text.depth=1", "model.text.heads=2"])
    model = C.build_model(cfg)
    assert isinstance(model, TextConditioned) and model.null_class == Tokenizer.pad_id
    data = C.build_data(cfg)
    assert data.labels.shape[0] == 64 and data.labels.ndim == 2 and data.images.shape[1:] == (3, 32, 32)
    assert Tokenizer().decode(data.labels[0]) == data.captions[0].lower().replace(",", "")


# --- the record of a run ----------------------------------------------------------------------


def test_checkpoint_carries_its_provenance(run):
    path, result = run
    state = ckpt.read_checkpoint(path)
    record = ckpt.record_of(state)
    assert record["config"] == make_config(None, DIGITS)
    assert record["command"] == ["train", "--data", "digits"] and record["seed"] == 0
    assert record["version"] and record["torch"] == str(torch.__version__) and record["threads"] == 1
    assert record["commit"] is None or len(record["commit"]) == 40
    assert record["device"] and record["world_size"] == 1 and record["step"] == 6
    assert record["losses_head"] == result.losses == state["losses"].tolist()
    assert record["cpu_s"] > 0 and record["wall_s"] > 0
    assert json.loads(json.dumps(record)) == record


def test_load_rebuilds_the_ema_model(run):
    path, _ = run
    model, record = ckpt.load(path)
    state = ckpt.read_checkpoint(path)
    assert all(torch.equal(v, state["ema"]["model"][k]) for k, v in model.state_dict().items())
    raw, _ = ckpt.load(path, ema=False)
    assert all(torch.equal(v, state["model"][k]) for k, v in raw.state_dict().items())
    assert not model.training


def test_load_errors(tmp_path, run):
    path, _ = run
    with pytest.raises(FileNotFoundError, match="not a file, and not a committed model"):
        ckpt.load(tmp_path / "nothing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt is not a readable checkpoint"):
        ckpt.load(tmp_path / "junk.pt")
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="neither a checkpoint"):
        ckpt.load(tmp_path / "other.pt")
    # a record whose configuration names another model than the weights hold
    state = ckpt.read_checkpoint(path)
    state["metadata"]["config"]["model"]["channels"] = 16
    torch.save(state, tmp_path / "mismatch.pt")
    with pytest.raises(ValueError, match="do not match the model of its record"):
        ckpt.load(tmp_path / "mismatch.pt")


def test_compressed_save_loads_back_bit_for_bit_smaller_and_reproducibly(tmp_path):
    """save_compressed: torch.load gives back every tensor (dtype, shape, bits; a 0-dim buffer too),
    the entries are deflated (the file is smaller than torch.save's for compressible weights), and
    the same tensors give the same bytes."""
    import zipfile

    g = torch.Generator().manual_seed(5)
    weights = {"w": torch.randn(37, 23, generator=g).half(), "b": torch.randn(23, generator=g).bfloat16(),
               "scale": torch.tensor(0.18, dtype=torch.float16), "steps": torch.arange(7), "empty": torch.zeros(0)}
    with open(tmp_path / "a.pt", "wb") as f:
        ckpt.save_compressed(weights, f)
    with open(tmp_path / "b.pt", "wb") as f:
        ckpt.save_compressed(weights, f)
    torch.save(weights, tmp_path / "plain.pt")
    back = torch.load(tmp_path / "a.pt", weights_only=True)
    assert back.keys() == weights.keys()
    for k, v in weights.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v)
    assert ckpt.tensors_sha256(back) == ckpt.tensors_sha256(weights)
    assert ckpt.file_sha256(tmp_path / "a.pt") == ckpt.file_sha256(tmp_path / "b.pt")
    assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in zipfile.ZipFile(tmp_path / "a.pt").infolist())
    assert (tmp_path / "a.pt").stat().st_size < (tmp_path / "plain.pt").stat().st_size


def test_tensor_digest_sees_every_bit_and_name():
    a = {"x": torch.tensor(1.5, dtype=torch.float16), "y": torch.ones(3)}
    assert ckpt.tensors_sha256(a) == ckpt.tensors_sha256({k: v.clone() for k, v in a.items()})
    flipped = {"x": torch.tensor(-1.5, dtype=torch.float16), "y": torch.ones(3)}
    renamed = {"x2": a["x"], "y": a["y"]}
    recast = {"x": a["x"].float(), "y": a["y"]}
    assert len({ckpt.tensors_sha256(d) for d in (a, flipped, renamed, recast)}) == 4


def test_export_writes_float16_weights_and_a_checked_record(run, tmp_path):
    path, _ = run
    weights, record_path = ckpt.export(path, tmp_path / "w", "tiny")
    record = json.loads(record_path.read_text())
    assert record["name"] == "tiny" and record["weights"]["dtype"] == "float16"
    assert record["weights"]["sha256"] == ckpt.file_sha256(weights)
    assert record["weights"]["bytes"] == weights.stat().st_size
    stored = torch.load(weights, weights_only=True)
    assert all(v.dtype == torch.float16 for v in stored.values() if v.is_floating_point())
    model, rec = ckpt.load(weights)
    ema = ckpt.read_checkpoint(path)["ema"]["model"]
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, ema[k].half().float())
    assert rec == record
    # a weights file that no longer matches its record is refused
    torch.save({k: v + 1 for k, v in stored.items()}, weights)
    with pytest.raises(ValueError, match="does not match its record"):
        ckpt.load(weights)
    with pytest.raises(ValueError, match="unknown dtype"):
        ckpt.export(path, tmp_path, "x", dtype="int8")


def test_metrics_are_stored_in_the_checkpoint_and_the_export(run, tmp_path):
    path, _ = run
    copy = tmp_path / "copy.pt"
    copy.write_bytes(path.read_bytes())
    ckpt.add_metrics(copy, {"frechet": 1.5, "counts": (10, 20)})
    assert ckpt.record_of(ckpt.read_checkpoint(copy))["metrics"] == {"frechet": 1.5, "counts": [10, 20]}
    weights, record_path = ckpt.export(copy, tmp_path / "w", "m")
    assert json.loads(record_path.read_text())["metrics"]["frechet"] == 1.5  # travels with the export
    ckpt.add_metrics(weights, {"frechet": 2.0})
    assert json.loads(record_path.read_text())["metrics"] == {"frechet": 2.0}
    assert [p.name for p in (tmp_path / "w").iterdir() if p.name.startswith(".")] == []  # no temporary files


def test_provenance_of_a_git_checkout_names_the_commit():
    git = ckpt.git_commit()
    assert set(git) == {"commit", "dirty"}
    if git["commit"] is not None:
        assert len(git["commit"]) == 40 and isinstance(git["dirty"], bool)


def test_export_keeps_no_folder_of_the_training_machine_in_the_command(run, tmp_path):
    path, _ = run
    state = ckpt.read_checkpoint(path)
    where = tmp_path / "deep" / "runs" / "tiny.pt"
    state["metadata"]["command"] = ["train", "--config", "digits-unet", "--out", str(where), "--set", "train.steps=3"]
    torch.save(state, tmp_path / "with_out.pt")
    _, record_path = ckpt.export(tmp_path / "with_out.pt", tmp_path / "w", "tiny")
    command = json.loads(record_path.read_text())["command"]
    assert command == ["train", "--config", "digits-unet", "--out", "tiny.pt", "--set", "train.steps=3"]
    assert str(tmp_path) not in record_path.read_text()


def test_export_of_a_frozen_clip_text_model_leaves_the_tower_to_the_committed_clip(tmp_path):
    """A text model on shapes-clip's frozen tower exports only what it trained (no ``encoder.``
    tensors) and records the tower's digest; loading takes the tower from the committed CLIP and
    gives the EMA weights in float16 exactly; a record whose digest names another tower is refused.
    A tower trained on with the model (tune) is stored."""
    text = ["data.name=shapes", "data.size=16", "data.condition=text", "data.n=64", "data.n_held_out=16",
            "model.text.clip=shapes-clip", "train.batch_size=8", "train.steps=2", "train.label_dropout=0.1", *TINY]
    for tune in (False, True):
        path = tmp_path / f"t{tune}.pt"
        train_run(None, path, overrides=[*text, f"model.text.tune={str(tune).lower()}"], argv=["train"])
        weights, record_path = ckpt.export(path, tmp_path / "w", f"text-{tune}")
        stored = torch.load(weights, weights_only=True)
        assert any(k.startswith("encoder.") for k in stored) == tune
        model, record = ckpt.load(weights)
        ema = ckpt.read_checkpoint(path)["ema"]["model"]
        assert model.state_dict().keys() == ema.keys()
        for k, v in model.state_dict().items():
            assert torch.equal(v, ema[k].half().float() if v.is_floating_point() else ema[k]), k
        assert ("base_sha256" in record["weights"]) == (not tune)
    record = json.loads(record_path.with_name("text-False.json").read_text())
    record["weights"]["base_sha256"] = "0" * 64
    record_path.with_name("text-False.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="trained on the frozen 'shapes-clip'.*digest differs"):
        ckpt.load(record_path.with_name("text-False.json"))
