"""Per-tensor telemetry: which leaf blew up, kept in the state at no extra pass over memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import adaptx


def params():
    return {
        "encoder": {"layers_0": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)}},
        "head": {"kernel": jnp.ones((3, 2))},
    }


def grads(step, spike_in=None, factor=1e4):
    g = jax.tree.map(lambda p: 0.01 * (1 + 0.1 * np.sin(step)) * jnp.ones_like(p), params())
    if spike_in is not None:
        g["encoder"]["layers_0"][spike_in] = g["encoder"]["layers_0"][spike_in] * factor
    return g


TRANSFORMS = {
    "clip_spikes": lambda: adaptx.clip_spikes(per_tensor=True),
    "zclip": lambda: adaptx.zclip(per_tensor=True),
    "autoclip": lambda: adaptx.autoclip(per_tensor=True),
    "adagc": lambda: adaptx.adagc(warmup_steps=5, per_tensor=True),
    "guard": lambda: adaptx.guard(adaptx.adamw(1e-3), spike_z=6.0, per_tensor=True),
}

PATHS = ["encoder/layers_0/bias", "encoder/layers_0/kernel", "head/kernel"]


def run(tx, steps=40, spike_at=35, spike_in="kernel"):
    state = tx.init(params())
    update = jax.jit(tx.update)
    for t in range(steps):
        g = grads(t, spike_in if t == spike_at else None)
        _, state = update(g, state, params())
    return state, g


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_each_leaf_norm_is_reported_under_its_path(name):
    state, g = run(TRANSFORMS[name](), steps=36)
    figures = adaptx.telemetry(state, per_tensor=True)
    for path in PATHS:
        leaf = g
        for part in path.split("/"):
            leaf = leaf[part]
        got = figures[f"{name}/tensor_grad_norm/{path}"]
        np.testing.assert_allclose(got, np.linalg.norm(np.asarray(leaf)), rtol=1e-5)


# The figure that is 0 on a step where the transform did not intervene.
INTERVENED = {
    "clip_spikes": "clip_spikes/spike",
    "zclip": "zclip/spike",
    "guard": "guard/last_reason",
    "adagc": "adagc/tensors_clipped",
}


@pytest.mark.parametrize("name", sorted(INTERVENED))
def test_the_leaf_that_led_the_intervention_is_named(name):
    # The spike is in the bias, whose norm on a healthy step is below the kernel's (the
    # largest), and one healthy step follows it: naming the largest leaf of a healthy step,
    # or the largest leaf of the last step rather than of the last intervention, names the
    # kernel.
    healthy = grads(0)["encoder"]["layers_0"]
    assert np.linalg.norm(healthy["bias"]) < np.linalg.norm(healthy["kernel"])
    state, _ = run(TRANSFORMS[name](), steps=37, spike_at=35, spike_in="bias")
    figures = adaptx.telemetry(state, per_tensor=True)
    assert int(figures[INTERVENED[name]]) == 0  # the last step was a healthy one
    assert int(figures[f"{name}/top_tensor"]) == PATHS.index("encoder/layers_0/bias")


def test_without_per_tensor_the_telemetry_is_unchanged():
    plain, _ = run(adaptx.robust_adamw(1e-3))
    with_figures, _ = run(adaptx.robust_adamw(1e-3, per_tensor=True))
    a, b = adaptx.telemetry(plain), adaptx.telemetry(with_figures)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, err_msg=k)
    assert adaptx.telemetry(plain, per_tensor=True).keys() == adaptx.telemetry(plain).keys()
    per_leaf = [k for k in adaptx.telemetry(with_figures) if "/tensor_" in k or "top_tensor" in k]
    assert not per_leaf


def test_the_recipe_reports_norms_update_rms_and_leaders():
    state, _ = run(adaptx.robust_adamw(1e-3, per_tensor=True))
    figures = adaptx.telemetry(state, per_tensor=True)
    for prefix in ("clip_spikes/tensor_grad_norm", "guard/tensor_grad_norm"):
        assert [k for k in figures if k.startswith(prefix)] == [f"{prefix}/{p}" for p in PATHS]
    assert {f"scale_by_adam/tensor_update_rms/{p}" for p in PATHS} <= figures.keys()
    assert int(figures["clip_spikes/top_tensor"]) == PATHS.index("encoder/layers_0/kernel")


def test_a_nonfinite_leaf_leads_the_guards_skip():
    tx = adaptx.guard(adaptx.adamw(1e-3), per_tensor=True)
    state = tx.init(params())
    g = grads(0)
    g["head"]["kernel"] = g["head"]["kernel"].at[0, 0].set(jnp.nan)
    _, state = jax.jit(tx.update)(g, state, params())
    figures = adaptx.telemetry(state, per_tensor=True)
    assert int(figures["guard/last_reason"]) == 1
    assert int(figures["guard/top_tensor"]) == PATHS.index("head/kernel")


def test_update_rms_per_tensor_packed_matches_unpacked():
    def figures(pack):
        tx = adaptx.scale_by_adam(update_rms_clip=1.0, per_tensor=True, pack_small_leaves=pack)
        state, _ = run(tx)
        return adaptx.telemetry(state, per_tensor=True)

    plain, packed = figures(None), figures(16)
    assert plain.keys() == packed.keys()
    for k in plain:
        np.testing.assert_allclose(plain[k], packed[k], rtol=1e-5)


def test_update_rms_figures_need_update_clipping():
    with pytest.raises(ValueError, match="per_tensor=True keeps each tensor's update RMS"):
        adaptx.scale_by_adam(per_tensor=True)


class Model(nnx.Module):
    def __init__(self, rngs):
        self.encoder = nnx.Linear(4, 3, rngs=rngs)
        self.head = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(jax.nn.relu(self.encoder(x)))


def test_works_in_an_nnx_optimizer_inside_and_outside_jit():
    model = Model(nnx.Rngs(0))
    opt = nnx.Optimizer(model, adaptx.robust_adamw(1e-3, per_tensor=True), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x):
        loss, g = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
        opt.update(model, g)
        return adaptx.telemetry(opt, per_tensor=True)

    inside = step(model, opt, jnp.ones((8, 4)))
    outside = adaptx.telemetry(opt, per_tensor=True)
    assert "clip_spikes/tensor_grad_norm/encoder/kernel" in inside
    assert "guard/tensor_grad_norm/head/bias" in outside
    for k in inside:
        np.testing.assert_allclose(inside[k], outside[k])


@pytest.mark.perf
def test_no_extra_pass_over_memory():
    # The per-leaf norms are the global norm's own partial sums: the compiled step
    # touches full-size arrays exactly as often with the figures as without.
    from bench.stability.probes import full_size_passes

    plain = full_size_passes(adaptx.robust_adamw(1e-3), n=1 << 20)
    figures = full_size_passes(adaptx.robust_adamw(1e-3, per_tensor=True), n=1 << 20)
    assert figures == plain


@pytest.mark.perf
def test_no_extra_pass_on_a_tree_of_many_small_leaves():
    # Small leaves are concatenated once, as the global norm and a packed Adam already do;
    # their per-leaf sums are that buffer's rows, reduced in the same kernel.
    from bench.paired import compiled_step, passes

    tree = {f"b{i:02d}": jnp.zeros(512) for i in range(40)}
    grads = jax.tree.map(lambda x: x + 1e-3, tree)

    def bytes_moved(**kw):
        tx = adaptx.robust_adamw(1e-3, pack_small_leaves=65536, **kw)
        compiled, _, _ = compiled_step(tx, tree, grads)
        return passes(compiled.as_text(), jax.tree.map(np.asarray, tree))

    assert bytes_moved(per_tensor=True) == pytest.approx(bytes_moved(), abs=0.2)


def _records(tx, grads_at, params_, steps=40):
    """What a training loop would log: one dict of floats per step, per-tensor keys included."""
    state = tx.init(params_)
    update = jax.jit(tx.update)
    out = []
    for t in range(steps):
        g = grads_at(t)
        _, state = update(g, state, params_)
        figures = adaptx.telemetry(state, per_tensor=True)
        norm = float(np.sqrt(sum(float(jnp.sum(x**2)) for x in jax.tree.leaves(g))))
        out.append(
            {"step": t, "loss": 1.0, "grad_norm": norm} | {k: float(v) for k, v in figures.items()}
        )
    return out, figures


def test_a_spike_in_one_nested_leaf_is_attributed_to_it_by_telemetry_and_report():
    from adaptx import report

    records, figures = _records(
        adaptx.robust_adamw(1e-3, per_tensor=True),
        lambda t: grads(t, "kernel" if t == 35 else None),
        params(),
    )
    keys = [k for k in figures if k.startswith("clip_spikes/tensor_grad_norm/")]
    assert keys[int(figures["clip_spikes/top_tensor"])].endswith("encoder/layers_0/kernel")
    events = [e for e in report.summarize(records) if e.step == 35]
    assert events and events[0].tensor == "encoder/layers_0/kernel"
    assert events[0].share > 0.99


def test_a_spike_in_one_layer_of_an_nnx_model_is_attributed_to_it():
    from adaptx import report

    model = Model(nnx.Rngs(0))
    opt = nnx.Optimizer(model, adaptx.robust_adamw(1e-3, per_tensor=True), wrt=nnx.Param)
    x = jnp.ones((8, 4))
    records = []
    for t in range(40):
        g = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
        if t == 35:
            g = jax.tree_util.tree_map_with_path(_spike_head_kernel, g)
        opt.update(model, g)
        figures = adaptx.telemetry(opt, per_tensor=True)
        records.append({"step": t, "loss": 1.0} | {k: float(v) for k, v in figures.items()})
    keys = [k for k in figures if k.startswith("clip_spikes/tensor_grad_norm/")]
    assert (
        keys[int(figures["clip_spikes/top_tensor"])] == "clip_spikes/tensor_grad_norm/head/kernel"
    )
    events = [e for e in report.summarize(records) if e.step == 35]
    assert events and events[0].tensor == "head/kernel"


def _spike_head_kernel(path, v):
    return v * 1e4 if "'head'" in str(path) and "kernel" in str(path) else v
