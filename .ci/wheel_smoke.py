"""The installed wheel works: run by .ci/run in a fresh venv holding only the wheel and
its dependencies, as ``python -P .ci/wheel_smoke.py`` (``-P``: the checkout is not on
``sys.path``, so ``import adaptx`` can only find the installed copy).

Imports adaptx, checks that it came from the venv's site-packages, and runs one update
of a recipe; any failure raises, and the script exits non-zero.
"""

import sys
import sysconfig
from pathlib import Path

import jax.numpy as jnp
import optax

import adaptx

site = Path(sysconfig.get_paths()["purelib"]).resolve()
where = Path(adaptx.__file__).resolve()
if site not in where.parents:
    sys.exit(f"adaptx was imported from {where}, not from the venv's {site}")
if not (where.parent / "py.typed").is_file():
    sys.exit(f"the wheel has no adaptx/py.typed next to {where}")

params = {"w": jnp.zeros(3)}
tx = adaptx.robust_adamw(1e-1)
state = tx.init(params)
updates, state = tx.update({"w": jnp.array([1.0, 2.0, 2.0])}, state, params, value=jnp.array(1.0))
params = optax.apply_updates(params, updates)
figures = adaptx.telemetry(state)
if not bool(jnp.all(jnp.isfinite(params["w"]))) or not bool(jnp.any(params["w"] != 0)):
    sys.exit(f"one update of robust_adamw gave {params['w']}")
if float(figures["guard/grad_norm"]) != 3.0 or int(figures["guard/skipped"]) != 0:
    sys.exit(f"unexpected telemetry after one update: {figures}")
print(f"adaptx {adaptx.__version__} from {where.parent}: one update, params {params['w']}")
