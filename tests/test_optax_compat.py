"""Drop-in compatibility with optax wherever adaptx reuses an optax name.

Code written against optax 0.2.8 runs unchanged with adaptx swapped in:

* every function both libraries export takes optax's positional parameters, in optax's
  order, with optax's defaults, except the defaults adaptx keeps on purpose
  (:data:`DEFAULT_DIFFERENCES`, the rows of README.md's "Differences from optax" table);
  adaptx's own options come after them, keyword-only;
* an optax-style call, positional arguments included, gives optax's numbers;
* complex parameters are handled as optax handles them (norms and second moments from
  :math:`|z|^2`, first moments complex), and a transform with no complex form raises a
  ``TypeError`` saying "complex" and naming itself;
* the namesakes of optax's stateless transforms take a ``None`` state and return it.
"""

import inspect
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaptx

#: Names optax also has for something else: not drop-ins, and documented as such.
HOMONYMS = {
    "monitor": "optax.monitor logs measures of the updates; adaptx.monitor wraps an "
    "optimizer and keeps the parameter and update norms in its state",
    "MonitorState": "the state of adaptx.monitor (see above)",
}
_BOTH = set(adaptx.__all__) & set(dir(optax)) - set(HOMONYMS)
SHARED = sorted(n for n in _BOTH if n[0].islower())
SHARED_STATES = sorted(n for n in _BOTH if n[0].isupper())

#: The arguments each shared factory needs (optax's required ones).
REQUIRED = {
    "adamw": (1e-2,),
    "sgd": (0.1,),
    "ema": (0.9,),
    "clip_by_global_norm": (0.7,),
    "clip_by_block_rms": (0.4,),
    "adaptive_grad_clip": (0.05,),
    "scale_by_adam": (),
    "scale_by_rms": (),
    "scale_by_learning_rate": (1e-2,),
    # adaptx.chain is optax.chain (plus the skip protocol and the fused clip)
    "chain": (adaptx.clip_by_global_norm(0.7), adaptx.scale_by_adam(), optax.scale(-1e-2)),
}

ABSENT = "no such parameter"

#: (name, parameter) -> (optax's default, adaptx's default, the setting that gives optax's
#: behaviour, why adaptx keeps its own). The rows of README.md's "Differences from optax".
DEFAULT_DIFFERENCES = {
    ("adamw", "max_norm"): (
        ABSENT,
        1.0,
        {"max_norm": None},
        "adaptx's recipe is clip + AdamW: the global norm is clipped to 1 before Adam",
    ),
    ("sgd", "momentum"): (
        None,
        0.9,
        {"momentum": None},
        "adaptx's recipe is SGD with heavy-ball momentum",
    ),
    ("sgd", "max_norm"): (
        ABSENT,
        1.0,
        {"max_norm": None},
        "adaptx's recipe is clip + SGD: the global norm is clipped to 1",
    ),
}

#: State classes whose fields do not start with optax's, and why.
STATE_DIFFERENCES = {
    "ScaleByRmsState": "adaptx always counts steps (count, nu); optax's is (nu) without "
    "bias correction and another class with it",
    "ClipByGlobalNormState": "adaptx keeps the pre-clip norm and the scale for telemetry; "
    "optax's is EmptyState",
}

POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _params(fn):
    return inspect.signature(fn).parameters


def _positional(fn):
    return [(p.name, p.default) for p in _params(fn).values() if p.kind in POSITIONAL]


def _same_default(a, b):
    return a is b or (type(a) is type(b) and a == b)


# ---------------------------------------------------------------------------------------
# Signatures.


def test_the_shared_names_are_the_ones_this_file_covers():
    """A new name shared with optax must get a row here (and pass every test below)."""
    assert set(SHARED) == set(REQUIRED)
    assert set(SHARED_STATES) == {
        "ClipByGlobalNormState",
        "EmaState",
        "ScaleByAdamState",
        "ScaleByRmsState",
    }


@pytest.mark.parametrize("name", SHARED)
def test_positional_parameters_are_optaxs_in_optaxs_order_with_optaxs_defaults(name):
    ours, theirs = _positional(getattr(adaptx, name)), _positional(getattr(optax, name))
    assert [p for p, _ in ours] == [p for p, _ in theirs]
    for (param, d_ours), (_, d_theirs) in zip(ours, theirs, strict=True):
        if (name, param) in DEFAULT_DIFFERENCES:
            optax_default, adaptx_default, _, _ = DEFAULT_DIFFERENCES[(name, param)]
            assert _same_default(d_theirs, optax_default), (name, param)
            assert _same_default(d_ours, adaptx_default), (name, param)
        else:
            assert _same_default(d_ours, d_theirs), (name, param, d_ours, d_theirs)


@pytest.mark.parametrize("name", SHARED)
def test_optaxs_keyword_only_parameters_are_accepted_with_optaxs_defaults(name):
    ours = _params(getattr(adaptx, name))
    for param in _params(getattr(optax, name)).values():
        if param.kind is inspect.Parameter.KEYWORD_ONLY:
            assert param.name in ours, (name, param.name)
            assert ours[param.name].kind is not inspect.Parameter.POSITIONAL_ONLY
            assert _same_default(ours[param.name].default, param.default), (name, param.name)


@pytest.mark.parametrize("name", SHARED)
def test_adaptxs_own_options_are_keyword_only(name):
    theirs = _params(getattr(optax, name))
    for param in _params(getattr(adaptx, name)).values():
        if param.name not in theirs:
            assert param.kind is inspect.Parameter.KEYWORD_ONLY, (name, param.name)


def test_each_default_difference_is_real():
    for (name, param), (optax_default, adaptx_default, _, _) in DEFAULT_DIFFERENCES.items():
        ours, theirs = _params(getattr(adaptx, name)), _params(getattr(optax, name))
        assert _same_default(ours[param].default, adaptx_default), (name, param)
        if optax_default is ABSENT:
            assert param not in theirs, (name, param)
        else:
            assert _same_default(theirs[param].default, optax_default), (name, param)
        assert not _same_default(optax_default, adaptx_default)


def _readme_rows():
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    section = text.split("### Differences from optax", 1)[1].split("\n### ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name = cells[0].strip("`")
        param = re.match(r"`(\w+)`", cells[1]).group(1)
        rows[(name, param)] = (cells[2], re.match(r"`([^`]+)`", cells[3]).group(1), cells[4])
    return rows


def test_the_readme_table_lists_exactly_these_differences():
    rows = _readme_rows()
    assert set(rows) == set(DEFAULT_DIFFERENCES)
    for key, (optax_cell, adaptx_default, how) in rows.items():
        optax_default, ours, undo, _ = DEFAULT_DIFFERENCES[key]
        assert adaptx_default == repr(ours), key
        if optax_default is ABSENT:
            assert optax_cell.startswith(ABSENT), key
        else:
            assert optax_cell.startswith(f"`{optax_default!r}`"), key
        assert how == " ".join(f"`{k}={v!r}`" for k, v in undo.items()), key


@pytest.mark.parametrize("name", SHARED_STATES)
def test_states_have_optaxs_fields_by_name(name):
    ours, theirs = getattr(adaptx, name), getattr(optax, name)
    assert set(theirs._fields) <= set(ours._fields)  # read by name: always works
    n = len(theirs._fields)
    # Built positionally the optax way: works unless listed (with why) in STATE_DIFFERENCES.
    positional = ours._fields[:n] == theirs._fields and set(ours._fields[n:]) <= set(
        ours._field_defaults
    )
    assert positional == (name not in STATE_DIFFERENCES)


# ---------------------------------------------------------------------------------------
# Numbers.


def real_tree(key):
    k = jax.random.split(key, 4)
    return {
        "kernel": jax.random.normal(k[0], (6, 5)),
        "bias": 0.1 * jax.random.normal(k[1], (5,)),
        "conv": jax.random.normal(k[2], (3, 3, 2, 4)),
        "head": {"w": 2.0 * jax.random.normal(k[3], (5, 2))},
    }


def complex_tree(key):
    """Complex leaves of each rank the clips treat differently, and one real leaf."""
    k = jax.random.split(key, 7)

    def c(a, b, shape):
        return jax.lax.complex(jax.random.normal(a, shape), jax.random.normal(b, shape))

    return {
        "kernel": c(k[0], k[1], (6, 5)),
        "bias": c(k[2], k[3], (5,)),
        "conv": c(k[4], k[5], (2, 2, 3, 4)),
        "real": jax.random.normal(k[6], (4, 3)),
    }


def assert_same_steps(ours, theirs, make_tree, steps=6, scale=3.0):
    """``ours`` (jitted, strict dtype promotion) and ``theirs`` give the same updates."""
    params = make_tree(jax.random.key(0))
    s_ours, s_theirs = ours.init(params), theirs.init(params)
    p_ours = p_theirs = params
    update = jax.jit(ours.update)
    for t in range(steps):
        grads = jax.tree.map(lambda x: scale * x, make_tree(jax.random.key(t + 1)))
        u_ours, s_ours = update(grads, s_ours, p_ours)
        with jax.numpy_dtype_promotion("standard"):  # optax's own code is not strict-clean
            u_theirs, s_theirs = theirs.update(grads, s_theirs, p_theirs)
            p_theirs = optax.apply_updates(p_theirs, u_theirs)
        for a, b in zip(jax.tree.leaves(u_ours), jax.tree.leaves(u_theirs), strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"step {t}")
        p_ours = optax.apply_updates(p_ours, u_ours)
    return s_ours, s_theirs


@pytest.mark.parametrize("name", SHARED)
def test_optax_defaults_give_optax_numbers_once_the_differences_are_undone(name):
    """``adaptx.X(required)`` with the table's settings is ``optax.X(required)``."""
    undo = {}
    for (n, _), (_, _, setting, _) in DEFAULT_DIFFERENCES.items():
        if n == name:
            undo |= setting
    ours = getattr(adaptx, name)(*REQUIRED[name], **undo)
    assert_same_steps(ours, getattr(optax, name)(*REQUIRED[name]), real_tree)


def _mask(params):
    return jax.tree.map(lambda x: x.ndim > 1, params)


# "name[/variant]" -> (adaptx transform, optax transform), both called optax's way.
POSITIONAL_CALLS = {
    "adamw": (
        adaptx.adamw(1e-3, 0.9, 0.999, 1e-8, 0.0, None, 1e-4, None, max_norm=None),
        optax.adamw(1e-3, 0.9, 0.999, 1e-8, 0.0, None, 1e-4, None),
    ),
    "adamw/eps_root,mu_dtype,weight_decay,mask": (
        adaptx.adamw(1e-2, 0.8, 0.95, 1e-6, 1e-2, jnp.float32, 0.1, _mask, max_norm=None),
        optax.adamw(1e-2, 0.8, 0.95, 1e-6, 1e-2, jnp.float32, 0.1, _mask),
    ),
    "adamw/nesterov,weight_decay_schedule": (
        adaptx.adamw(
            1e-2,
            0.9,
            0.99,
            1e-8,
            0.0,
            None,
            optax.linear_schedule(0.1, 0.0, 5),
            nesterov=True,
            max_norm=None,
        ),
        optax.adamw(
            1e-2, 0.9, 0.99, 1e-8, 0.0, None, optax.linear_schedule(0.1, 0.0, 5), nesterov=True
        ),
    ),
    "scale_by_adam": (
        adaptx.scale_by_adam(0.8, 0.95, 1e-6, 1e-2, jnp.float32),
        optax.scale_by_adam(0.8, 0.95, 1e-6, 1e-2, jnp.float32),
    ),
    "sgd": (
        adaptx.sgd(0.1, 0.9, True, jnp.float32, max_norm=None),
        optax.sgd(0.1, 0.9, True, jnp.float32),
    ),
    "ema": (adaptx.ema(0.9, False, jnp.float32), optax.ema(0.9, False, jnp.float32)),
    "chain": (adaptx.chain(*REQUIRED["chain"]), optax.chain(*REQUIRED["chain"])),
    "scale_by_learning_rate": (
        adaptx.scale_by_learning_rate(optax.linear_schedule(0.1, 0.0, 5), flip_sign=False),
        optax.scale_by_learning_rate(optax.linear_schedule(0.1, 0.0, 5), flip_sign=False),
    ),
    "scale_by_rms": (
        adaptx.scale_by_rms(0.95, 1e-6, 0.1, False, True),
        optax.scale_by_rms(0.95, 1e-6, 0.1, False, True),
    ),
    "clip_by_global_norm": (adaptx.clip_by_global_norm(0.7), optax.clip_by_global_norm(0.7)),
    "clip_by_block_rms": (adaptx.clip_by_block_rms(0.4), optax.clip_by_block_rms(0.4)),
    "adaptive_grad_clip": (
        adaptx.adaptive_grad_clip(0.05, 1e-2, -1),
        optax.adaptive_grad_clip(0.05, 1e-2, -1),
    ),
}


@pytest.mark.parametrize("case", sorted(POSITIONAL_CALLS))
def test_optax_style_positional_calls_give_optaxs_numbers(case):
    assert_same_steps(*POSITIONAL_CALLS[case], real_tree)


def test_every_shared_name_is_called_positionally():
    assert set(SHARED) <= {case.split("/")[0] for case in POSITIONAL_CALLS}


def test_positional_dtypes_reach_the_state_where_optaxs_do():
    params = {"w": jnp.ones((3,))}
    bf16 = jnp.bfloat16
    cases = [  # (adaptx state's accumulator, optax state's accumulator)
        (
            adaptx.adamw(1e-3, 0.9, 0.999, 1e-8, 0.0, bf16).init(params)[1].mu,
            optax.adamw(1e-3, 0.9, 0.999, 1e-8, 0.0, bf16).init(params)[0].mu,
        ),
        (
            adaptx.scale_by_adam(0.9, 0.999, 1e-8, 0.0, bf16).init(params).mu,
            optax.scale_by_adam(0.9, 0.999, 1e-8, 0.0, bf16).init(params).mu,
        ),
        (
            adaptx.sgd(0.1, 0.9, False, bf16).init(params)[1].trace,
            optax.sgd(0.1, 0.9, False, bf16).init(params)[0].trace,
        ),
        (adaptx.ema(0.9, True, bf16).init(params).ema, optax.ema(0.9, True, bf16).init(params).ema),
    ]
    for ours, theirs in cases:
        assert ours["w"].dtype == theirs["w"].dtype == bf16


def test_new_parameters_are_validated():
    with pytest.raises(ValueError, match=r"adamw: `eps_root`.*eps_root=-1"):
        adaptx.adamw(1e-3, eps_root=-1.0)
    with pytest.raises(ValueError, match=r"sgd: `accumulator_dtype`"):
        adaptx.sgd(0.1, accumulator_dtype=jnp.int8)
    with pytest.raises(ValueError, match=r"ema: `accumulator_dtype`"):
        adaptx.ema(0.9, accumulator_dtype=jnp.int8)


# ---------------------------------------------------------------------------------------
# Complex parameters.

# id -> (adaptx transform, optax transform with the same math)
COMPLEX_PAIRS = {
    "clip_by_global_norm": (adaptx.clip_by_global_norm(0.7), optax.clip_by_global_norm(0.7)),
    "clip_by_block_rms": (adaptx.clip_by_block_rms(0.4), optax.clip_by_block_rms(0.4)),
    "adaptive_grad_clip": (adaptx.adaptive_grad_clip(0.05), optax.adaptive_grad_clip(0.05)),
    "scale_by_adam": (adaptx.scale_by_adam(), optax.scale_by_adam()),
    "scale_by_adam_settings": (
        adaptx.scale_by_adam(0.8, 0.95, 1e-6, 1e-2),
        optax.scale_by_adam(0.8, 0.95, 1e-6, 1e-2),
    ),
    "scale_by_adam_nesterov": (
        adaptx.scale_by_adam(nesterov=True),
        optax.scale_by_adam(nesterov=True),
    ),
    "scale_by_adam_packed": (adaptx.scale_by_adam(pack_small_leaves=64), optax.scale_by_adam()),
    "adamw": (
        adaptx.adamw(1e-2, weight_decay=0.1, max_norm=None),
        optax.adamw(1e-2, weight_decay=0.1),
    ),
    "adamw_clipped": (
        adaptx.adamw(1e-2, weight_decay=0.1),
        optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1)),
    ),
    "sgd": (adaptx.sgd(0.1, max_norm=None), optax.sgd(0.1, 0.9)),
    "sgd_nesterov": (adaptx.sgd(0.1, 0.9, True, max_norm=None), optax.sgd(0.1, 0.9, True)),
    "scale_by_rms": (adaptx.scale_by_rms(), optax.scale_by_rms()),
    "scale_by_rms_debiased": (
        adaptx.scale_by_rms(0.95, 1e-6, 0.1, False, True),
        optax.scale_by_rms(0.95, 1e-6, 0.1, False, True),
    ),
    "ema": (adaptx.ema(0.9), optax.ema(0.9)),
    "scale_by_adagrad": (adaptx.scale_by_adagrad(), optax.scale_by_rss()),
}


@pytest.mark.parametrize("case", sorted(COMPLEX_PAIRS))
def test_complex_parameters_give_optaxs_numbers(case):
    assert_same_steps(*COMPLEX_PAIRS[case], complex_tree)


def test_adams_second_moment_of_a_complex_parameter_is_real_and_optaxs():
    s_ours, s_theirs = assert_same_steps(
        adaptx.scale_by_adam(b2=0.99), optax.scale_by_adam(b2=0.99), complex_tree
    )
    for a, b in zip(jax.tree.leaves(s_ours.mu), jax.tree.leaves(s_theirs.mu), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)
    for a, b in zip(jax.tree.leaves(s_ours.nu), jax.tree.leaves(s_theirs.nu), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(jnp.imag(a), 0.0)
        assert bool(jnp.all(jnp.real(a) > 0))
        np.testing.assert_allclose(a, b, rtol=2e-6)


def test_a_complex_parameter_may_keep_a_real_second_moment():
    """``nu_dtype=jnp.float32`` stores the (real) second moment of a complex parameter as
    real: half the memory, the same updates."""
    s_real, _ = assert_same_steps(
        adaptx.scale_by_adam(nu_dtype=jnp.float32), optax.scale_by_adam(), complex_tree
    )
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s_real.nu))


def _split(tree):
    """Each complex leaf as two real leaves, its real and imaginary parts."""
    out = {}
    for k, x in tree.items():
        if jnp.iscomplexobj(x):
            out[k + "_re"], out[k + "_im"] = jnp.real(x), jnp.imag(x)
        else:
            out[k] = x
    return out


# Transforms that read only the global norm: a complex parameter counts like its two parts.
NORM_READERS = {
    "clip_by_global_norm": lambda: adaptx.clip_by_global_norm(2.0),
    "clip_spikes": lambda: adaptx.clip_spikes(z_thresh=1.0, min_ratio=1.1),
    "zclip": lambda: adaptx.zclip(alpha=0.5, z_thresh=0.5, warmup_steps=2),
    "autoclip": lambda: adaptx.autoclip(percentile=50.0),
    "guard": lambda: adaptx.guard(adaptx.clip_by_global_norm(2.0), spike_z=1.0, spike_warmup=2),
    "dynamic_loss_scale": lambda: adaptx.dynamic_loss_scale(init_scale=4.0),
}


@pytest.mark.parametrize("name", sorted(NORM_READERS))
def test_norm_readers_see_a_complex_parameter_as_its_two_real_parts(name):
    tx = NORM_READERS[name]()
    params = complex_tree(jax.random.key(0))
    s_c, s_r = tx.init(params), tx.init(_split(params))
    update = jax.jit(tx.update)
    for t in range(6):
        size = 4.0 if t == 4 else 1.0  # a spike at step 4
        grads = jax.tree.map(lambda x, c=size: c * x, complex_tree(jax.random.key(t)))
        u_c, s_c = update(grads, s_c, params)
        u_r, s_r = update(_split(grads), s_r, _split(params))
        for k, x in _split(u_c).items():
            np.testing.assert_allclose(x, u_r[k], rtol=1e-5, atol=1e-6, err_msg=f"{k} step {t}")
        tel_c, tel_r = adaptx.telemetry(s_c), adaptx.telemetry(s_r)
        for k in tel_c:
            # a z-score divides by a variance that may still be ~0: a large number whose
            # last digits depend on the order of additions
            rtol = 1e-3 if k.endswith("/z") else 1e-5
            np.testing.assert_allclose(tel_c[k], tel_r[k], rtol=rtol, err_msg=k)


# id -> (transform with no complex form, patterns its error must contain besides "complex")
NO_COMPLEX_FORM = {
    "clip_by_value": (lambda: adaptx.clip_by_value(1.0), ["clip_by_value", "no order"]),
    "spam_spike_clip": (
        lambda: adaptx.scale_by_adam(spike_threshold=5000.0),
        ["scale_by_adam", "SPAM", "spike_threshold"],
    ),
    "spam_reset": (
        lambda: adaptx.scale_by_adam(reset_interval=10),
        ["scale_by_adam", "reset_interval"],
    ),
    "update_rms_clip": (
        lambda: adaptx.scale_by_adam(update_rms_clip=1.0),
        ["scale_by_adam", "update_rms_clip"],
    ),
    "scale_by_adam_atan2": (adaptx.scale_by_adam_atan2, ["scale_by_adam_atan2", "atan2"]),
    "adam_atan2": (lambda: adaptx.adam_atan2(1e-3), ["adam_atan2"]),
    "spam": (lambda: adaptx.spam(1e-3), ["scale_by_adam", "SPAM"]),
    "stable_adamw": (lambda: adaptx.stable_adamw(1e-3), ["scale_by_adam", "update_rms_clip"]),
    "robust_adamw": (lambda: adaptx.robust_adamw(1e-3), ["scale_by_adam", "update_rms_clip"]),
}


def test_adagc_clips_a_complex_tensor_by_the_norm_of_its_moduli():
    # Each tensor's norm is sqrt(sum |z|^2): a complex tensor is clipped like the real
    # tensor of its moduli, and the clip factor (real) keeps every element's phase.
    tx = adaptx.adagc(warmup_steps=0, lambda_rel=1.05)
    z = jnp.array([3 + 4j, 0 - 5j], jnp.complex64)
    state = tx.init({"w": z})
    _, state = tx.update({"w": z}, state)
    u, state = tx.update({"w": 10 * z}, state)
    np.testing.assert_allclose(float(state.grad_norm), 10 * np.sqrt(50.0), rtol=1e-6)
    np.testing.assert_allclose(np.abs(np.asarray(u["w"])), 1.05 * np.array([5.0, 5.0]), rtol=1e-5)
    np.testing.assert_allclose(np.angle(np.asarray(u["w"])), np.angle(np.asarray(z)), rtol=1e-6)


@pytest.mark.parametrize("case", sorted(NO_COMPLEX_FORM))
def test_no_complex_form_raises_saying_complex_and_naming_the_transform(case):
    make, patterns = NO_COMPLEX_FORM[case]
    tx = make()
    params = complex_tree(jax.random.key(0))
    with pytest.raises(TypeError, match=r"leaf \['bias'\] is complex \(complex64\)") as info:
        tx.update(params, tx.init(params), params)
    for pattern in patterns:
        assert re.search(pattern, str(info.value)), (pattern, str(info.value))


def test_real_leaves_still_pass_where_complex_ones_are_refused():
    tx = adaptx.scale_by_adam(update_rms_clip=1.0)
    params = real_tree(jax.random.key(0))
    u, _ = tx.update(params, tx.init(params))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))


# ---------------------------------------------------------------------------------------
# Stateless namesakes.


def _optax_state_is_empty(name):
    params = real_tree(jax.random.key(0))
    return isinstance(getattr(optax, name)(*REQUIRED[name]).init(params), optax.EmptyState)


STATELESS = [n for n in SHARED if _optax_state_is_empty(n)]


def test_the_stateless_namesakes_are_the_clips_and_the_learning_rate():
    assert set(STATELESS) == {
        "clip_by_global_norm",
        "clip_by_block_rms",
        "adaptive_grad_clip",
        "scale_by_learning_rate",
    }


@pytest.mark.parametrize("empty", [None, optax.EmptyState()], ids=["None", "EmptyState"])
@pytest.mark.parametrize("name", STATELESS)
def test_stateless_namesakes_accept_optaxs_empty_state_and_return_it(name, empty):
    tx = getattr(adaptx, name)(*REQUIRED[name])
    params = real_tree(jax.random.key(0))
    grads = jax.tree.map(lambda x: 5.0 * x, real_tree(jax.random.key(1)))
    u_empty, state = jax.jit(tx.update)(grads, empty, params)
    assert state == empty
    u_full, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    with jax.numpy_dtype_promotion("standard"):
        u_optax, _ = getattr(optax, name)(*REQUIRED[name]).update(grads, empty, params)
    for a, b, c in zip(*map(jax.tree.leaves, (u_empty, u_full, u_optax)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)  # two programs: last bits
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)
