"""The GPU check's code path on a tiny model on CPU (the real run needs a GPU: docs/benchmarks.md)."""

from benchmarks import gpu_check


def test_tiny_cpu_run_measures_every_row(capsys):
    rows = gpu_check.main(["--tiny", "--device", "cpu"])
    assert [row["name"] for row in rows] == ["tiny full, before", "tiny full, after", "tiny LoRA, after"]
    assert all("error" not in row for row in rows), rows
    before, after, lora = rows
    assert before["probe"]["chunk"] == 0 and not before["probe"]["checkpointing"]
    assert after["probe"]["micro_batch"] == 2 and after["probe"]["checkpointing"] and after["probe"]["chunk"] > 0
    assert lora["trainable"] < after["trainable"] == after["params"]
    assert all(row["peak_bytes"] >= row["held_bytes"] > 0 and row["step_s"] > 0 for row in rows)
    assert capsys.readouterr().out.count("tiny") >= 3
