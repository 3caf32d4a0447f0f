"""Shared fixtures: the cosilo binary, a tiny cohort and a briefly trained bundle (made once per
session with the real `cosilo` commands)."""

import subprocess
from pathlib import Path

import pytest

import cosilo


@pytest.fixture(scope="session")
def cosilo_bin() -> Path:
    return cosilo.find_cosilo()


@pytest.fixture(scope="session")
def cohort(tmp_path_factory, cosilo_bin) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    subprocess.run(
        [str(cosilo_bin), "data", "cohort", "--out", str(out), "--sizes", "1,1,1", "--test", "1"],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture(scope="session")
def bundle(tmp_path_factory, cosilo_bin, cohort) -> Path:
    """A U-Net trained for two steps and exported: enough to check shapes, geometry and files."""
    work = tmp_path_factory.mktemp("bundle")
    store = work / "store"
    run = lambda *a: subprocess.run([str(cosilo_bin), *a], check=True, capture_output=True)
    run("import", "--store", str(store), "--manifest", str(cohort / "manifest.json"))
    run("train", "--store", str(store), "--epochs", "1", "--steps-per-epoch", "2", "--base", "4")
    run("export", "--store", str(store), "--out", str(work / "bundle"))
    return work / "bundle"
