"""`photoninfer bench` end to end on a tiny random model: JSON with both engines, agreeing greedy tokens."""

import json

from photoninfer.cli import main


def test_bench_writes_side_by_side_results(tmp_path, monkeypatch):
    monkeypatch.setenv("PHOTONINFER_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench.json"
    code = main(["--log-level", "WARNING", "bench", "--random-shape", "tiny", "--device", "cpu",
                 "--concurrency", "1,3", "--prompt-len", "12", "--output-len", "6", "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["meta"]["prompt_len"] == 12 and report["meta"]["device"]
    rows = {(r["engine"], r["concurrency"]): r for r in report["results"]}
    assert set(rows) == {(e, c) for e in ("hf-transformers", "photoninfer") for c in (1, 3)}
    for (engine, concurrency), row in rows.items():
        assert row["output_tokens"] == 6 * concurrency and row["output_tok_per_s"] > 0
    # float32 on the CPU: PhotonInfer's greedy tokens are HF's, token for token
    assert rows[("photoninfer", 3)]["agreement_with_hf"] == 1.0
    assert set(report["ttft_s"]) == {"hf-transformers", "photoninfer"}
