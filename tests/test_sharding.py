"""Sharded and multi-device training: every transform gives the single-device answer.

The contract, for every transform in the battery (``test_battery.CASES``):

* Under ``jax.jit`` on a mesh of 8 devices, data-parallel (parameters and state
  replicated, gradients from a batch sharded over ``"data"``), tensor-parallel
  (parameters sharded over ``"model"``) and with explicit sharding
  (``jax.set_mesh``), 4 steps of ``update`` + ``apply_updates`` give the
  single-device parameters, state and telemetry within float32 rounding.
* The state keeps the parameters' sharding: every state array that mirrors a
  parameter (Adam's moments, momentum buffers, ...) has that parameter's sharding
  when ``init`` makes it and when the jitted step returns it, with no
  ``out_shardings`` given; nothing is gathered onto one device. The step compiles
  once.
* Under ``jax.shard_map`` and ``jax.pmap``, the transforms that reduce over the
  whole tree (global norm, zclip/autoclip/adagc statistics, guard's skip decision)
  take ``axis_name=`` and then equal the single-device result; without it each
  shard would clip or skip by its local norm, and the checks confirm that this
  gives a different answer.

JAX fixes its device count at start-up, so the checks run in one subprocess with
``--xla_force_host_platform_device_count=8`` (``tests/sharded_checks.py``); each
check is reported here as its own test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
import sharded_checks as checks

HERE = Path(__file__).resolve().parent
battery = checks.load_battery()
CASES = sorted(battery.CASES)
IDS = checks.check_ids(CASES)

# Only to shorten compilation: the sharded and single-device programs are compiled
# with the same flags, so the comparison is unaffected.
XLA_FLAGS = (
    f"--xla_force_host_platform_device_count={checks.N_DEVICES} "
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)


def _run_checks(out: Path) -> None:
    env = dict(os.environ, XLA_FLAGS=XLA_FLAGS, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(HERE / "sharded_checks.py"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0 or not out.exists():
        out.write_text(json.dumps({"__error__": proc.stderr[-6000:] or proc.stdout[-6000:]}))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """The subprocess's results, run once per test session.

    Under pytest-xdist the items of this module may land on several workers; they
    share one results file, and the first worker to get here runs the checks while
    the others wait on the lock.
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    out = root / "sharded_checks.json"
    with open(root / "sharded_checks.lock", "w") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # no POSIX locks: each worker runs its own copy
            pass
        if not out.exists():
            _run_checks(out)
    data = json.loads(out.read_text())
    assert "__error__" not in data, "the 8-device subprocess failed:\n" + data["__error__"]
    return data


def _result(results, cid):
    r = results[cid]
    if r["ok"] is None:
        pytest.skip(r["detail"])
    assert r["ok"], f"{cid} failed:\n{r['detail']}"
    return r["info"]


def _mirrors_per_parameter(name: str) -> float:
    """How many state arrays per parameter mirror it, from a single-device ``init``."""
    params = battery.params_tree()
    state = battery.make(name).init(params)
    return len(checks._mirrors(state, params)) / len(jax.tree.leaves(params))


def _expected_mirrors(name: str, n_params: int) -> float:
    """State arrays mirroring a parameter in the sharded runs.

    A packed Adam (``pack_small_leaves=8``) keeps the moments of a small *replicated*
    leaf in its flat buffers; of the model's parameters only ``out.bias`` (8 elements,
    replicated) is one, the sharded small ones keep their own moments (two each).
    """
    if name.endswith("_packed"):
        return 2 * (n_params - 1)
    return _mirrors_per_parameter(name) * n_params


def test_the_subprocess_ran_every_check(results):
    assert sorted(results) == sorted(IDS)


@pytest.mark.parametrize("name", CASES)
def test_jit_data_parallel_matches_one_device(results, name):
    """Replicated params and state, batch sharded over ``"data"``: single-device numbers."""
    info = _result(results, f"jit_dp/{name}")
    assert info["tolerance_used"] <= 1.0


@pytest.mark.parametrize("name", CASES)
def test_jit_tensor_parallel_matches_one_device_and_keeps_the_sharding(results, name):
    """Params sharded over ``"model"``: single-device numbers, state sharded like the params.

    Every state array that mirrors a parameter was checked (as many per parameter
    as a single-device ``init`` makes), so a transform cannot pass by having its
    state go unnoticed.
    """
    info = _result(results, f"jit_tp/{name}")
    assert info["tolerance_used"] <= 1.0
    n_params = 5  # leaves of the sharded model in sharded_checks._model
    assert info["mirror_leaves_checked"] == _expected_mirrors(name, n_params)


@pytest.mark.parametrize("name", CASES)
def test_jit_explicit_sharding_init_and_step_keep_the_sharding(results, name):
    """Explicit axes (``jax.set_mesh``): ``jax.jit(tx.init)`` and the step keep the sharding."""
    info = _result(results, f"jit_explicit/{name}")
    assert info["tolerance_used"] <= 1.0
    assert info["mirror_leaves_checked"] == _expected_mirrors(name, 5)


def test_guard_skips_the_whole_step_when_one_shard_has_a_nan(results):
    """A NaN on one device of a sharded kernel: every shard gets zero updates, state unchanged."""
    _result(results, "jit_tp/guard_skips_nan_in_one_shard")


def test_accumulate_drops_a_micro_batch_with_a_nan_in_one_shard(results):
    """A NaN on one device in one micro-batch: every shard drops it, single-device numbers,
    and the gradient sum keeps the parameters' sharding."""
    info = _result(results, "jit_tp/accumulate_drops_nan_in_one_shard")
    assert info["tolerance_used"] <= 1.0


def test_the_writer_fetches_figures_that_live_on_the_mesh(results):
    """Figures of a tensor-parallel step, a single-device count and host numbers, in one
    writer: the log holds what fetching each figure alone gives."""
    assert _result(results, "jit_tp/writer_fetches_mesh_figures")["figures"] > 0


@pytest.mark.parametrize("name", checks.SHARD_MAP_CHECKS)
def test_shard_map_with_axis_name_reduces_across_devices(results, name):
    """With ``axis_name`` the decision is the global one; without it, each shard's own."""
    info = _result(results, f"shard_map/{name}")
    assert info["tolerance_used"] <= 1.0
    for key, value in info["global"].items():
        assert info["with_axis_name"][key] == pytest.approx(value, rel=1e-5), key
    assert info["without_axis_name_shard0"] != pytest.approx(info["global"], rel=1e-3)


@pytest.mark.parametrize("name", checks.PMAP_CHECKS)
def test_pmap_with_axis_name_reduces_across_devices(results, name):
    """The same under ``jax.pmap`` (skipped where JAX no longer has it)."""
    info = _result(results, f"pmap/{name}")
    assert info["pmap"] == pytest.approx(info["global"], rel=1e-5)
