"""benchmarks/bench_gpu.py (issue 8's GPU table) with --tiny on CPU: every row is there, every cell is a number or
says why not, and where ours and the original both run they give the same answers and images."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.oracle  # the bench builds the original next to ours

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_gpu.py"
BOTH_RUN = [f"chat_beam{beams}_{mode}" for beams in (1, 3) for mode in ("dynamic", "static", "compile")]
CUDA_ONLY = [f"chat_{shape}_cuda_graph" for shape in ("beam1", "beam3", "batch8")]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    bench = load_bench()
    out = tmp_path_factory.mktemp("bench_gpu") / "table.json"
    # Short runs on one thread (as the rest of the suite runs once the original is imported); the "eager" backend
    # traces the same torch.compile graphs without generating code.
    argv = ["--tiny", "--device", "cpu", "--new-tokens", "8", "--paint-steps", "2", "--fast-steps", "2",
            "--compile-backend", "eager", "--threads", "1", "--out", str(out)]
    result = bench.main(argv)
    return bench, bench.parse_args(argv), result, json.loads(out.read_text(encoding="utf-8"))


def test_every_row_has_a_number_or_a_reason(run):
    bench, args, result, written = run
    assert written["rows"] == result["rows"] and written["complete"]
    rows = {row["id"]: row for row in written["rows"]}
    assert list(rows) == [spec[0] for spec in bench.row_specs(args)]
    for row in rows.values():
        for column in ("ours", "original"):
            value = row[column]
            if isinstance(value, str):
                assert value.startswith("n/a: "), (row["id"], column, value)
            else:
                assert isinstance(value, float) and math.isfinite(value) and value > 0, (row["id"], column, value)
    for key in CUDA_ONLY + ["mem_chat", "mem_chat_8bit", "mem_chat_4bit", "mem_chat_paint"]:
        assert rows[key]["ours"].startswith("n/a: "), key
    assert isinstance(rows["copy_bandwidth"]["limit"], float) and isinstance(rows["decode_limit"]["limit"], float)
    assert written["environment"]["torch"] and written["settings"]["tiny"]


def test_ours_equals_the_original_where_both_run(run):
    _, _, result, _ = run
    rows = {row["id"]: row for row in result["rows"]}
    for key in BOTH_RUN + ["chat_first_token", "paint_fp32", "paint_dtype", "paint_text_encoder"]:
        assert isinstance(rows[key]["ours"], float) and isinstance(rows[key]["original"], float), key
    for key in BOTH_RUN + ["paint_fp32", "paint_dtype"]:
        assert rows[key]["same"] is True, (key, rows[key]["notes"])
    for key in ("chat_batch8_dynamic", "chat_batch8_static", "chat_batch8_compile", "paint_channels_last",
                "paint_compile", "paint_dpm"):
        assert isinstance(rows[key]["ours"], float), key
    # </s> is never chosen: every call decodes the full length (max_length 8 -> 10 tokens)
    assert all("10 tokens" in rows[key]["notes"][0] for key in BOTH_RUN)


def test_markdown_table(run):
    bench, args, result, _ = run
    table = bench.Table(args)
    for row in result["rows"]:
        table.rows[row["id"]].update(row)
    text = table.markdown()
    assert text.startswith("| figure | ours | original | hardware limit or target |")
    assert len([line for line in text.splitlines() if line.startswith("| ")]) == 2 + len(result["rows"])
