"""Stubs for the CPU test environment of LLaMA-Factory (scripts/integration_env.sh llamafactory).

LLaMA-Factory 0.9.5 imports ``torchaudio`` at module level (``llamafactory/data/mm_plugin.py``) on
every ``train`` path, text-only ones included, but uses it only for audio inputs. Its declared
torchaudio wheels do not load beside the CPU torch build this environment has, so a stub package
is written into site-packages: importing it works, using it raises. It has no ``.dist-info``, so
``transformers`` (which looks for the distribution) still reports torchaudio as unavailable.
Not for a real installation: there, install the torchaudio that matches your torch.
"""

from __future__ import annotations

import importlib.util
import sysconfig
from pathlib import Path

STUB = '''"""A stub written by integrations/llamafactory/post_install.py (a CPU test environment):
LLaMA-Factory imports torchaudio at module level; text-only training never calls it."""

__version__ = "0.0.0+arena-callbacks-stub"


def __getattr__(name):
    raise ImportError(f"torchaudio.{name}: this environment has a stub torchaudio (no audio support)")
'''


def main() -> None:
    spec = importlib.util.find_spec("torchaudio")
    if spec is not None and "arena-callbacks-stub" not in Path(spec.origin or "").read_text(errors="ignore"):
        print("post_install: a real torchaudio is installed; no stub written")
        return
    target = Path(sysconfig.get_paths()["purelib"]) / "torchaudio"
    target.mkdir(exist_ok=True)
    (target / "__init__.py").write_text(STUB, encoding="utf-8")
    print(f"post_install: stub torchaudio written to {target}")


if __name__ == "__main__":
    main()
