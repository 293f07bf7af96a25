"""The full-size SD 1.5 single-file bench runs end to end (slow: ~2 GB written, converted, saved)."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_full_size_sd15_single_file_compiles_without_a_base(tmp_path):
    from bench.single_file_sd15 import main

    result = main(["--workdir", str(tmp_path)])
    assert result["family"] == "sd15"
    assert result["checkpoint_bytes"] > 2 * 10**9 and result["artifact_bytes"] > 2 * 10**9
    # Converted straight to fp16: the peak stays near one copy of the weights.
    assert result["compile_peak_rss_gib"] < 4, result
