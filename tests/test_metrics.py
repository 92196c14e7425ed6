"""Metrics: jsonl schema and flushing, non-finite values, truncation on resume, reduction, summary, plot."""

import io
import json
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax.metrics import (
    MetricsWriter,
    ProgressBar,
    plot_curves,
    read_metrics,
    reduce_metrics,
    to_json_line,
    write_summary,
)


def test_jsonl_schema_and_flush(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=True)
    line = writer.write(
        np.int64(3),
        "grpo",
        {
            "reward/mean": jnp.float32(0.25),
            "kl": np.float64(1e-3),
            "tokens": jnp.int32(17),
            "loss": jnp.array([2.5]),
        },
    )
    assert line == {"step": 3, "stage": "grpo", "reward/mean": 0.25, "kl": 1e-3, "tokens": 17, "loss": 2.5}
    # Flushed before close: a crash right now would lose nothing.
    text = (tmp_path / "metrics.jsonl").read_text()
    assert (
        text == '{"step": 3, "stage": "grpo", "reward/mean": 0.25, "kl": 0.001, "tokens": 17, "loss": 2.5}\n'
    )
    writer.write(4, "eval", {"eval/accuracy": 0.5})
    writer.close()
    records = read_metrics(tmp_path)
    assert records == [line, {"step": 4, "stage": "eval", "eval/accuracy": 0.5}]
    assert type(records[0]["step"]) is int and type(records[0]["reward/mean"]) is float
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir())


def _tensorboard_scalars(logdir):
    """(tag, step, value) of every scalar in the TFRecord event files (length, crc, Event proto, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    scalars = []
    for path in sorted(logdir.glob("events.out.tfevents*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            scalars += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return scalars


def test_tensorboard_tags(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        writer.write(1, "grpo", {"reward/mean": 0.5, "note": "text is not a scalar", "loss": float("nan")})
        writer.write(2, "grpo", {"reward/mean": 0.75})
        writer.write(2, "eval", {"eval/pass@k": 0.5})
    assert _tensorboard_scalars(tmp_path / "tensorboard") == [
        ("grpo/reward/mean", 1, 0.5),
        ("grpo/reward/mean", 2, 0.75),
        ("eval/pass_at_k", 2, 0.5),  # no doubled stage prefix; '@' is not a legal TensorBoard tag character
    ]


def test_nonfinite_values_become_null_and_are_listed():
    line = to_json_line(7, "grpo", {"loss": float("nan"), "kl": jnp.inf, "reward/mean": 1.0})
    assert line == {
        "step": 7,
        "stage": "grpo",
        "loss": None,
        "kl": None,
        "reward/mean": 1.0,
        "nonfinite": ["loss", "kl"],
    }
    json.dumps(line, allow_nan=False)  # valid strict JSON
    with pytest.raises(ValueError, match="reserved"):
        to_json_line(1, "grpo", {"step": 3})
    with pytest.raises(ValueError, match=r"metric 'logits' must be a scalar, got an array of shape \(2,\)"):
        to_json_line(1, "grpo", {"logits": np.zeros(2)})


def _write_run(writer, stages):
    for stage, steps in stages:
        for step in steps:
            writer.write(step, stage, {"loss": float(step)})
            if step % 2 == 0:
                writer.write(step, "eval", {"eval/accuracy": step / 10})


def test_truncate_after_matches_uninterrupted_run(tmp_path):
    order = ["sft", "grpo", "sft2", "grpo2"]
    full = [("sft", range(1, 4)), ("grpo", range(1, 7)), ("sft2", range(1, 3))]
    with MetricsWriter(tmp_path / "uninterrupted", tensorboard=False) as writer:
        _write_run(writer, full)
    # Interrupted: ran into sft2 step 1, but the last checkpoint was grpo step 4 (after its eval line).
    with MetricsWriter(tmp_path / "resumed", tensorboard=False) as writer:
        _write_run(writer, [("sft", range(1, 4)), ("grpo", range(1, 7)), ("sft2", range(1, 2))])
    with MetricsWriter(tmp_path / "resumed", tensorboard=False) as writer:
        assert writer.truncate_after(4, order, stage="grpo") == 4  # grpo 5, 6, eval 6, sft2 1
        records = read_metrics(writer.path)
        assert [(r["stage"], r["step"]) for r in records[-3:]] == [("grpo", 3), ("grpo", 4), ("eval", 4)]
        assert ("eval", 2) in [(r["stage"], r["step"]) for r in records[:5]]  # sft's eval at step 2 kept
        _write_run(writer, [("grpo", range(5, 7)), ("sft2", range(1, 3))])
    assert (tmp_path / "resumed" / "metrics.jsonl").read_bytes() == (
        tmp_path / "uninterrupted" / "metrics.jsonl"
    ).read_bytes()
    with pytest.raises(ValueError, match="stage 'rm' is not in stage_order"):
        MetricsWriter(tmp_path / "resumed", tensorboard=False).truncate_after(1, order, stage="rm")


def test_truncate_lines(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        _write_run(writer, [("grpo", range(1, 4))])
        saved = writer.num_lines
        assert saved == 4
        _write_run(writer, [("grpo", range(4, 6))])
        assert writer.truncate_lines(saved) == 3
        writer.write(4, "grpo", {"loss": 4.0})
    assert [(r["stage"], r["step"]) for r in read_metrics(tmp_path)] == [
        ("grpo", 1),
        ("grpo", 2),
        ("eval", 2),
        ("grpo", 3),
        ("grpo", 4),
    ]


def test_inactive_writer_writes_nothing(tmp_path):
    writer = MetricsWriter(tmp_path / "w", active=False)
    assert writer.write(1, "grpo", {"loss": 1.0}) == {"step": 1, "stage": "grpo", "loss": 1.0}
    writer.close()
    assert not (tmp_path / "w").exists()


def test_read_metrics_names_bad_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "stage": "grpo"}\n{"step": 2, \n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON line"):
        read_metrics(tmp_path / "metrics.jsonl")


def test_reduce_metrics():
    history = [
        {"loss": jnp.float32(1.0), "kl": 0.5, "note": "x"},
        {"loss": 2.0, "eval/accuracy": np.float64(0.25)},
        {"loss": 4.5, "kl": None},
    ]
    assert reduce_metrics(history) == {"loss": 2.5, "kl": 0.5, "eval/accuracy": 0.25}
    assert reduce_metrics([]) == {}


def test_write_summary_is_atomic_json(tmp_path):
    path = write_summary(
        tmp_path, {"final": {"eval/accuracy": np.float32(0.75), "loss": float("nan")}, "steps": 10}
    )
    assert json.loads(path.read_text()) == {"final": {"eval/accuracy": 0.75, "loss": None}, "steps": 10}
    write_summary(tmp_path, {"steps": 11})
    assert json.loads(path.read_text()) == {"steps": 11}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no temp file left


def test_progress_bar_shows_postfix():
    stream = io.StringIO()
    with ProgressBar(10, "grpo", file=stream) as bar:
        bar.update(1, reward=jnp.float32(0.123456), accuracy=0.5)
        bar.update(2)
    text = stream.getvalue()
    assert "grpo" in text and "3/10" in text
    assert "reward=0.1235" in text and "accuracy=0.5" in text
    silent = io.StringIO()
    with ProgressBar(10, "grpo", file=silent, disable=True) as bar:
        bar.update(5, reward=1.0)
    assert silent.getvalue() == ""


def test_plot_curves_writes_png(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        for step in range(1, 6):
            writer.write(step, "sft", {"loss": 1.0 / step})
        for step in range(1, 6):
            writer.write(
                step,
                "grpo",
                {"reward/mean": step / 5, "kl": 0.01 * step, "completion_len/mean": 20.0 + step},
            )
        writer.write(5, "eval", {"eval/accuracy": 0.4})
    out = plot_curves(tmp_path / "metrics.jsonl", tmp_path / "plots" / "curves.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000
