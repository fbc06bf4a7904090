"""``import garden`` defers what hivemind imports and only averaging uses (``garden.DEFERRED_MODULES``): a daemon
that never averages never loads it, and an averaging round still finds it whole. It also skips the ``__init__`` of
hivemind's packages that import torch for names a DHT node does not use (``garden.DEFERRED_PACKAGES``): the daemon
imports no torch until it has torch work (``tests/net/test_swarm.py`` checks a running one)."""

from __future__ import annotations

import os
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



TORCH_FREE = """
import sys, garden
import hivemind
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P, PeerID
from hivemind.utils import MSGPackSerializer, get_dht_time, get_logger
import garden.daemon.runner, garden.net.dht_thread, garden.api.app
assert "torch" not in sys.modules, "torch was imported"
assert hivemind.__version__ == "1.1.12" and type(hivemind).__name__ == "_DeferredPackage"
assert MSGPackSerializer.loads(MSGPackSerializer.dumps([1, "a"])) == [1, "a"] and get_dht_time() > 0
from hivemind.dht import DHT  # a name whose module needs torch: loaded when asked for
import hivemind.dht.dht
assert "torch" in sys.modules and DHT is hivemind.dht.dht.DHT and hivemind.DHT is DHT
from hivemind import Optimizer
import hivemind.optim
assert Optimizer is hivemind.optim.Optimizer and hivemind.utils.MPFuture.__module__ == "hivemind.utils.mpfuture"
assert hivemind.dht.DHTNode is DHTNode and hivemind.p2p.P2P is P2P
print("ok")
"""


def test_the_daemon_s_modules_and_hivemind_s_dht_import_without_torch_and_every_name_still_resolves() -> None:
    done = subprocess.run([sys.executable, "-c", TORCH_FREE], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


CAPPED = """
import sys
from garden.daemon.gardener import _cap_threads
_cap_threads(1)  # --max-threads 1 (or a --max-cpu that leaves one core)
assert "torch" not in sys.modules
import torch
assert torch.get_num_threads() == 1
_cap_threads(2)  # torch already there: set at once
assert torch.get_num_threads() == 2
print("ok")
"""


def test_a_thread_cap_reaches_the_torch_imported_after_it_without_importing_torch_itself() -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    done = subprocess.run([sys.executable, "-c", CAPPED], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
