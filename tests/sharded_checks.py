"""Multi-device checks, run by ``tests/test_sharding.py`` in a subprocess on 8 CPU devices.

JAX fixes its device count when it initialises, so these checks cannot run in the
pytest process (one CPU device). ``test_sharding.py`` starts

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_checks.py OUT.json

which runs every check in :func:`check_ids` and writes ``{id: {"ok", "detail", "info"}}``
to ``OUT.json``; each check then becomes its own test item on the pytest side.

The checks:

* ``jit_dp/<case>``: every transform of the battery (``test_battery.CASES``) under
  ``jax.jit`` on an 8-device mesh, parameters and state replicated, the gradients
  computed from a batch sharded over ``"data"``.
* ``jit_tp/<case>``: the same on a ``("data": 2, "model": 4)`` mesh with the
  parameters sharded over ``"model"`` (Megatron-style column- and row-parallel
  kernels) and the batch over ``"data"``.

  Both give, after 4 steps of ``update`` + ``apply_updates``, the single-device
  parameters, state and telemetry within float32 rounding (integer state exactly);
  the jitted step is given the inputs' shardings only (no ``out_shardings``), and
  the new parameters and every state array that mirrors a parameter come back with
  that parameter's sharding; the step compiles once. The non-parameter state
  (scalars, autoclip's history) is put on the mesh, replicated, after ``init``, as a
  user would: eager ``init`` leaves scalars on one device, and the first step moving
  them onto the mesh would make the second step compile again.
* ``jit_tp/guard_skips_nan_in_one_shard``, ``jit_tp/accumulate_drops_nan_in_one_shard``: a
  NaN on one device of the model-sharded kernel is seen by every shard: the guard skips
  the step, ``accumulate`` drops the micro-batch (single-device numbers, its gradient sum
  sharded like the parameters).
* ``jit_explicit/<case>``: the tensor-parallel mesh with explicit axes under
  ``jax.set_mesh``, where ``jax.jit(tx.init)`` itself gives the state the parameters'
  shardings. (With the default auto axes, ``jax.jit(tx.init)(params)`` without
  ``out_shardings`` puts the whole state on one device, because zeros do not depend
  on the parameters' values; call ``init`` eagerly, or give ``jit`` the shardings.)
* ``shard_map/<transform>``: under ``jax.shard_map`` with the gradient tree sharded
  over an axis, ``axis_name=`` makes every transform that reduces over the tree
  (global norm, zclip, autoclip, adagc statistics, guard's skip decision) equal the
  single-device result; the same transform without ``axis_name`` gives a different
  result, so the check can tell the two apart.
* ``pmap/<transform>``: the same with ``jax.pmap``, while JAX still has it.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
import warnings
from pathlib import Path

N_DEVICES = 8
STEPS = 4
# float32 rounding: sharded reductions sum in a different order than one device.
RTOL, ATOL = 2e-5, 1e-6

SHARD_MAP_CHECKS = (
    "clip_by_global_norm",
    "zclip",
    "clip_spikes",
    "autoclip",
    "adagc",
    "guard_nonfinite",
    "guard_spike",
    "clip_spikes_per_tensor",
    "adagc_per_tensor",
)
PMAP_CHECKS = ("clip_by_global_norm", "guard_nonfinite")


def load_battery():
    """``tests/test_battery.py``, whose ``CASES`` name every transform.

    ``tests/`` is on the path: pytest's ``pythonpath`` setting, or the script's own
    directory when run as a script.
    """
    import test_battery

    return test_battery


def check_ids(case_names) -> list[str]:
    """Every check this script runs, given the battery's case names."""
    ids = [f"jit_dp/{n}" for n in sorted(case_names)]
    ids += [f"jit_tp/{n}" for n in sorted(case_names)]
    ids += ["jit_tp/guard_skips_nan_in_one_shard", "jit_tp/accumulate_drops_nan_in_one_shard"]
    ids += ["jit_tp/writer_fetches_mesh_figures"]
    ids += [f"jit_explicit/{n}" for n in sorted(case_names)]
    ids += [f"shard_map/{n}" for n in SHARD_MAP_CHECKS]
    ids += [f"pmap/{n}" for n in PMAP_CHECKS]
    return ids


# ---------------------------------------------------------------------------------------
# Everything below runs only in the 8-device subprocess.


def main(out_path: str) -> None:
    import jax

    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_numpy_rank_promotion", "raise")
    assert jax.device_count() == N_DEVICES, jax.devices()
    battery = load_battery()
    checks = _jit_checks(battery) | _shard_map_checks() | _pmap_checks()
    ids = check_ids(battery.CASES)
    assert sorted(checks) == sorted(ids), sorted(set(checks) ^ set(ids))
    results = {}
    for cid in ids:
        try:
            start = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                info = checks[cid]() or {}
            info["seconds"] = round(time.perf_counter() - start, 2)
            if caught:
                info["warnings"] = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
            results[cid] = {"ok": True, "detail": "", "info": info}
        except _Skip as e:
            results[cid] = {"ok": None, "detail": str(e), "info": {}}
        except Exception as e:  # noqa: BLE001 - every failure is reported, not raised
            detail = "".join(traceback.format_exception_only(e)).strip()
            if not isinstance(e, AssertionError):
                detail += "\n" + traceback.format_exc()[-3000:]
            results[cid] = {"ok": False, "detail": detail, "info": {}}
    Path(out_path).write_text(json.dumps(results, indent=1, default=str))


class _Skip(Exception):
    """A check that does not apply to this JAX (e.g. ``jax.pmap`` removed)."""


def _np(x):
    import numpy as np

    return np.asarray(x)


def _compare(ref, got, what: str) -> float:
    """Asserts two trees are equal within float32 rounding (integers exactly).

    Returns the largest share of the tolerance used, ``|got - ref| / (ATOL + RTOL |ref|)``:
    0 for bitwise-equal trees, at most 1 when the check passes.
    """
    import jax
    import numpy as np

    worst = 0.0
    ref_leaves = jax.tree_util.tree_flatten_with_path(ref)[0]
    got_leaves = jax.tree.leaves(got)
    assert len(ref_leaves) == len(got_leaves), (what, len(ref_leaves), len(got_leaves))
    for (path, a), b in zip(ref_leaves, got_leaves, strict=True):
        a, b = _np(a), _np(b)
        where = f"{what}{jax.tree_util.keystr(path)}"
        assert a.dtype == b.dtype and a.shape == b.shape, (where, a.dtype, b.dtype)
        if np.issubdtype(a.dtype, np.floating):
            np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL, err_msg=where)
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            used = np.abs(b64 - a64) / (ATOL + RTOL * np.abs(a64))
            worst = max(worst, float(used.max(initial=0.0)))
        else:
            np.testing.assert_array_equal(b, a, err_msg=where)
    return worst


def _spec(sharding) -> str:
    return str(getattr(sharding, "spec", sharding))


def _mirrors(state, params):
    """(path, state leaf, param leaf) for every state array that mirrors a parameter.

    A state leaf mirrors a parameter when its path ends with the parameter's path
    (``[1].mu['dense']['kernel']`` ends with ``['dense']['kernel']``) and it has the
    parameter's shape.
    """
    import jax

    plist = [
        (jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
    ]
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        key = jax.tree_util.keystr(path)
        for pkey, p in plist:
            if key.endswith(pkey) and getattr(leaf, "shape", None) == p.shape and p.ndim > 0:
                out.append((key, leaf, p))
                break
    return out


def _model():
    """A two-layer MLP's parameters and 4 batches, as NumPy-valued float32 jax arrays."""
    import jax
    import jax.numpy as jnp

    ks = jax.random.split(jax.random.key(0), 4)
    params = {
        "dense": {
            "kernel": 0.3 * jax.random.normal(ks[0], (16, 32)),
            "bias": jnp.zeros((32,)),
        },
        "out": {
            "kernel": 0.3 * jax.random.normal(ks[1], (32, 8)),
            "bias": jnp.zeros((8,)),
        },
        "scale": 1.0 + 0.1 * jax.random.normal(ks[2], (32,)),
    }
    batches = []
    for t in range(STEPS):
        kx, ky = jax.random.split(jax.random.fold_in(ks[3], t))
        batches.append((jax.random.normal(kx, (32, 16)), jax.random.normal(ky, (32, 8))))
    return params, batches


def _loss(params, batch):
    import jax.numpy as jnp

    x, y = batch
    dense, out = params["dense"], params["out"]
    h = jnp.tanh(x @ dense["kernel"] + dense["bias"][None]) * params["scale"][None]
    pred = h @ out["kernel"] + out["bias"][None]
    return jnp.mean(jnp.square(pred - y))


def _train(tx, params, batches, grad_fn, place_state=None):
    """Jitted ``update`` + ``apply_updates`` steps, the gradients from ``grad_fn`` per batch.

    Returns the final params, state and telemetry, the gradients of every step,
    the state as ``init`` returned it, and the jitted step.
    """
    import jax
    import optax

    import adaptx

    state0 = tx.init(params)
    state = state0 if place_state is None else place_state(state0)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, adaptx.telemetry(state)

    figures, grads = {}, []
    for batch in batches:
        grads.append(grad_fn(params, batch))
        params, state, figures = step(params, state, grads[-1])
    return params, state, figures, grads, state0, step


def _replay(tx, update, params, grads):
    """The single-device run: ``update`` (jitted ``tx.update``) fed the recorded gradients."""
    import jax
    import numpy as np
    import optax

    import adaptx

    params = jax.tree.map(lambda x: jax.numpy.asarray(np.asarray(x)), params)
    state = tx.init(params)
    for g in grads:
        g = jax.tree.map(lambda x: jax.numpy.asarray(np.asarray(x)), g)
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, state, adaptx.telemetry(state)


def _jit_checks(battery):
    import jax
    import numpy as np
    from jax.sharding import AxisType, Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    Explicit = AxisType.Explicit
    devices = np.array(jax.devices())
    dp_mesh = Mesh(devices, ("data",))
    tp_mesh = Mesh(devices.reshape(2, 4), ("data", "model"))
    tp_specs = {
        "dense": {"kernel": P(None, "model"), "bias": P("model")},  # column-parallel
        "out": {"kernel": P("model"), "bias": P()},  # row-parallel
        "scale": P("model"),
    }
    dp_specs = jax.tree.map(lambda _: P(), tp_specs, is_leaf=lambda x: isinstance(x, P))
    params, batches = _model()
    references = {}
    # One gradient function for all cases: compiled once per mesh, not once per transform.
    grad_fn = jax.jit(jax.grad(_loss))

    def reference(name):
        """One single-device transform and jitted update per case, shared by dp and tp."""
        if name not in references:
            tx = battery.make(name)
            references[name] = (tx, jax.jit(tx.update))
        return references[name]

    def place(mesh, param_specs):
        ps = jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs)
        bs = NamedSharding(mesh, P("data"))
        return jax.device_put(params, ps), [jax.device_put(b, bs) for b in batches]

    def replicate_scalars(mesh, sharded_params):
        """What a user does after ``init``: put the non-parameter state on the mesh.

        Arrays mirroring a parameter already have its sharding (checked below).
        Without this the first step moves the scalars from one device onto the
        mesh and the second step compiles again.
        """

        def place_state(state):
            mirrored = {key for key, _, _ in _mirrors(state, sharded_params)}
            return jax.tree_util.tree_map_with_path(
                lambda path, x: (
                    x
                    if jax.tree_util.keystr(path) in mirrored
                    else jax.device_put(x, NamedSharding(mesh, P()))
                ),
                state,
            )

        return place_state

    def run(name, mesh, param_specs):
        sp, sb = place(mesh, param_specs)
        p, s, f, grads, s0, step = _train(
            battery.make(name), sp, sb, grad_fn, place_state=replicate_scalars(mesh, sp)
        )
        ref_p, ref_s, ref_f = _replay(*reference(name), params, grads)
        gap = max(
            _compare(ref_p, p, "params"), _compare(ref_s, s, "state"), _compare(ref_f, f, "tel")
        )
        # New params, and every state array mirroring a parameter (as init made it and
        # as the jitted step returned it), keep that parameter's sharding.
        wrong = []
        for (path, new), old in zip(
            jax.tree_util.tree_flatten_with_path(p)[0], jax.tree.leaves(sp), strict=True
        ):
            if not new.sharding.is_equivalent_to(old.sharding, new.ndim):
                wrong.append(f"params{jax.tree_util.keystr(path)}: {_spec(new.sharding)}")
        mirrors = _mirrors(s, sp)
        assert len(mirrors) == len(_mirrors(s0, sp))
        for when, found in (("init", _mirrors(s0, sp)), ("step", mirrors)):
            for key, leaf, param in found:
                if not leaf.sharding.is_equivalent_to(param.sharding, leaf.ndim):
                    wrong.append(
                        f"{when}: state{key}: {_spec(leaf.sharding)}, "
                        f"parameter {_spec(param.sharding)}"
                    )
        assert not wrong, "sharding not kept (state gathered?):\n  " + "\n  ".join(wrong)
        mirror_ids = {id(m) for _, m, _ in mirrors}
        others = sorted({_spec(x.sharding) for x in jax.tree.leaves(s) if id(x) not in mirror_ids})
        compiles = step._cache_size()
        assert compiles == 1, f"the step compiled {compiles} times in {STEPS} calls"
        return {
            "tolerance_used": gap,
            "mirror_leaves_checked": len(mirrors),
            "other_state_shardings": others,
        }

    def guard_nan_one_shard():
        import adaptx

        tx = adaptx.guard(adaptx.adamw(1e-2))
        sp, sb = place(tp_mesh, tp_specs)
        state = tx.init(sp)
        g = grad_fn(sp, sb[0])
        # One element on one device of the model-sharded kernel.
        g["dense"]["kernel"] = g["dense"]["kernel"].at[3, 30].set(np.float32(np.nan))
        g = jax.device_put(g, jax.tree.map(lambda x: x.sharding, sp))
        updates, new_state = jax.jit(tx.update)(g, state, sp)
        assert int(new_state.skipped) == 1 and int(new_state.last_reason) == 1
        for u in jax.tree.leaves(updates):
            np.testing.assert_array_equal(_np(u), np.zeros(u.shape, u.dtype))
        for a, b in zip(
            jax.tree.leaves(state.inner_state), jax.tree.leaves(new_state.inner_state), strict=True
        ):
            np.testing.assert_array_equal(_np(a), _np(b))
        return {}

    def run_explicit(name):
        """Explicit sharding: a ``jax.make_mesh`` mesh set with ``jax.set_mesh``.

        Here shardings are part of the types, so ``jax.jit(tx.init)`` itself must
        give the state the parameters' shardings, and every operation inside a
        transform must have an unambiguous output sharding.
        """
        import optax

        mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(Explicit, Explicit))
        rng = np.random.default_rng(1)
        grads = [
            jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), params)
            for _ in range(STEPS)
        ]
        tx = battery.make(name)
        with jax.set_mesh(mesh):
            # Specs written out to the array's rank, as explicit mode returns them (a
            # shorter spec would come back padded and the second call would compile again).
            shardings = jax.tree.map(
                lambda s, x: NamedSharding(mesh, P(*s, *[None] * (x.ndim - len(s)))),
                tp_specs,
                params,
                is_leaf=lambda x: isinstance(x, P),
            )
            p = jax.device_put(params, shardings)
            state = jax.jit(tx.init)(p)
            init_mirrors = _mirrors(state, p)

            @jax.jit
            def step(params, state, grads):
                updates, state = tx.update(grads, state, params)
                return optax.apply_updates(params, updates), state

            for g in grads:
                p, state = step(p, state, jax.device_put(g, shardings))
        ref_p, ref_s, _ = _replay(*reference(name), params, grads)
        gap = max(_compare(ref_p, p, "params"), _compare(ref_s, state, "state"))
        wrong = [
            f"{when}: state{key}: {_spec(leaf.sharding)}, parameter {_spec(param.sharding)}"
            for when, found in (("jit(init)", init_mirrors), ("step", _mirrors(state, p)))
            for key, leaf, param in found
            if not leaf.sharding.is_equivalent_to(param.sharding, leaf.ndim)
        ]
        assert not wrong, "sharding not kept:\n  " + "\n  ".join(wrong)
        assert step._cache_size() == 1, step._cache_size()
        return {"tolerance_used": gap, "mirror_leaves_checked": len(init_mirrors)}

    checks = {}
    for name in battery.CASES:
        checks[f"jit_dp/{name}"] = lambda name=name: run(name, dp_mesh, dp_specs)
        checks[f"jit_tp/{name}"] = lambda name=name: run(name, tp_mesh, tp_specs)
        checks[f"jit_explicit/{name}"] = lambda name=name: run_explicit(name)
    checks["jit_tp/guard_skips_nan_in_one_shard"] = guard_nan_one_shard
    checks["jit_tp/accumulate_drops_nan_in_one_shard"] = lambda: _accumulate_nan_one_shard(
        place(tp_mesh, tp_specs), lambda sp: replicate_scalars(tp_mesh, sp), grad_fn, params
    )
    checks["jit_tp/writer_fetches_mesh_figures"] = lambda: _writer_mesh_figures(
        place(tp_mesh, tp_specs), grad_fn
    )
    return checks


def _writer_mesh_figures(placed, grad_fn):
    """``MetricsWriter`` on figures of a tensor-parallel step (on the mesh), mixed with a
    single-device step count and host numbers: the log holds what fetching each figure
    alone gives."""
    import json
    import tempfile

    import jax
    import jax.numpy as jnp
    import optax

    import adaptx

    tx = adaptx.guard(adaptx.adamw(1e-2), per_tensor=True)
    sp, sb = placed
    state = tx.init(sp)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, adaptx.telemetry(state, per_tensor=True)

    expected, p = [], sp
    with tempfile.TemporaryDirectory() as run:
        with adaptx.MetricsWriter(run, every_steps=2) as writer:
            for t, batch in enumerate(sb[:3]):
                p, state, figures = step(p, state, grad_fn(p, batch))
                row = {**figures, "host": 0.5 * t, "count": jnp.int32(t)}
                expected.append({k: v.item() if hasattr(v, "item") else v for k, v in row.items()})
                writer.write(jnp.int32(t), row)
        with open(f"{run}/metrics.jsonl") as f:
            got = [json.loads(line) for line in f]
    assert [r.pop("step") for r in got] == [0, 1, 2]
    assert got == [{k: (str(v) if v != v else v) for k, v in r.items()} for r in expected]
    meshed = [v for v in figures.values() if len(v.sharding.device_set) > 1]
    assert meshed, "the step's figures should live on the mesh"
    return {"figures": len(figures)}


def _accumulate_nan_one_shard(placed, state_placer, grad_fn, params):
    """A NaN on one device in one micro-batch: dropped from the window on every shard.

    ``placed``: the tensor-parallel parameters and batches; ``state_placer(sp)`` puts the
    non-parameter state on the mesh; ``params``: the unsharded parameters, for the replay.
    """
    import jax
    import numpy as np
    import optax

    import adaptx

    def make():
        return adaptx.accumulate(adaptx.adamw(1e-2), 2)

    tx = make()
    sp, sb = placed
    state = state_placer(sp)(tx.init(sp))
    step = jax.jit(tx.update)
    p, grads = sp, []
    for t, batch in enumerate(sb):
        g = grad_fn(p, batch)
        if t == 1:  # one element on one device of the model-sharded kernel
            g["dense"]["kernel"] = g["dense"]["kernel"].at[3, 30].set(np.float32(np.nan))
            g = jax.device_put(g, jax.tree.map(lambda x: x.sharding, sp))
        grads.append(g)
        updates, state = step(g, state, p)
        p = optax.apply_updates(p, updates)
    assert int(state.dropped) == 1 and int(state.window_finite) == 2
    ref = make()
    ref_p, ref_s, _ = _replay(ref, jax.jit(ref.update), params, grads)
    gap = max(_compare(ref_p, p, "params"), _compare(ref_s, state, "state"))
    for s_leaf, param in zip(jax.tree.leaves(state.grad_sum), jax.tree.leaves(sp), strict=True):
        assert s_leaf.sharding.is_equivalent_to(param.sharding, s_leaf.ndim), _spec(s_leaf)
    assert step._cache_size() == 1, step._cache_size()
    return {"tolerance_used": gap}


def _grad_sequence(spikes=(), nan_at=()):
    """12 gradient trees (leading dims divisible by 8); spikes x50 at ``spikes``.

    At a step in ``nan_at`` one element in the last 8th of ``w`` (the last device's
    shard) is NaN.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    seq = []
    for t in range(12):
        g = {"w": rng.standard_normal((16, 3)), "b": rng.standard_normal((8,))}
        if t in spikes:
            g = {k: 50.0 * v for k, v in g.items()}
        if t in nan_at:
            g["w"][15, 1] = np.nan
        seq.append(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g))
    return seq


def _state_specs(state, params, axis):
    """``P(axis)`` for state arrays that mirror a parameter, ``P()`` for the rest."""
    import jax
    from jax.sharding import PartitionSpec as P

    mirrored = {key for key, _, _ in _mirrors(state, params)}
    return jax.tree_util.tree_map_with_path(
        lambda path, _: P(axis) if jax.tree_util.keystr(path) in mirrored else P(), state
    )


def _shard_map_checks():
    import jax
    import numpy as np
    import optax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import adaptx

    mesh = Mesh(np.array(jax.devices()), ("x",))

    def sharded_run(tx, seq, check_vma=True):
        params = jax.tree.map(np.zeros_like, seq[0])
        state = tx.init(params)
        specs = _state_specs(state, params, "x")
        step = jax.jit(
            jax.shard_map(
                lambda g, s, p: tx.update(g, s, p),
                mesh=mesh,
                in_specs=(P("x"), specs, P("x")),
                out_specs=(P("x"), specs),
                check_vma=check_vma,
            )
        )
        state = jax.device_put(state, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
        p = jax.device_put(params, NamedSharding(mesh, P("x")))
        outs = []
        for g in seq:
            u, state = step(jax.device_put(g, NamedSharding(mesh, P("x"))), state, p)
            outs.append(u)
        return outs, state

    def single_run(tx, seq):
        params = jax.tree.map(np.zeros_like, seq[0])
        state = tx.init(params)
        update = jax.jit(tx.update)
        outs = []
        for g in seq:
            u, state = update(g, state, params)
            outs.append(u)
        return outs, state

    def differs(a, b):
        return any(
            not np.allclose(_np(x), _np(y), rtol=1e-3, atol=1e-6, equal_nan=True)
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        )

    def check(make, seq, figure):
        """``make(axis_name)`` builds the transform; ``figure(state)`` reads its decision."""
        ref_u, ref_s = single_run(make(None), seq)
        got_u, got_s = sharded_run(make("x"), seq)
        gap = max(_compare(ref_u, got_u, "updates"), _compare(ref_s, got_s, "state"))
        # Without axis_name each shard decides on its local norm: another answer.
        local_u, local_s = sharded_run(make(None), seq, check_vma=False)
        assert differs(ref_u, local_u), "without axis_name the result should differ"
        return {
            "tolerance_used": gap,
            "global": figure(ref_s),
            "with_axis_name": figure(got_s),
            "without_axis_name_shard0": figure(local_s),
        }

    def figures(*names):
        return lambda s: {k: float(v) for k, v in adaptx.telemetry(s).items() if k in names}

    plain = _grad_sequence()
    spiky = _grad_sequence(spikes=(7, 10))
    return {
        "shard_map/clip_by_global_norm": lambda: check(
            lambda ax: adaptx.clip_by_global_norm(3.0, axis_name=ax),
            plain,
            figures("clip_by_global_norm/grad_norm", "clip_by_global_norm/scale"),
        ),
        "shard_map/zclip": lambda: check(
            lambda ax: adaptx.zclip(warmup_steps=4, axis_name=ax),
            spiky,
            figures("zclip/grad_norm", "zclip/num_clipped", "zclip/threshold"),
        ),
        "shard_map/clip_spikes": lambda: check(
            lambda ax: adaptx.clip_spikes(axis_name=ax),
            spiky,
            figures("clip_spikes/grad_norm", "clip_spikes/num_clipped", "clip_spikes/threshold"),
        ),
        "shard_map/autoclip": lambda: check(
            lambda ax: adaptx.autoclip(percentile=25.0, history=16, axis_name=ax),
            spiky,
            figures("autoclip/grad_norm", "autoclip/threshold", "autoclip/scale"),
        ),
        "shard_map/adagc": lambda: check(
            lambda ax: adaptx.adagc(lambda_abs=4.0, warmup_steps=3, axis_name=ax),
            spiky,
            figures("adagc/grad_norm", "adagc/tensors_clipped", "adagc/gamma_mean"),
        ),
        "shard_map/guard_nonfinite": lambda: check(
            lambda ax: adaptx.guard(adaptx.sgd(0.1, momentum=0.9, max_norm=None), axis_name=ax),
            _grad_sequence(nan_at=(3, 8)),
            figures("guard/skipped", "guard/grad_norm"),
        ),
        "shard_map/guard_spike": lambda: check(
            lambda ax: adaptx.guard(
                optax.chain(adaptx.momentum(0.9), optax.scale(-0.1)),
                spike_z=3.0,
                spike_warmup=4,
                axis_name=ax,
            ),
            spiky,
            figures("guard/skipped", "guard/norm_mean"),
        ),
        # Each shard holds a slice of every leaf: the per-tensor figures in the state
        # (compared by check) are the whole leaf's, as on one device.
        "shard_map/clip_spikes_per_tensor": lambda: check(
            lambda ax: adaptx.clip_spikes(axis_name=ax, per_tensor=True),
            spiky,
            figures("clip_spikes/grad_norm", "clip_spikes/top_tensor"),
        ),
        "shard_map/adagc_per_tensor": lambda: check(
            lambda ax: adaptx.adagc(lambda_abs=4.0, warmup_steps=3, axis_name=ax, per_tensor=True),
            spiky,
            figures("adagc/grad_norm", "adagc/tensors_clipped"),
        ),
    }


def _pmap_checks():
    import jax
    import numpy as np

    import adaptx

    def pmapped(make, seq, figure):
        if not hasattr(jax, "pmap"):
            raise _Skip("jax.pmap is not available in this JAX")

        def split(g):  # leading axis: one slice per device
            return jax.tree.map(lambda x: x.reshape(N_DEVICES, -1, *x.shape[1:]), g)

        single = make(None)
        mapped = make("i")
        params = jax.tree.map(np.zeros_like, seq[0])
        s1 = single.init(params)
        try:
            step = jax.pmap(
                lambda g, s, p: mapped.update(g, s, p),
                axis_name="i",
                in_axes=(0, None, 0),
                out_axes=(0, None),
            )
        except Exception as e:  # noqa: BLE001 - a removed pmap says so on use
            raise _Skip(f"jax.pmap unavailable: {e}") from e
        s2 = mapped.init(params)
        if jax.tree.leaves(s2) and any(np.ndim(x) > 0 for x in jax.tree.leaves(s2)):
            raise AssertionError("pmap checks use transforms without per-parameter state")
        for g in seq:
            u1, s1 = jax.jit(single.update)(g, s1, params)
            u2, s2 = step(split(g), s2, split(params))
            u2 = jax.tree.map(lambda x, ref: _np(x).reshape(ref.shape), u2, u1)
            _compare(u1, u2, "updates")
            _compare(s1, s2, "state")
        return {"global": figure(s1), "pmap": figure(s2)}

    return {
        "pmap/clip_by_global_norm": lambda: pmapped(
            lambda ax: adaptx.clip_by_global_norm(3.0, axis_name=ax),
            _grad_sequence(),
            lambda s: float(s.grad_norm),
        ),
        "pmap/guard_nonfinite": lambda: pmapped(
            lambda ax: adaptx.guard(adaptx.sgd(0.1, momentum=None, max_norm=None), axis_name=ax),
            _grad_sequence(nan_at=(3, 8)),
            lambda s: int(s.skipped),
        ),
    }


if __name__ == "__main__":
    main(sys.argv[1])
