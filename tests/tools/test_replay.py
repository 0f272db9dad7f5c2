"""The offline twin of shadow scoring: a JSONL traffic sample answered by every mode and scored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools import quality
from tools.replay import read_traffic, replay

TRAFFIC = [
    {"prompt": "Hello there", "max_tokens": 6},
    {"inputs": "The list of", "parameters": {"max_new_tokens": 20}},
    {"messages": [{"role": "user", "content": "Say hi"}]},
]


def write_traffic(path: Path, lines: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def test_traffic_lines_in_every_api_shape(tmp_path):
    traffic = read_traffic(write_traffic(tmp_path / "t.jsonl", TRAFFIC))
    assert [(r.text, r.max_new_tokens) for r in traffic] == [("Hello there", 6), ("The list of", 20), (None, None)]
    assert traffic[2].messages == [{"role": "user", "content": "Say hi"}]
    with pytest.raises(ValueError, match=r"t2\.jsonl:2"):
        read_traffic(write_traffic(tmp_path / "t2.jsonl", [{"prompt": "x"}, {"max_tokens": 3}]))


def test_every_mode_answers_and_is_scored_against_the_reference(tiny_model_dir, tmp_path):
    traffic = read_traffic(write_traffic(tmp_path / "t.jsonl", TRAFFIC))
    results = replay(
        traffic, ["int8", "int4"], max_new_tokens=8, model=str(tiny_model_dir), cache_dir=tmp_path, device="cpu"
    )
    assert [r.mode for r in results] == ["int8", "int4"] and {r.reference for r in results} == {"fp32"}
    for result in results:
        assert result.answers == 3
        assert 3 <= result.tokens <= 6 + 8 + 8  # budgets 6, min(20, 8), 8; an answer may stop at EOS
        assert 0.0 <= result.top1_agreement <= 1.0 and result.mean_kl >= 0
    int8, int4 = results
    assert int8.mean_kl < int4.mean_kl  # 8 bits follow the reference more closely than 4
    assert int8.top1_agreement >= int4.top1_agreement


def test_the_cli_replays_and_writes_json(tiny_model_dir, tmp_path, capsys):
    traffic = write_traffic(tmp_path / "t.jsonl", TRAFFIC[:2])
    out = tmp_path / "r.json"
    code = quality.main(
        [
            "--replay", str(traffic), "--modes", "int8", "--max-new-tokens", "4",
            "--model", str(tiny_model_dir), "--cache-dir", str(tmp_path), "--json", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    table = capsys.readouterr().out
    assert "| int8 | fp32 | 2 |" in table and "top-1 agreement" in table
    (row,) = json.loads(out.read_text())
    assert row["mode"] == "int8" and row["answers"] == 2 and "scores" not in row
    assert quality.main(["--replay", str(tmp_path / "missing.jsonl"), "--model", str(tiny_model_dir)]) == 2
