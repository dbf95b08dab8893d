"""bench/bench_samplers.py runs end to end on a tiny latent (a smoke test: nothing here asserts a time)."""

from __future__ import annotations

from bench import bench_samplers
from kolors import samplers


def test_bench_samplers_reports_every_sampler(capsys):
    rows = bench_samplers.main(["--size", "8", "--steps", "2", "--warmup", "0", "--repeats", "1"])
    assert set(rows) == set(samplers.SAMPLERS)
    assert all(row["kolors"] > 0 and row["diffusers"] > 0 for row in rows.values())
    assert "| dpmpp-2m-sde |" in capsys.readouterr().out
