"""The small measurements behind the recipe's choices and limits, one command each.

python -m bench.stability.probes update-rms   # how often update clipping acts, by threshold
python -m bench.stability.probes decay        # LR-independent weight decay on the LM, seed 0
python -m bench.stability.probes passes       # full-size passes of robust_adamw and its chain
python -m bench.stability.probes spike-response  # the step at a 1e4x spike, and the recovery after
python -m bench.stability.probes missed-spikes   # does a 10x spike it lets through hurt the CNN?
"""

from __future__ import annotations

import argparse

import numpy as np

from bench.stability.record import example


def update_rms() -> None:
    """The largest per-tensor update RMS of healthy runs, update clipping measured, not applied."""
    import adaptx

    train, compare, lm = example("train"), example("compare"), example("lm")
    cfg = train.Config(**compare.SCENARIOS["lstm"]["config"], progress=False)
    lr = train.learning_rate(cfg, 318)
    never = 1e9  # computes the RMS, never clips
    tx = adaptx.robust_adamw(lr, weight_decay=1e-4, mask=train.decay_mask, update_rms_clip=never)
    runs = {
        "lstm": train.train(
            cfg,
            tx=tx,
            max_steps=318,
            early_stopping=False,
            log=lambda *_: None,
            write_files=False,
            validate=False,
        )["history"]
    }
    c = lm.LMConfig(peak_lr=1e-2)
    tx = adaptx.robust_adamw(lm.learning_rate(c), weight_decay=0.1, update_rms_clip=never)
    runs["lm lr 1e-2"] = lm.train_lm(c, tx)["history"]
    for name, hist in runs.items():
        v = np.array([h["scale_by_adam/max_update_rms"] for h in hist])[len(hist) // 10 :]
        above = ", ".join(f"> {d:g}: {100 * (v > d).mean():.1f} %" for d in (1, 1.5, 2, 3, 5))
        print(f"{name}: steps after the first tenth with the largest update RMS {above}")


def decay() -> None:
    """Coupled AdamW decay 0.1 against the best learning rate's decay held fixed, and none."""
    import optax

    lm = example("lm")
    data = lm.load_text(lm.LMConfig())
    for lr in (0.4, 1.0):
        for label, wd in (("coupled 0.1", 0.1), ("independent", 0.1 * 1e-2 / lr), ("none", 0.0)):
            c = lm.LMConfig(peak_lr=lr)
            r = lm.train_lm(c, optax.adamw(lm.learning_rate(c), weight_decay=wd), data=data)
            print(f"peak lr {lr:g}, decay {label} ({wd:.4g}): held-out loss {r['val_loss']:.4f}")


def full_size_passes(tx, n: int = 1 << 22) -> float:
    """Bytes the compiled, donated step of ``tx`` moves on one ``n``-element leaf, in
    full-size arrays (kernels that read or write a full-size array; ``hlo_report``)."""
    import jax
    import jax.numpy as jnp
    import optax

    from bench.hlo_report import kernel_rows

    p, g = jnp.zeros(n), jnp.full(n, 1e-3)

    def step(params, state, grads):
        u, state = tx.update(grads, state, params, value=jnp.float32(1.0))
        return optax.apply_updates(params, u), state

    hlo = jax.jit(step, donate_argnums=(0, 1)).lower(p, tx.init(p), g).compile().as_text()
    rows = [r for r in kernel_rows(hlo) if r["in_bytes"] >= 4 * n or r["out_bytes"] >= 4 * n]
    return sum(r["in_bytes"] + r["out_bytes"] for r in rows) / (4 * n)


def unguarded_chain(update_rms_clip: float | None = 5.0):
    """``robust_adamw``'s chain without its detector and guard (its default update clip, or
    ``update_rms_clip``)."""
    import optax

    import adaptx

    return optax.chain(
        adaptx.scale_by_adam(update_rms_clip=update_rms_clip),
        optax.add_decayed_weights(1e-4),
        optax.scale(-1e-3),
    )


#: optax AdamW alone, clipped, and inside the peers' skip rules, as the stability benchmark
#: times them.
OPTAX_DEFENSES = (
    "none",
    "optax clip 1.0",
    "levanter skip step",
    "OLMo-core skip step",
    "MaxText (clip 1.0, then skip)",
    "MaxText (no clip, skip)",
)


def passes() -> None:
    """Full-size passes of the Adam recipes, robust_adamw's chain, a user's own chain, and
    the peers' skip rules (``where`` or ``lax.cond``) around optax AdamW."""
    import optax

    import adaptx
    from bench.stability import defenses

    for name, tx in {
        "AdamW + update clip (the chain without detector and guard)": unguarded_chain(),
        "adaptx.robust_adamw": adaptx.robust_adamw(1e-3),
        "adaptx.adamw, no clip": adaptx.adamw(1e-3, max_norm=None),
        "adaptx.adamw (global-norm clip)": adaptx.adamw(1e-3),
        "adaptx.stable_adamw": adaptx.stable_adamw(1e-3),
        "adaptx.spam": adaptx.spam(1e-3),
        "adaptx.guard(adaptx.adamw)": adaptx.guard(adaptx.adamw(1e-3)),
        "a user's chain(zclip, scale_by_adam(update_rms_clip=1), scale)": optax.chain(
            adaptx.zclip(), adaptx.scale_by_adam(update_rms_clip=1.0), optax.scale(-1e-3)
        ),
        **{name: defenses.by_name(name).timed() for name in OPTAX_DEFENSES},
    }.items():
        print(f"{name}: {full_size_passes(tx):.2f} full-size passes")


def _replay_steps(tx, norms: np.ndarray, dim: int = 256, seed: int = 0) -> np.ndarray:
    """Norm of each step's update when gradients of the recorded ``norms`` (random
    directions, one per step) are fed through ``tx`` (learning rate inside ``tx``)."""
    import jax
    import jax.numpy as jnp
    import optax

    dirs = np.random.default_rng(seed).standard_normal((len(norms), dim)).astype(np.float32)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    grads = jnp.asarray(dirs * norms[:, None].astype(np.float32))
    params = jnp.zeros(dim)

    def body(carry, g):
        p, s = carry
        u, s = tx.update(g, s, p, value=jnp.float32(1.0))
        return (optax.apply_updates(p, u), s), jnp.linalg.norm(u)

    _, sizes = jax.jit(lambda g: jax.lax.scan(body, (params, tx.init(params)), g))(grads)
    return np.asarray(sizes)


def spike_response() -> None:
    """How big is the step at a 1e4x gradient spike, and how long are steps suppressed after?

    On the healthy recorded runs (``traces.npz``), gradients of the recorded norms in
    random directions go through each optimizer (learning rate 1e-3, no weight decay),
    with and without 1e4x spikes at the benchmark's steady-state fault steps. Reported,
    worst over runs and spikes: the step at the spike over the run's median step, and the
    steps after it until the step is back to half the fault-free run's step (Adam's second
    moment remembers the spike for about 1 / (1 - b2) steps, shrinking every step meanwhile).
    """
    import optax

    import adaptx
    from bench.stability import faults
    from bench.stability.run import HERE, load_traces

    traces, meta = load_traces(HERE / "traces", quick=False)
    optimizers = {
        "optax.adamw": lambda: optax.adamw(1e-3, weight_decay=0.0),
        "optax clip(1) + adamw": lambda: optax.chain(
            optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.0)
        ),
        "adaptx.adam_atan2": lambda: adaptx.adam_atan2(1e-3, weight_decay=0.0),
        "adaptx.stable_adamw": lambda: adaptx.stable_adamw(1e-3, weight_decay=0.0),
        "adaptx.robust_adamw": lambda: adaptx.robust_adamw(1e-3, weight_decay=0.0),
    }
    print("| optimizer | step at the spike / median step | steps until recovered |")
    print("| --- | --- | --- |")
    for name, make in optimizers.items():
        worst_ratio, worst_recovery = 0.0, 0
        for i, (run, t) in enumerate(traces.items()):
            if not meta[run]["healthy"]:
                continue
            norms = t["grad_norm"].astype(np.float64)
            at = faults.steady_steps(len(norms), seed=i)
            spiked = norms.copy()
            spiked[at] *= 1e4
            clean, hit = _replay_steps(make(), norms), _replay_steps(make(), spiked)
            typical = np.median(clean)
            for s in at:
                worst_ratio = max(worst_ratio, hit[s] / typical)
                after = (
                    hit[s + 1 : s + 1 + faults.AFTERSHOCK]
                    / clean[s + 1 : s + 1 + faults.AFTERSHOCK]
                )
                low = np.nonzero(after < 0.5)[0]
                recovered = (
                    faults.AFTERSHOCK
                    if len(low) == len(after)
                    else (low.max() + 1 if len(low) else 0)
                )
                worst_recovery = max(worst_recovery, int(recovered))
        rec = f"≥ {worst_recovery}" if worst_recovery >= faults.AFTERSHOCK else str(worst_recovery)
        print(f"| {name} | {worst_ratio:.2f} | {rec} |", flush=True)


#: The CNN trace on which robust_adamw lets 10x spikes through, and its length.
MISSED_SPIKES_TRACE, MISSED_SPIKES_STEPS = "cnn-bn-bs32-lr0.005-s3", 1200


def missed_spikes() -> None:
    """The constant-rate CNN of the traces trained again, 3 seeds, with the replay's
    steady-state 10x spikes of that trace injected into the gradient and without, under
    optax.adamw and robust_adamw (which lets 2 of those 5 through in the replay)."""
    import json

    import adaptx
    from bench.stability import faults
    from bench.stability.record import HERE, cnn_classifier

    names = list(json.loads((HERE / "traces.json").read_text()))
    at = faults.steady_steps(MISSED_SPIKES_STEPS, seed=names.index(MISSED_SPIKES_TRACE))
    print(f"10x spikes at steps {at.tolist()}; test accuracy, mean (min-max) of seeds 3-5")
    print("| optimizer | no spike | 10x spikes |\n| --- | --- | --- |")
    for name, make in (("optax.adamw", None), ("adaptx.robust_adamw", adaptx.robust_adamw)):
        cells = []
        for spikes in (None, {int(t): 10.0 for t in at}):
            acc = [
                cnn_classifier(s, MISSED_SPIKES_STEPS, 5e-3, 32, make_tx=make, spikes=spikes)[
                    "final"
                ]
                for s in (3, 4, 5)
            ]
            cells.append(f"{np.mean(acc):.4f} ({min(acc):.4f}-{max(acc):.4f})")
        print(f"| {name} | {cells[0]} | {cells[1]} |", flush=True)


PROBES = {
    "update-rms": update_rms,
    "decay": decay,
    "passes": passes,
    "spike-response": spike_response,
    "missed-spikes": missed_spikes,
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("probe", choices=sorted(PROBES), help="which measurement to run")
    PROBES[p.parse_args(argv).probe]()


if __name__ == "__main__":
    main()
