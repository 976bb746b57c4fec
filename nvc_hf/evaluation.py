"""Evaluation metrics: accuracy, clustering quality of anchor assignments, and the latent plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of `predictions` equal to `labels`."""
    predictions, labels = _check_pair(predictions, labels)
    return float((predictions == labels).mean())


def _check_pair(first, second) -> tuple[np.ndarray, np.ndarray]:
    first, second = np.asarray(first), np.asarray(second)
    if first.shape != second.shape or first.ndim != 1:
        raise ValueError(f"Expected two 1-D arrays of equal length, got shapes {first.shape} and {second.shape}.")
    if first.size == 0:
        raise ValueError("Cannot score an empty set of predictions.")
    return first, second


def hungarian_accuracy(clusters: np.ndarray, labels: np.ndarray) -> float:
    """Clustering accuracy under the best one-to-one mapping of clusters to labels (Hungarian algorithm)."""
    clusters, labels = _check_pair(clusters, labels)
    cluster_ids, cluster_index = np.unique(clusters, return_inverse=True)
    label_ids, label_index = np.unique(labels, return_inverse=True)
    contingency = np.zeros((cluster_ids.size, label_ids.size), dtype=np.int64)
    np.add.at(contingency, (cluster_index, label_index), 1)
    rows, columns = linear_sum_assignment(contingency, maximize=True)
    return float(contingency[rows, columns].sum() / clusters.size)


def majority_accuracy(clusters: np.ndarray, labels: np.ndarray) -> float:
    """Clustering accuracy when every cluster is mapped to its most frequent label (many clusters per label)."""
    clusters, labels = _check_pair(clusters, labels)
    correct = 0
    for cluster in np.unique(clusters):
        _, counts = np.unique(labels[clusters == cluster], return_counts=True)
        correct += counts.max()
    return float(correct / clusters.size)


def cluster_metrics(clusters: np.ndarray, labels: np.ndarray, num_clusters: int | None = None) -> dict[str, float]:
    """Clustering ACC, NMI and ARI of `clusters` against `labels`.

    ACC uses the Hungarian one-to-one mapping when there are at most as many clusters as labels, and the
    majority-vote mapping when there are more (one label may then own several clusters). `num_clusters` is the
    number of clusters the method could use (e.g. the anchor count); it defaults to those observed.
    """
    clusters, labels = _check_pair(clusters, labels)
    num_labels = np.unique(labels).size
    num_clusters = num_clusters if num_clusters is not None else np.unique(clusters).size
    if num_clusters <= num_labels:
        cluster_accuracy, mapping = hungarian_accuracy(clusters, labels), "hungarian"
    else:
        cluster_accuracy, mapping = majority_accuracy(clusters, labels), "majority"
    return {
        "cluster_accuracy": cluster_accuracy,
        "cluster_accuracy_mapping": mapping,
        "nmi": float(normalized_mutual_info_score(labels, clusters)),
        "ari": float(adjusted_rand_score(labels, clusters)),
        "clusters_used": int(np.unique(clusters).size),
    }


def plot_latents(
    latents: np.ndarray,
    labels: np.ndarray,
    path: str | Path,
    anchors: np.ndarray | None = None,
    title: str = "Latent space",
    max_points: int = 5000,
    seed: int = 0,
) -> Path:
    """Write a PNG of a 2-D PCA projection of `latents` `(n, d)` coloured by label, with `anchors` `(m, d)` marked.

    The projection is fitted on latents and anchors together, so both share one coordinate system.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    latents, labels = np.asarray(latents, dtype=np.float64), np.asarray(labels)
    if latents.ndim != 2 or latents.shape[0] != labels.shape[0]:
        raise ValueError(f"latents must be (n, d) with one label per row, got {latents.shape} and {labels.shape}.")
    if latents.shape[0] > max_points:
        keep = np.random.default_rng(seed).choice(latents.shape[0], max_points, replace=False)
        latents, labels = latents[keep], labels[keep]

    fitted = latents if anchors is None else np.concatenate([latents, anchors])
    pca = PCA(n_components=2, random_state=seed).fit(fitted)
    points = pca.transform(latents)

    figure, axis = plt.subplots(figsize=(7, 6), dpi=110)
    scatter = axis.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", s=3, alpha=0.6)
    if anchors is not None:
        anchor_points = pca.transform(np.asarray(anchors, dtype=np.float64))
        axis.scatter(anchor_points[:, 0], anchor_points[:, 1], marker="*", s=180, c="black", label="anchors")
        axis.legend(loc="upper right")
    figure.colorbar(scatter, ax=axis, label="label")
    axis.set_title(title)
    axis.set_xlabel("PC 1")
    axis.set_ylabel("PC 2")
    figure.tight_layout()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path
