"""train.loggers with real runs: TensorBoard scalars read back with tensorboard's EventAccumulator equal
metrics.jsonl (training and validation rows, across a resume that must purge the steps after the checkpoint);
a W&B offline run writes its local run directory and a resumed run continues the same W&B run id."""
import importlib.util
import json
import shutil
import struct

import pytest

from tests.test_train import base_config, make_lab_data, metrics, run_train

HAVE_WANDB = importlib.util.find_spec("wandb") is not None


@pytest.fixture(scope="module")
def lab_data(tmp_path_factory):
    return make_lab_data(tmp_path_factory.mktemp("loggers"))


def config(data_dir, loggers, **train_kw):
    cfg = base_config(data_dir.parent, data_dir, max_steps=6, save_every=4, loggers=loggers, **train_kw)
    cfg["data"]["num_questions"] = 24  # 3 steps per epoch: validations at steps 3 and 6
    cfg["validation"] = {"data": str(data_dir / "eval_id.jsonl"), "every_epochs": 1, "n": 2, "temperature": 1.0,
                         "max_new_tokens": 8, "instruction": False}
    return cfg


def tensorboard_rows(tb_dir):
    """{step: {tag: value}} from the event files, as TensorBoard itself reads them (purges included)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    rows = {}
    for tag in acc.Tags()["scalars"]:
        for event in acc.Scalars(tag):
            assert tag not in rows.get(event.step, {}), f"{tag} twice at step {event.step}"
            rows.setdefault(event.step, {})[tag] = event.value
    return rows


def jsonl_rows(out):
    """metrics.jsonl as {step: {key: value}}, training and validation rows of a step merged."""
    rows = {}
    for r in metrics(out):
        rows.setdefault(r["step"], {}).update({k: float(v) for k, v in r.items() if k != "step"})
    return rows


def wandb_history(path):
    """{step: {key: value}} of the history records in a .wandb transaction log. The file is a LevelDB-style log
    (a 7-byte ":W&B" header, then 32 KiB blocks of records with a 7-byte header: crc32, length, type 1 full /
    2 first / 3 middle / 4 last) of wandb_internal_pb2.Record protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, block = path.read_bytes(), 32 * 1024
    assert raw[:4] == b":W&B", raw[:8]
    pos, parts, rows = 7, b"", {}
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block tail too short for a header is zero padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if kind == 0:  # (preallocated zeros at the end of the file)
            break
        parts, pos = parts + raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(parts)
            parts = b""
            if rec.WhichOneof("record_type") == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item}
                rows.setdefault(row.pop("_step"), {}).update(row)
    return rows


def test_tensorboard_equals_metrics_jsonl_across_a_resume(lab_data, tmp_path):
    out = tmp_path / "tb_run"
    cfg = config(lab_data, ["jsonl", "tensorboard"])
    run_train(out, cfg, nproc=1, extra=["train.stop_after=6"])  # checkpoints at steps 4 and 6
    first = tensorboard_rows(out / "tb")
    assert sorted(first) == [1, 2, 3, 4, 5, 6]
    shutil.rmtree(out / "ckpt" / "step-6")  # as if killed after step 6 was logged but before it was saved
    run_train(out, cfg, nproc=1, extra=["train.max_steps=7"])  # resumes at step 4, re-runs 5 and 6, then 7
    expected = jsonl_rows(out)
    assert sorted(expected) == [1, 2, 3, 4, 5, 6, 7]
    assert {"val/avg@n", "val/epoch"} <= set(expected[3]) and {"val/avg@n", "val/epoch"} <= set(expected[6])
    got = tensorboard_rows(out / "tb")
    assert sorted(got) == sorted(expected)
    for step, row in expected.items():
        assert set(got[step]) == set(row), step
        for key, value in row.items():
            assert got[step][key] == pytest.approx(value, rel=1e-6, abs=1e-6), (step, key)  # fp32 in the events
    assert got[5]["seconds"] != first[5]["seconds"]  # the re-run step's values replaced the first run's


@pytest.mark.skipif(not HAVE_WANDB, reason="wandb is not installed (optional: pip install wandb); requirements.txt "
                                           "installs it, so CI runs this test")
def test_wandb_offline_run_directory_and_resumed_run_id(lab_data, tmp_path):
    out = tmp_path / "wandb_run"
    cfg = config(lab_data, ["jsonl", "wandb"], wandb_mode="offline", wandb_project="offgrpo-test")
    run_train(out, cfg, nproc=1, extra=["train.stop_after=4"])
    run_id = (out / "wandb_id").read_text().strip()
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith("-" + run_id)
    assert list(runs[0].glob("*.wandb")), "no .wandb transaction log in the run directory"
    run_train(out, cfg, nproc=1)
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith("-" + run_id) for r in runs)  # the same W&B run, resumed
    assert (out / "wandb_id").read_text().strip() == run_id
    logged = {}
    for run in runs:  # the first session's steps 1-4, the resumed one's 5-6 (+ the validations at 3 and 6)
        for step, row in wandb_history(next(run.glob("*.wandb"))).items():
            logged.setdefault(step, {}).update(row)
    expected = jsonl_rows(out)
    assert sorted(logged) == sorted(expected) == [1, 2, 3, 4, 5, 6]
    for step, row in expected.items():
        for key, value in row.items():
            assert logged[step][key] == pytest.approx(value, rel=1e-9), (step, key)


def test_a_missing_logger_package_is_named(monkeypatch):
    import loggers

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "tensorboard" else real(name))
    assert loggers.check(["jsonl", "tensorboard"], "online") == (
        "train.loggers: tensorboard needs the tensorboard package (pip install tensorboard)")
    assert loggers.check(["jsonl"], "online") is None
