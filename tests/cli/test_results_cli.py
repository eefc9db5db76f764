"""`balsamctl results` on results files (no server): the D table against the truth, the
pictures, and bad input. Results are written here from the model the fit assumes, so
the figures are known exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from balsam_grpc.cli.errors import CliError, UsageError
from balsam_grpc.cli.xpcs_plots import (
    default_rings,
    diffusion_error,
    load_results,
    plot_two_time,
)

PNG = b"\x89PNG\r\n\x1a\n"


def result(fitted: float, truth: float, n_rings: int = 6) -> dict:
    tau = np.geomspace(1e-3, 0.2, 20)
    rings = []
    for i in range(n_rings):
        q = (1 + i) * 1e7
        gamma = fitted * q * q
        g2 = 1 + 0.9 * np.exp(-2 * gamma * tau)
        rings.append({"q_per_m": q, "q2_mean_per_m2": q * q, "pixels": 50, "g2": g2.tolist(),
                      "g2_err": [0.01] * tau.size, "baseline": 1.0, "beta": 0.9, "gamma_per_s": gamma,
                      "gamma_err": 0.01 * gamma, "fit_ok": True})
    return {"frames": 1024, "frame_time_s": 1e-3, "tau_s": tau.tolist(), "rings": rings,
            "diffusion_m2_per_s": fitted, "truth": {"diffusion_m2_per_s": truth}}


def balsamctl(*args: str, home: Path, subprocess_: bool = False) -> Any:
    """In process (no server is needed; a subprocess per call costs seconds of imports),
    or as the console program when `subprocess_`."""
    env = {"BALSAM_HOME": str(home), "COLUMNS": "140"}
    if subprocess_:
        res = subprocess.run([sys.executable, "-m", "balsam_grpc.cli.main", *args], capture_output=True, text=True,
                             timeout=120, env={**os.environ, **env}, check=False)
        res.exit_code = res.returncode  # type: ignore[attr-defined]
        return res
    from typer.testing import CliRunner

    from balsam_grpc.cli.main import app

    return CliRunner().invoke(app, list(args), env=env)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "ds-0000.json").write_text(json.dumps({**result(2.06e-14, 2e-14), "dataset": "/work/1/dataset.npz"}))
    (run / "ds-0001.json").write_text(json.dumps({**result(3.9e-14, 4e-14), "dataset": "/work/2/dataset.npz"}))
    (run / "other.json").write_text(json.dumps({"not": "a result"}))
    # The reduction's own HDF5 results (pyXPCSViewer's layout, with a two-time map).
    from balsam_grpc.xpcs.analysis import reduce_stream
    from balsam_grpc.xpcs.synthetic import generate

    data = generate(rows=16, cols=16, n_frames=256, diffusion_m2_per_s=3e-14, seed=3)
    meta = {"frame_time_s": data.frame_time_s, "geometry": data.geometry.to_dict(),
            "truth": {"diffusion_m2_per_s": 3e-14, "contrast": data.contrast}}
    reduction = reduce_stream([data.frames], 256, meta, n_rings=4, twotime=True, twotime_rings=[1])
    reduction.summary["dataset"] = "/x/ds-0002.h5"
    reduction.write_h5(run / "ds-0002.h5")
    # As the site app stages them out: the JSON summary and the HDF5 results of one dataset.
    (run / "ds-0003.json").write_text(json.dumps(reduction.summary))
    reduction.write_h5(run / "ds-0003_results.hdf")
    return run


def test_results_table_pictures_and_bad_input(folder: Path, tmp_path: Path) -> None:
    plots = tmp_path / "pictures"
    res = balsamctl("results", str(folder), "--plots", str(plots), "--rings", "0,3", "-o", "json", home=tmp_path,
                    subprocess_=True)
    assert res.exit_code == 0, res.stderr
    (report,) = json.loads(res.stdout)
    rows = {r["dataset"]: r for r in report["results"]}
    # Named by their results files (the jobs' local copies all have one name), other.json is not a result;
    # ds-0003's JSON summary and HDF5 results file are one result, read from the HDF5 file.
    assert set(rows) == {"ds-0000", "ds-0001", "ds-0002", "ds-0003"} and len(report["results"]) == 4
    assert rows["ds-0003"]["path"].endswith("ds-0003_results.hdf")
    assert rows["ds-0002"]["rings"] == 4 and rows["ds-0002"]["true_diffusion_m2_per_s"] == 3e-14
    assert rows["ds-0000"]["rel_error"] == pytest.approx(0.03) and rows["ds-0001"]["rel_error"] == pytest.approx(-0.025)
    assert rows["ds-0000"]["rings_fitted"] == 6 and rows["ds-0000"]["diffusion_err_m2_per_s"] == pytest.approx(0.0)
    names = sorted(Path(p).name for p in report["plots"])
    assert names == ["diffusion.png", "g2-ds-0000.png", "g2-ds-0001.png", "g2-ds-0002.png", "twotime-ds-0002.png"]
    for name in names:
        assert (plots / name).read_bytes()[:8] == PNG
    table = balsamctl("results", str(folder / "ds-0000.json"), home=tmp_path)
    assert table.exit_code == 0 and "+3.00%" in table.stdout and "0.02060" in table.stdout
    assert "|D error| median 3.00%" in table.stdout
    # In process the CLI's errors arrive as exceptions (balsamctl prints them, exit 2 / 1).
    out_of_range = balsamctl("results", str(folder), "--rings", "0,9", home=tmp_path).exception
    assert isinstance(out_of_range, UsageError) and "rings 0..3" in str(out_of_range)
    nothing = balsamctl("results", str(tmp_path / "missing.json"), home=tmp_path).exception
    assert isinstance(nothing, CliError) and "no such results file" in str(nothing)
    empty = balsamctl("results", str(folder / "other.json"), home=tmp_path).exception
    assert isinstance(empty, CliError) and "no XPCS results" in str(empty)
    assert isinstance(balsamctl("results", home=tmp_path).exception, UsageError)


def test_plot_helpers() -> None:
    assert default_rings(8) == [0, 2, 5, 7] and default_rings(3) == [0, 1, 2]
    scattered = result(2e-14, 2e-14)
    scattered["rings"][0]["gamma_per_s"] *= 1.1
    assert diffusion_error(scattered) > 0
    with pytest.raises(ValueError, match="square"):
        plot_two_time(Path("unused.png"), np.ones((3, 4)), 1e-3)


def test_load_results_names_an_unreadable_file(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json"):
        load_results([tmp_path])
