"""bench/decode.py: every layout decoded by validate's loop, its cache measured against the arithmetic."""
import json

import pytest

from bench import decode


def test_decode_benchmark_measures_each_layouts_cache_against_the_source(make_source, tmp_path):
    out = tmp_path / "decode.json"
    layouts = "source,sharing_off,fusedkv,fusedkv_fuse_first,skipv1,commonkv"
    assert decode.main(["--model", str(make_source(layers=4, kv_heads=2)), "--layouts", layouts,
                        "--contexts", "24,40", "--new-tokens", "3", "--device", "cpu", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert list(results) == layouts.split(",")
    for layout, result in results.items():
        assert [r["context"] for r in result["runs"]] == [24, 40]
        for run in result["runs"]:
            # what the cache held after the prefill and 1 + 3 steps, per token, is what the config says
            assert run["kv_bytes_per_token_measured"] == result["kv_bytes_per_token_arithmetic"], layout
            assert run["decode_tokens_per_s"] > 0 and run["decode_ms_per_step"] == pytest.approx(1000 / run["decode_tokens_per_s"])
    assert results["sharing_off"]["kv_bytes_ratio_vs_source"] == 1.0
    assert results["fusedkv"]["kv_bytes_ratio_vs_source"] == results["fusedkv_fuse_first"]["kv_bytes_ratio_vs_source"] == 0.5
    assert 0.5 < results["skipv1"]["kv_bytes_ratio_vs_source"] < 1
