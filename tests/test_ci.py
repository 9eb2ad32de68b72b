"""`.ci/run`, the CI entry point: `make test` under a fresh HOME that holds only pip's config, removed afterwards
(about 5 GB of installer cache and models per run; leftovers filled a shared disk once). `make` here is a stand-in
that records what it was given: the real one is the whole suite."""

from __future__ import annotations

import os
import subprocess

from tests.conftest import REPO

RECORDING_MAKE = """#!/usr/bin/env bash
{ echo "home=$HOME"; echo "args=$*"; cat "$HOME/.config/pip/pip.conf"; } > "$RECORD"
mkdir -p "$HOME/.cache/uv" && head -c 1000000 /dev/zero > "$HOME/.cache/uv/wheel"
exit 3
"""


def test_ci_runs_make_test_in_a_fresh_home_with_pips_config_and_removes_it_whatever_the_outcome(tmp_path):
    user_home, tools = tmp_path / "home", tmp_path / "bin"
    (user_home / ".config/pip").mkdir(parents=True)
    (user_home / ".config/pip/pip.conf").write_text("[global]\nindex-url = https://mirror.example/simple\n")
    tools.mkdir()
    (tools / "make").write_text(RECORDING_MAKE)
    (tools / "make").chmod(0o755)
    record = tmp_path / "record.txt"
    env = os.environ | {"HOME": str(user_home), "PATH": f"{tools}:{os.environ['PATH']}", "RECORD": str(record)}
    done = subprocess.run(["bash", str(REPO / ".ci/run")], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr  # make's failure is CI's
    seen = dict(line.split("=", 1) for line in record.read_text().splitlines()[:2])
    assert seen["home"].startswith("/tmp/llmc-ci-home.") and seen["home"] != str(user_home)
    assert seen["args"].startswith("test PYTHON=")
    assert "index-url = https://mirror.example/simple" in record.read_text()  # pip still finds its indexes
    assert not os.path.exists(seen["home"])  # removed, with what the run wrote there
