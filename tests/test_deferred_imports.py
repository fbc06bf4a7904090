"""``import garden`` defers what hivemind imports and only averaging uses (``garden.DEFERRED_MODULES``): a daemon
that never averages never loads it, and an averaging round still finds it whole."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys, garden, hivemind, torch  # torch's import reads __file__ of every module (inspect.getmodule)
loaded = [m for m in sys.modules if m.startswith("scipy.optimize.")]
assert not loaded, loaded  # the stand-in only: none of its submodules
assert type(sys.modules["scipy.optimize"]).__name__ == "_Deferred"
assert sys.modules["scipy.optimize"].__file__.endswith("__init__.py")  # its dunders answered without loading
from hivemind.averaging.load_balancing import load_balance_peers
assert load_balance_peers(1000, (1.0, 2.0, 3.0)) == (0, 448, 552)  # hivemind's LP solved by the real module
import scipy.optimize
assert type(sys.modules["scipy.optimize"]).__name__ == "module" and scipy.optimize is sys.modules["scipy.optimize"]
from scipy.optimize import linprog
assert callable(linprog)
print("ok")
"""


def test_hivemind_loads_scipy_optimize_only_when_an_averaging_round_balances_its_load() -> None:
    # a fresh interpreter: this one may have imported scipy.optimize already
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]

