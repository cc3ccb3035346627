"""Spectral analysis of fine-tuning updates: SVD of dW = W_ft - W_0 against W_0, and intruder
dimensions (Shuttleworth et al., 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence").

An *intruder dimension* of a fine-tuned matrix is one of its top-k singular vectors whose largest
absolute cosine similarity with the singular vectors of the pre-trained matrix is below a
threshold: a new high-ranking direction that fine-tuning added rather than re-weighted. The paper
finds them in LoRA updates (more at low rank) and rarely in full fine-tuning.

Kernels here are [in, out] (y = x W); the paper's PyTorch weights are [out, in]. `side='output'`
(the default, the paper's choice of left singular vectors of the [out, in] weight) compares the
output-space singular vectors, i.e. the right singular vectors of our kernel; `side='input'` the
input-space ones. All SVDs in fp32 (numpy, on the host: these are analysis tools, not training
code).

Also here: `update_spectrum` (singular values of dW, its stable and effective rank, and its
overlap with / amplification of W_0's top directions, Hu et al., 2021, LoRA, Sec. 7).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
from flax import traverse_util

__all__ = [
    "effective_rank", "intruder_counts", "intruder_dimensions", "max_cosine", "plot_intruder_counts",
    "plot_spectra", "singular_vectors", "update_spectrum",
]

SIDES = ("output", "input")


def _matrix(w, name="w") -> np.ndarray:
    w = np.asarray(w, np.float32)
    if w.ndim != 2:
        raise ValueError(f"`{name}` must be a 2-D [in, out] matrix, got shape {w.shape}")
    return w


def singular_vectors(w, *, side: str = "output") -> tuple[np.ndarray, np.ndarray]:
    """(singular values [r] descending, unit singular vectors [d, r] as columns) of a kernel
    [in, out]; d = out for side='output', in for side='input'; r = min(in, out)."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    u, s, vh = np.linalg.svd(_matrix(w).astype(np.float64), full_matrices=False)
    return s, (vh.T if side == "output" else u)


def max_cosine(w0, w_ft, *, k: int = 10, side: str = "output", m: int | None = None) -> np.ndarray:
    """[k]: for each of the top-k singular vectors of `w_ft`, the largest |cosine similarity| with
    any of the top-`m` (default: all) singular vectors of `w0`."""
    w0, w_ft = _matrix(w0, "w0"), _matrix(w_ft, "w_ft")
    if w0.shape != w_ft.shape:
        raise ValueError(f"w0 has shape {w0.shape} but w_ft has {w_ft.shape}")
    _, v0 = singular_vectors(w0, side=side)
    _, v1 = singular_vectors(w_ft, side=side)
    r = v1.shape[1]
    if not isinstance(k, int) or not 1 <= k <= r:
        raise ValueError(f"k must be an int in [1, {r}] for shape {w0.shape}, got {k!r}")
    v0 = v0 if m is None else v0[:, :m]
    return np.abs(v1[:, :k].T @ v0).max(axis=1)


def intruder_dimensions(w0, w_ft, *, k: int = 10, threshold: float = 0.5, side: str = "output",
                        m: int | None = None) -> np.ndarray:
    """Indices (into w_ft's singular vectors, descending order) of the intruder dimensions among
    the top-k: max |cos| with w0's singular vectors < `threshold`. len() is the count."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    return np.flatnonzero(max_cosine(w0, w_ft, k=k, side=side, m=m) < threshold)


def _kernels(params) -> dict[str, np.ndarray]:
    flat = traverse_util.flatten_dict(params)
    return {"/".join(p[:-1]): v for p, v in flat.items() if p[-1] == "kernel" and np.ndim(v) == 2}


def intruder_counts(params0, params_ft, *, k: int = 10, threshold: float = 0.5,
                    side: str = "output", select: Callable[[str], bool] | None = None
                    ) -> dict[str, int]:
    """{module path: number of intruder dimensions} for every 2-D kernel of the two param trees
    (dense trees: merge LoRA adapters first with `jaxalign.peft.merge_lora`). `k` is capped at
    min(in, out) per matrix; `select` filters module paths."""
    k0, k1 = _kernels(params0), _kernels(params_ft)
    if set(k0) != set(k1):
        raise ValueError(f"the param trees have different kernels: {sorted(set(k0) ^ set(k1))}")
    out = {}
    for p in sorted(k0):
        if select is not None and not select(p):
            continue
        kk = min(k, *np.shape(k0[p]))
        out[p] = int(len(intruder_dimensions(k0[p], k1[p], k=kk, threshold=threshold, side=side)))
    return out


def effective_rank(s) -> float:
    """exp(entropy of s / sum(s)) (Roy & Vetterli, 2007): 1 for a rank-1 spectrum, r for r equal
    singular values; 0 for an all-zero spectrum."""
    s = np.asarray(s, np.float64)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def update_spectrum(w0, w_ft, *, k: int = 4) -> dict:
    """Spectral summary of dW = w_ft - w0.

    Returns: `singular_values` of dW [r]; `stable_rank` |dW|_F^2 / |dW|_2^2; `effective_rank`;
    `relative_norm` |dW|_F / |W0|_F; `overlap`: mean squared cosine between dW's and W0's top-k
    output-space singular vectors (|V_dW^T V_W0|_F^2 / k: 1 = same subspace, ~k/d = random);
    `amplification`: |dW|_F / |U_dW^T W0 V_dW|_F over dW's top-k singular vectors (the LoRA
    paper's factor: how much dW amplifies directions W0 does not emphasise).
    """
    w0, w_ft = _matrix(w0, "w0"), _matrix(w_ft, "w_ft")
    if w0.shape != w_ft.shape:
        raise ValueError(f"w0 has shape {w0.shape} but w_ft has {w_ft.shape}")
    dw = (w_ft.astype(np.float64) - w0.astype(np.float64))
    u, s, vh = np.linalg.svd(dw, full_matrices=False)
    k = min(k, len(s))
    _, s0, vh0 = np.linalg.svd(w0.astype(np.float64), full_matrices=False)
    fro = float(np.sqrt((s ** 2).sum()))
    proj = u[:, :k].T @ w0 @ vh[:k].T
    proj_norm = float(np.linalg.norm(proj))
    return {
        "singular_values": s,
        "stable_rank": float(fro ** 2 / s[0] ** 2) if s[0] > 0 else 0.0,
        "effective_rank": effective_rank(s),
        "relative_norm": fro / max(float(np.sqrt((s0 ** 2).sum())), 1e-30),
        "overlap": float((np.square(vh[:k] @ vh0[:k].T)).sum() / k) if s[0] > 0 else 0.0,
        "amplification": fro / proj_norm if proj_norm > 0 else float("inf"),
    }


def plot_intruder_counts(counts: Mapping[str, Mapping[str, int]], out_path, *,
                         title: str = "Intruder dimensions per layer") -> str:
    """Grouped bars: for each run (e.g. 'full', 'lora r=1', 'lora r=8'), the intruder count summed
    per decoder layer ('layers_<i>'); returns the PNG path."""
    from jaxalign.analysis.averaging import layer_index
    from jaxalign.train.plots import Figure, _save

    runs = list(counts)
    layers = sorted({layer_index(p) for c in counts.values() for p in c} - {None})
    fig = Figure(figsize=(1.2 + 0.9 * max(len(layers), 1) * max(len(runs), 1) / 2, 3.8))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(len(runs), 1)
    for j, run in enumerate(runs):
        per = [sum(v for p, v in counts[run].items() if layer_index(p) == i) for i in layers]
        ax.bar(np.arange(len(layers)) + (j - (len(runs) - 1) / 2) * width, per, width, label=run)
    ax.set_xticks(np.arange(len(layers)), [f"layer {i}" for i in layers])
    ax.set_ylabel("intruder dimensions")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out_path)


def plot_spectra(spectra: Mapping[str, Sequence[float]], out_path, *,
                 title: str = "Singular values of the update dW") -> str:
    """Log-scale singular-value curves, one per name; returns the PNG path."""
    from jaxalign.train.plots import Figure, _save

    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    for name, s in spectra.items():
        s = np.asarray(s, np.float64)
        ax.semilogy(np.arange(1, len(s) + 1), np.maximum(s, 1e-12), label=name)
    ax.set_xlabel("index")
    ax.set_ylabel("singular value")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out_path)
