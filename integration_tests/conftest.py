"""Tests of the monitor inside training tools that pin their own library versions (``make
test-integrations``): each folder here runs in that tool's environment, built by
``scripts/integration_env.sh <tool>`` from ``integrations/<tool>/``. The tiny model and
tokenizer come from the main suite's ``tests/helpers.py``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
