"""Weight-space spectra: how a finetune changed each adapted weight matrix.

One of the measurements of a probe step (docs/design.md §3), on its own cadence.

``W0 = U Σ Vᵀ`` is a layer's pretrained weight as a ``d_out × d_in`` matrix (thin SVD,
``n = min(d_out, d_in)`` directions, ``σ_1 ≥ σ_2 ≥ …``), ``W_ft`` the weight the finetuned
layer computes with and ``ΔW = W_ft − W0``. Per layer (keys of :data:`SPECTRAL_METRICS`):

* ``rel_update_fro`` = ``‖ΔW‖_F / ‖W0‖_F``; ``rel_update_spec`` = ``‖ΔW‖_2 / ‖W0‖_2``.
* ``stable_rank`` = ``‖ΔW‖_F² / ‖ΔW‖_2²`` of the update (between 1 and ``rank ΔW``); 0 for
  ``ΔW = 0``, where the ratio is undefined.
* ``intruders``: how many of W_ft's top-``k`` left singular vectors have a best |cosine| below
  ``eps`` with every left singular vector of W0 (arXiv 2410.21228; the rule of peft's
  ``reduce_intruder_dimension``), as a float.
* ``retention_dev`` = ``mean_i |u_iᵀ W_ft v_i − σ_i| / σ_1``: how far the gains of the
  pretrained directions moved, relative to the largest one (scale-free across layers).
* ``retention_smooth`` = ``mean_i |x_i − MA5(x)_i|`` of the retention profile
  ``x_i = |u_iᵀ W_ft v_i − σ_i|``; ``adaptation_smooth`` the same of the adaptation profile
  ``x_i = ‖ΔW v_i‖``. Both in weight units (not normalised). ``MA5`` is a centred moving
  average over 5 entries; at the ends the window is truncated to the entries that exist
  (``MA5(x)_0 = mean(x_0, x_1, x_2)``), so the output has the profile's length and a straight
  line is smooth (0) away from the ends.

Where W_ft comes from (:func:`layer_updates`): LoRA ``ΔW = s·B A`` (measured from the factors:
norms and profiles never form ``ΔW``); DoRA ``W_ft = diag(m / ‖W0 + sBA‖_row) (W0 + sBA)``;
OFT ``W_ft = W0 · blockdiag(R)ᵀ``; full finetuning the current weight against a step-0
snapshot (:func:`snapshot_weights`).

How it is computed (a :class:`Solver`): the weights are copied in float64 where they live (OFT
and DoRA weights are built there, and a dense ΔW is taken in float64), then every metric works
in the solver's precision. :data:`EXACT` (float64 on the CPU, full SVDs) is the reference and
the default of these functions; the monitor uses :data:`FAST`: float32 on the weight's device,
with the two quantities that need only the top of a spectrum, W_ft's top-``k`` left singular
vectors (intruders) and a dense ΔW's ``‖ΔW‖_2``, found iteratively instead of by a full SVD of
W_ft or ΔW: for LoRA from W0's SVD and the factors (a diagonal-plus-low-rank eigenproblem), for
dense updates by a randomized subspace iteration (:func:`top_singular`). W0's thin SVD stays exact (every
profile needs all of ``U`` and ``V``); it is computed once per layer and cached in host memory
(``cache``) while W0 is unchanged: ``4·n·(d_out + d_in)`` bytes a layer in float32. LoRA
updates never form ΔW. docs/geometry.md ("Weight spectra") states the error bounds.

Modules, one per concern:

* :mod:`.metrics`: the metrics of one update, from LoRA factors or from dense weights
  (:func:`lowrank_update_metrics`, :func:`dense_update_metrics`, :func:`pretrained_svd`,
  :func:`moving_average`, :func:`smoothness`).
* :mod:`.layers`: which layers of a model are measured (:func:`spectra_layer_names`).
* :mod:`.updates`: each layer's pretrained and finetuned weight or factors, for LoRA, DoRA, OFT
  and full finetuning (:func:`layer_updates`, :func:`snapshot_weights`).
* :mod:`.model`: every measured layer of a model with the W0 SVD cache (:func:`weight_spectra`)
  and their ``spectral/`` keys (:func:`aggregate_spectra`).

Example:
    >>> import torch
    >>> w0 = torch.randn(64, 48, dtype=torch.float64)
    >>> b, a = torch.randn(64, 4, dtype=torch.float64), torch.randn(4, 48, dtype=torch.float64)
    >>> m = lowrank_update_metrics(w0, b, a, 0.01)
    >>> 1 <= m["stable_rank"] <= 4
    True
"""

from __future__ import annotations

from .layers import spectra_layer_names
from .metrics import (
    EXACT,
    FAST,
    SPECTRAL_METRICS,
    PretrainedSVD,
    Solver,
    dense_update_metrics,
    lowrank_update_metrics,
    moving_average,
    pretrained_svd,
    smoothness,
    top_singular,
)
from .model import aggregate_spectra, weight_spectra
from .updates import DenseUpdate, LayerUpdate, LowRankUpdate, layer_updates, snapshot_weights

__all__ = [
    "EXACT",
    "FAST",
    "SPECTRAL_METRICS",
    "Solver",
    "DenseUpdate",
    "LayerUpdate",
    "LowRankUpdate",
    "PretrainedSVD",
    "aggregate_spectra",
    "dense_update_metrics",
    "layer_updates",
    "lowrank_update_metrics",
    "moving_average",
    "pretrained_svd",
    "smoothness",
    "snapshot_weights",
    "spectra_layer_names",
    "top_singular",
    "weight_spectra",
]
