"""The accelerate and Hugging Face Trainer routes with the real libraries: one ``torchrun``
launch of tests/integrations/hf_routes.py on 2 CPU processes (see its docstring, also for the
documented CPU shim that turns FSDP on in accelerate)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROUTES = Path(__file__).with_name("hf_routes.py")


@pytest.mark.distributed
def test_accelerate_and_hf_trainer_routes(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROUTES.parents[2])}
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node=2", str(ROUTES), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    r = json.loads((tmp_path / "results.json").read_text())
    # 1. built before accelerator.prepare: bound to FSDP2's layout at the first step
    acc = r["accelerate_fsdp2"]
    assert acc["layout"] == "fsdp2" and acc["refreshes"] == 3 * 3  # 3 matrices, k = 0, 2, 4
    assert acc["max_diff"] < 2e-5, acc
    # 4. accelerate DDP + sharding="owner": save_state needs consolidate_on_save_state
    own = r["accelerate_ddp_owner"]
    assert "consolidate_on_save_state" in own["refusal"], own
    assert own["saved_params"] == own["params"] and own["resumed_equal"], own
    assert own["one_process_diff"] < 1e-4, own
    # 5. FSDP2 FULL_STATE_DICT: one file of the whole single-process state, resumed bitwise
    for route in ("accelerate_fsdp2_full_owner", "accelerate_fsdp2_full_default"):
        full = r[route]
        assert full["saved_params"] == full["params"] and full["resumed_equal"], (route, full)
    assert r["accelerate_fsdp2_full_owner"]["layout"] == "fsdp2_owner"
    assert r["accelerate_fsdp2_full_default"]["layout"] == "fsdp2"
    tf = r["trainer_fsdp2_full"]
    assert tf["layout"] == "fsdp2_owner" and tf["saved_params"] == tf["params"], tf
    assert tf["resumed_equal"] and tf["losses"] == tf["resumed_losses"], tf
    # 2. HF Trainer + FSDP2 (fsdp_config): DCP checkpoint, resume ends where the run did
    fsdp = r["trainer_fsdp2"]
    assert fsdp["layout"] == "fsdp2" and fsdp["resumed_equal"], fsdp
    assert fsdp["losses"] == fsdp["resumed_losses"]
    # 3. HF Trainer + DDP + sharding="owner" with COAPCheckpointCallback: whole state saved
    ddp = r["trainer_ddp_owner"]
    assert ddp["layout"] == "ddp_owner" and ddp["saved_params"] == ddp["params"], ddp
    assert ddp["resumed_equal"], ddp
    assert ddp["saved_params_by_strategy"] == {"epoch": ddp["params"], "best": ddp["params"]}, ddp
