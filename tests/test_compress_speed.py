"""scripts/compress_speed.py on the tiny model: one JSON line per method with the forward floor, and the
Markdown table regenerated from the file. No timing thresholds."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import compress_speed  # noqa: E402


@pytest.mark.filterwarnings("ignore:.*wider than the .* calibration tokens")
def test_compress_speed_rows_and_table(tmp_path, capsys):
    out = tmp_path / "speed.jsonl"
    out.write_text(json.dumps({"model": "tiny", "method": "svd", "keep": 0.5, "seconds": 2.0, "floor_s": 0.5,
                               "ratio": 4.0, "timings": {"forward": 1.0, "check": 0.25}}) + "\n")
    rows = compress_speed.main(["tiny", "--methods", "svd-llm", "aa-svd", "--keep", "0.6", "--out", str(out)])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 3 and lines[1:] == json.loads(json.dumps(rows))  # appended, the old row kept
    for row, method, streams in zip(lines[1:], ("svd-llm", "aa-svd"), (1, 2)):
        assert row["model"] == "tiny" and row["method"] == method and row["keep"] == 0.6
        assert row["floor_streams"] == streams and row["floor_s"] > 0 and row["seconds"] > 0
        assert row["ratio"] == pytest.approx(row["seconds"] / row["floor_s"])
        assert {"forward", "covariance", "factorize", "check", "capture"} <= set(row["timings"])
        for key in ("torch", "threads", "cpu", "date", "command", "calibration_tokens"):
            assert row[key], key
        assert "compress_speed.py tiny --methods svd-llm aa-svd" in row["command"]
    assert lines[1]["calibration_tokens"] == 4 * 2 * 32
    capsys.readouterr()

    compress_speed.main(["--table", str(out)])
    md = capsys.readouterr().out
    assert "### tiny, keep 0.5" in md and "### tiny, keep 0.6" in md
    assert "| method | code | total s | floor s | ratio | forward | covariance | factorize | check | other |" in md
    assert "| svd | - | 2.00 | 0.50 | 4.0 | 1.00 | - | - | 0.25 | 0.75 |" in md  # other = 2 - 1 - 0.25
    assert md.count("| svd-llm |") == 1 and md.count("| aa-svd |") == 1


def test_compress_speed_marks_zs_svd_and_checks_arguments():
    row = {"model": "m", "method": "zs-svd", "keep": 0.8, "seconds": 3.0, "floor_s": 1.0, "ratio": 3.0,
           "timings": {}, "floor_basis": compress_speed.floor_basis("zs-svd")}
    md = compress_speed.render_table([row])
    assert "| zs-svd * | - | 3.00 | 1.00 | 3.0 |" in md and "above twice this one" in md
    assert compress_speed.floor_basis("aa-svd") == "the two-stream floor"
    with pytest.raises(SystemExit):
        compress_speed.main(["tiny"])  # no --out
    with pytest.raises(SystemExit):
        compress_speed.main(["tiny", "--table", "x.jsonl"])
