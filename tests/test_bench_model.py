"""``scripts/bench.py --model KEY``: the serving figures for models the server lists, side by
side with ``mlx_lm.server`` and llama-cpp-python's server on the same weights (what a person
with a Mac runs on real models), here on the generated test models. Checks the run and its
table, never the timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import GGUF_KEY, MLX_KEY

REPO = Path(__file__).resolve().parents[1]


def test_model_mode_measures_listed_models_beside_the_peer_servers(models_root, tmp_path):
    out = tmp_path / "results.json"
    argv = [sys.executable, str(REPO / "scripts" / "bench.py"), "--quick"]
    argv += ["--model", MLX_KEY, "--model", GGUF_KEY, "--models-dir", str(models_root)]
    argv += ["--concurrency", "1,2", "--out", str(out)]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    mlx = results["figures"]["mlx"]
    gguf = results["figures"]["gguf"]
    # Each model ran on our server and on its peer, at each concurrency asked for.
    for n in (1, 2):
        assert mlx["raw"][str(n)]["mlx_lm.server"]["aggregate_tps"] > 0
        assert gguf["raw"][str(n)]["llama_cpp.server"]["aggregate_tps"] > 0
        assert mlx["raw"][str(n)]["mlxserve"]["aggregate_tps"] > 0
    assert mlx["figures"]["vs_mlx_lm.server_2"] > 0
    # The peer's single stream against the same in-process baseline, beside ours.
    assert mlx["figures"]["peer_single_decode_vs_inproc"] > 0
    assert "peer_ttft_added_ms" in gguf["figures"]
    assert gguf["figures"]["vs_llama_cpp.server_2"] > 0
    # The in-process baselines loaded the same weights; memory is compared with them too.
    assert mlx["inproc_decode_tps"] > 0 and gguf["inproc_peak_rss"] > 0
    assert 0 < mlx["figures"]["peak_rss_8_vs_inproc"] < 20
    # Of the GGUF server's peak, the earlier phases' requests parked in host memory, apart.
    rss = gguf["figures"]
    assert rss["peak_rss_8_prompt_cache_mb"] > 0
    assert 0 < rss["peak_rss_8_less_prompt_cache_vs_inproc"] < rss["peak_rss_8_vs_inproc"]
    assert gguf["figures"]["second_turn_cached_tokens"] > 0
    for row in ("mlx vs_mlx_lm.server_2", "gguf vs_llama_cpp.server_2", "peak_rss_8_vs_inproc"):
        assert row in proc.stdout
    assert "seconds per part:" in proc.stdout


def test_model_mode_refuses_a_key_the_server_does_not_list(models_root, tmp_path):
    argv = [sys.executable, str(REPO / "scripts" / "bench.py"), "--quick"]
    argv += ["--model", "nobody/no-such-model", "--models-dir", str(models_root)]
    argv += ["--out", str(tmp_path / "r.json")]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "nobody/no-such-model" in proc.stderr and "not a text model the server lists" in (
        proc.stderr
    )
