"""The chapter's shape trace for the textbook LeNet."""

from lenet.models import create_model, param_count
from lenet.models.summary import format_table, spatial_path, trace

from .conftest import run_cli


def test_classic_trace_matches_the_chapter():
    rows = trace(create_model("classic"))
    assert [r.name for r in rows] == ["conv1", "act1", "pool1", "conv2", "act2", "pool2", "flatten",
                                      "fc1", "act3", "fc2", "act4", "out"]
    assert [r.shape for r in rows if r.name in ("conv1", "pool1", "conv2", "pool2", "flatten")] == [
        (1, 6, 28, 28), (1, 6, 14, 14), (1, 16, 10, 10), (1, 16, 5, 5), (1, 400)]
    assert spatial_path(rows) == [28, 28, 14, 10, 5, 400, 120, 84, 10]
    assert {r.name: r.params for r in rows if r.params} == {
        "conv1": 156, "conv2": 2416, "fc1": 48120, "fc2": 10164, "out": 850}
    assert sum(r.params for r in rows) == 61706 == param_count(create_model("classic"))
    # MACs: 28*28*6*25 + 10*10*16*150 + 400*120 + 120*84 + 84*10
    assert sum(r.macs for r in rows) == 117600 + 240000 + 48000 + 10080 + 840


def test_summary_cli_prints_table_and_sizes():
    proc = run_cli("summary")
    assert proc.returncode == 0, proc.stderr
    assert "total: 61,706 trainable parameters" in proc.stdout
    assert "sizes: 28 -> 28 -> 14 -> 10 -> 5 -> 400 -> 120 -> 84 -> 10" in proc.stdout
    assert "(1, 16, 5, 5)" in proc.stdout


def test_format_table_totals():
    text = format_table(trace(create_model("classic")))
    assert text.splitlines()[-1].startswith("total: 61,706")
