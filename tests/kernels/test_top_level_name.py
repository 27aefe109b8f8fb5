"""kernels/ imported under the top-level name `kernels` (the checkout's root on sys.path) must not
take the place of Hugging Face's `kernels` distribution, which transformers imports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_installed_distribution_wins_from_the_checkout_root():
    # python -c puts the current directory (the checkout's root) first on sys.path
    out = _run(
        "import importlib.util, os, kernels\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "own = os.path.realpath(os.path.join('kernels', '__init__.py'))\n"
        "f = getattr(kernels, '__file__', None)\n"
        "assert f is None or os.path.realpath(f) != own, f\n"
        "assert not hasattr(kernels, 'sparse_down')\n"
        "import workbench.kernels as K\n"
        "assert callable(K.sparse_down) and callable(K.sparse_ffn)\n"
        "from transformers import LlamaConfig\n"
        "print('installed' if f else 'stand-in')\n"
    )
    assert out.strip() in ("installed", "stand-in")


def test_stand_in_when_the_distribution_is_missing():
    # site-packages dropped after start-up: only the checkout's folder can answer `import kernels`
    out = _run(
        "import sys\n"
        "sys.path[:] = [''] + [p for p in sys.path if 'site-packages' not in p and p]\n"
        "import kernels\n"
        "assert getattr(kernels, '__file__', None) is None\n"
        "assert getattr(kernels, '__version__', 'N/A') == 'N/A'\n"
        "try:\n"
        "    from kernels import get_kernel\n"
        "except ImportError as e:\n"
        "    print('refused', e)\n"
        "try:\n"
        "    kernels.get_kernel\n"
        "except AttributeError as e:\n"
        "    print(e)\n"
    )
    assert out.startswith("refused")
    assert "pip install kernels" in out and "workbench.kernels" in out
