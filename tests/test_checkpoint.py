"""Checkpointing: a run saved with orbax and resumed in a new process is bit-identical.

The contract: save the parameters and the optimizer state with
``orbax.checkpoint.StandardCheckpointer`` after step 5 of 10, restore them in a new
Python process (the state's structure comes from ``jax.eval_shape(tx.init, params)``),
run steps 6 to 10 there, and the final parameters, every array of the optimizer state
and every telemetry figure are bitwise equal to those of the same 10 steps run without
interruption. The runs go through a gradient spike (clipped by zclip, so its running
statistics cross the checkpoint) and, under ``guard``, a NaN step after the restore.

The resumed half runs in this same file, as a script:
``python tests/test_checkpoint.py RECIPE CHECKPOINT_DIR OUT.npz``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import adaptx

STEPS, SAVE_AFTER = 10, 5

# recipe -> (optimizer, gradient multiplier per step: a spike, and NaN under guard)
RECIPES = {
    "robust_adamw": (lambda: adaptx.robust_adamw(1e-2), {4: 1e4, 7: np.nan}),
    "adamw_zclip": (
        lambda: optax.chain(adaptx.zclip(warmup_steps=3), adaptx.adamw(1e-2)),
        {4: 1e4, 8: 1e3},
    ),
}


def params0():
    rng = np.random.default_rng(0)
    return {
        "w": jnp.asarray(rng.standard_normal((6, 3)), jnp.float32),
        "b": jnp.zeros((3,), jnp.float32),
    }


def batch(t):
    rng = np.random.default_rng(100 + t)
    x = rng.standard_normal((16, 6)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(x[:, :3] - 0.5 * x[:, 3:], jnp.float32)


def make_step(tx):
    def loss(params, x, y):
        return jnp.mean(jnp.square(x @ params["w"] + params["b"][None] - y))

    @jax.jit
    def step(params, state, x, y, mult):
        grads = jax.tree.map(lambda g: g * mult, jax.grad(loss)(params, x, y))
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def run(recipe, params, state, start, stop, step):
    faults = RECIPES[recipe][1]
    for t in range(start, stop):
        mult = jnp.asarray(faults.get(t, 1.0), jnp.float32)
        params, state = step(params, state, *batch(t), mult)
    return params, state


def final_tree(params, state):
    return {"params": params, "opt_state": state, "telemetry": adaptx.telemetry(state)}


def flat(tree) -> dict[str, np.ndarray]:
    """Leaves by key path, as NumPy arrays."""
    return {
        jax.tree_util.keystr(path): np.asarray(x)
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def resume(recipe: str, checkpoint: str, out: str) -> None:
    """The second half, in a fresh process: restore, run to the end, write the results."""
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    tx = RECIPES[recipe][0]()
    params = params0()
    target = {
        "params": jax.eval_shape(lambda: params),
        "opt_state": jax.eval_shape(tx.init, params),
        "step": jax.ShapeDtypeStruct((), jnp.int32),
    }
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(checkpoint, target)
    start = int(restored["step"])
    params, state = run(
        recipe, restored["params"], restored["opt_state"], start, STEPS, make_step(tx)
    )
    leaves = flat(final_tree(params, state))
    np.savez(out, *leaves.values(), paths=np.array(list(leaves)))


# ---------------------------------------------------------------------------------------
# The tests (pytest imports this file; the block at the end runs it as a script).


def _resume_in_new_process(recipe, checkpoint, out):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, __file__, recipe, str(checkpoint), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    with np.load(out) as data:
        paths = [str(p) for p in data["paths"]]
        return {p: data[f"arr_{i}"] for i, p in enumerate(paths)}


def _bitwise_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _check(recipe, tmp_path):
    tx = RECIPES[recipe][0]()
    step = make_step(tx)
    params = params0()
    uninterrupted = flat(final_tree(*run(recipe, params, tx.init(params), 0, STEPS, step)))

    half_params, half_state = run(recipe, params, tx.init(params), 0, SAVE_AFTER, step)
    checkpoint = tmp_path / "checkpoint"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(
            checkpoint,
            {
                "params": half_params,
                "opt_state": half_state,
                "step": jnp.asarray(SAVE_AFTER, jnp.int32),
            },
        )
        checkpointer.wait_until_finished()

    resumed = _resume_in_new_process(recipe, checkpoint, tmp_path / "resumed.npz")
    assert list(resumed) == list(uninterrupted)
    different = [k for k in uninterrupted if not _bitwise_equal(uninterrupted[k], resumed[k])]
    assert not different, f"not bit-identical after the restore: {different}"

    # The state carried the run: restarting the optimizer at the checkpoint ends elsewhere.
    fresh = flat(final_tree(*run(recipe, half_params, tx.init(params), SAVE_AFTER, STEPS, step)))
    assert any(
        not _bitwise_equal(uninterrupted[k], fresh[k]) for k in uninterrupted if "params" in k
    )
    return uninterrupted


def test_robust_adamw_resumed_in_a_new_process_is_bit_identical(tmp_path):
    """guard(clip_spikes + update-clipped AdamW): the spike before the save and the NaN after it
    are handled the same way whether or not the run was interrupted."""
    result = _check("robust_adamw", tmp_path)
    assert int(result["['telemetry']['guard/skipped']"]) == 1
    assert int(result["['telemetry']['clip_spikes/num_clipped']"]) >= 1


def test_adamw_with_zclip_resumed_in_a_new_process_is_bit_identical(tmp_path):
    """chain(zclip, adamw): zclip's running statistics survive the checkpoint."""
    result = _check("adamw_zclip", tmp_path)
    assert int(result["['telemetry']['zclip/num_clipped']"]) >= 2


if __name__ == "__main__":
    resume(*sys.argv[1:4])
