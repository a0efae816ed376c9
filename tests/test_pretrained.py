"""The committed models (stepdiff/weights): each loads, matches its record, stays within the size
budget, and came from its recorded command (the provenance test).

**Provenance.** For every committed model the first steps of its recorded run are trained again
(``stepdiff.runs.replay``: the recorded configuration, seed and thread count) and their losses
are compared with the ones recorded in its JSON. On the machine type the model was trained on
(same CPU model, same threads) the run is deterministic and the losses must be equal **bit for
bit** (measured: two bf16 runs on 2 threads, 20 steps, identical). Elsewhere the order of
floating-point sums changes the last bits, and those differences grow from step to step
(measured on this project's CPU, the same 16x16 digits run on 1 and 2 threads: in float32 equal
for 10 steps, then up to 5e-7 relative by step 30; under bf16 autocast 0 at step 0, 5e-6 by
step 5, 3e-4 by step 10, 1e-2 by step 36), so only the first 5 losses are compared, to a
relative 1e-3 for a float32 run. A bf16-autocast run is compared to bf16's machine epsilon,
2^-7: another CPU may run other bf16 kernels (a Xeon with AMX against the AMD EPYC with
AVX512-BF16 that trained most models), whose roundings differ at bf16's resolution (measured: the
distilled digits students' second loss 3.5e-3 apart, while 1e-3 held for every other model). A
wrong seed or wrong data moves them by far more (checked below on a tiny bf16 model).

Cost: ``STEPDIFF_PROVENANCE_STEPS`` steps per model (default 20, at most the 50 a record keeps).
New committed models are covered automatically: the tests are parametrized over
``stepdiff.pretrained.available()``.
"""

import json
import os
import warnings

import pytest
from conftest import threads_kept

from stepdiff import checkpoints as ckpt
from stepdiff import pretrained
from stepdiff.cli import config_from_argv
from stepdiff.config import resolve
from stepdiff.runs import export_run, replay, train_run

MODELS = pretrained.available()
STEPS = min(int(os.environ.get("STEPDIFF_PROVENANCE_STEPS", "20")), ckpt.LOSSES_HEAD)
BUDGET_BYTES = 40 * 10**6  # 40 MB, decimal: the stricter reading
LOOSE_STEPS, LOOSE_RTOL, LOOSE_RTOL_BF16 = 5, 1e-3, 2.0**-7


def loose_rtol(record: dict) -> float:
    """The relative tolerance of a replay on another machine: float32's, or bf16's epsilon for a
    run under bf16 autocast."""
    return LOOSE_RTOL_BF16 if record["config"]["train"].get("autocast") == "bf16" else LOOSE_RTOL


def check_provenance(record: dict, folder, threads: int | None = None) -> str:
    """Replay the first steps of ``record`` and compare (see the module docstring); returns which
    comparison was made. Raises AssertionError when the losses do not match."""
    threads = threads or int(os.environ.get("STEPDIFF_PROVENANCE_THREADS", "0")) or record["threads"]
    steps = min(STEPS, len(record["losses_head"]))
    assert steps > 0, f"{record['name']}: the record keeps no losses"
    losses = replay(record, steps, folder, threads=threads)
    recorded = record["losses_head"][:steps]
    same = record["device"] == ckpt.device_description("cpu") and threads == record["threads"]
    if same:
        assert losses == recorded, (
            f"{record['name']}: replayed losses differ from the recorded ones on the same machine type and "
            f"threads:\n{losses}\n{recorded}"
        )
        return "exact"
    warnings.warn(
        f"{record['name']} was trained on {record['device']} with {record['threads']} threads; replaying on "
        f"{ckpt.device_description('cpu')} with {threads}: comparing the first {LOOSE_STEPS} losses to "
        f"rtol {loose_rtol(record):.3g} only",
        stacklevel=2,
    )
    assert losses[:LOOSE_STEPS] == pytest.approx(recorded[:LOOSE_STEPS], rel=loose_rtol(record)), (
        f"{record['name']}: replayed losses {losses[:LOOSE_STEPS]} differ from the recorded "
        f"{recorded[:LOOSE_STEPS]}"
    )
    return "tolerance"


@pytest.mark.parametrize("name", MODELS)
def test_committed_model_loads_and_matches_its_record(name):
    record = pretrained.record(name)
    path = pretrained.weights_dir() / record["weights"]["file"]
    assert ckpt.file_sha256(path) == record["weights"]["sha256"] and path.stat().st_size == record["weights"]["bytes"]
    model, loaded = pretrained.load(name)
    assert loaded == record and not model.training
    assert sum(p.numel() for p in model.parameters()) == record["n_parameters"]
    for key in ("config", "command", "seed", "version", "commit", "device", "wall_s", "cpu_s", "losses_head"):
        assert record.get(key) is not None, f"{name}: the record lacks {key}"
    assert len(record["losses_head"]) == min(ckpt.LOSSES_HEAD, record["step"])
    if record["kind"] == "diffusion":
        assert "metrics" in record, f"{name}: not evaluated (run `stepdiff evaluate` on the export)"
    elif record["kind"] in ("distill", "inpaint", "controlnet"):
        # Generators built on a base model are measured by their chapter's stored benchmark
        # (benchmarks/eval_distillation.py, benchmarks/eval_editing.py), whose summary the record keeps.
        assert record.get("metrics", {}).get("source", "").startswith("benchmarks/"), (
            f"{name}: its record does not say which benchmark measured it")
    else:
        assert record["held_out"], f"{name}: a classifier records its held-out scores"


@pytest.mark.parametrize("name", MODELS)
def test_recorded_command_gives_the_recorded_configuration(name):
    record = pretrained.record(name)
    assert record["command"][0] == "train"
    # Both resolved with today's defaults: a key added to the configuration since the model was trained
    # (with a default that leaves the run unchanged) is not a difference; any other value is.
    assert config_from_argv(record["command"]) == resolve(record["config"])


@pytest.mark.parametrize("name", MODELS)
def test_provenance_first_steps_reproduce_the_recorded_losses(name, tmp_path):
    check_provenance(pretrained.record(name), tmp_path)


def test_committed_weights_fit_the_budget():
    total = sum(p.stat().st_size for p in pretrained.weights_dir().glob("*.pt")) if MODELS else 0
    assert total < BUDGET_BYTES, f"committed weights take {total / 1e6:.2f} MB, over the 40 MB budget"


# --- the machinery, on a tiny model committed to a scratch folder ------------------------------

TINY = ["data.name=digits", "data.size=8", "data.condition=class", "train.batch_size=16", "train.steps=8",
        "train.label_dropout=0.2", "train.threads=1", "train.autocast=bf16", "model.channels=8",
        "model.channel_mult=[1, 2]", "model.attn_levels=[1]", "model.heads=2", "model.norm_groups=4"]


@pytest.fixture(scope="module")
def scratch_weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    with threads_kept():  # a training run sets its own thread count
        argv = ["train", "--out", "run.pt", *[f"--set={o}" for o in TINY]]
        run = train_run(None, folder / "run.pt", overrides=TINY, argv=argv)
    ckpt.add_metrics(run.path, {"note": "not evaluated: a test model"})
    export_run(run.path, folder / "w", "tiny-digits")
    return folder / "w"


def test_a_model_committed_later_is_found_loaded_and_replayed(scratch_weights, monkeypatch, tmp_path):
    monkeypatch.setattr(pretrained, "weights_dir", lambda: scratch_weights)
    assert pretrained.available() == ["tiny-digits"]
    model, record = ckpt.load("tiny-digits")  # by name, through the committed models
    assert record["name"] == "tiny-digits" and record["losses_head"] == record["losses_head"][:8]
    assert config_from_argv(record["command"]) == record["config"]
    assert check_provenance(record, tmp_path) == "exact"
    with pytest.warns(UserWarning, match="comparing the first 5 losses"):
        assert check_provenance(dict(record, threads=2), tmp_path / "2", threads=1) == "tolerance"


def test_the_provenance_check_fails_for_another_run(scratch_weights, tmp_path):
    """A record whose losses came from another seed or other data fails the check, on either path."""
    record = json.loads((scratch_weights / "tiny-digits.json").read_text())
    other_seed = json.loads(json.dumps(record))
    other_seed["config"]["train"]["seed"] = 1
    other_data = json.loads(json.dumps(record))
    other_data["config"]["data"]["size"] = 16
    for wrong in (other_seed, other_data):
        replayed = replay(wrong, 5, tmp_path / str(id(wrong)))
        assert loose_rtol(record) == LOOSE_RTOL_BF16  # the looser of the two tolerances
        assert replayed != pytest.approx(record["losses_head"][:5], rel=loose_rtol(record))
        with pytest.raises(AssertionError, match="differ"):
            check_provenance(dict(record, config=wrong["config"]), tmp_path / f"c{id(wrong)}")
