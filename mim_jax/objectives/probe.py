"""Quick probes of frozen features: weighted k-NN and a closed-form ridge classifier.

For checks during or right after pre-training (seconds, no training loop): the
features are what an encoder's `pooled` output gives on a labelled set.
"""

import jax
import jax.numpy as jnp
import numpy as np


def knn_predict(train_features: jax.Array, train_labels: jax.Array, query_features: jax.Array,
                num_classes: int, k: int = 20, temperature: float = 0.07) -> jax.Array:
  """Class scores (Q, C) of the weighted k-NN classifier of DINO / InstDisc.

  Cosine similarity to every training feature; the k nearest vote with weight
  exp(similarity / temperature).
  """
  train = train_features / jnp.linalg.norm(train_features, axis=1, keepdims=True).clip(1e-12)
  query = query_features / jnp.linalg.norm(query_features, axis=1, keepdims=True).clip(1e-12)
  similarity = query @ train.T
  k = min(k, train.shape[0])
  top_sim, top_index = jax.lax.top_k(similarity, k)
  votes = jax.nn.one_hot(train_labels[top_index], num_classes) * jnp.exp(
      top_sim / temperature)[..., None]
  return votes.sum(axis=1)


def ridge_fit(features: np.ndarray, labels: np.ndarray, num_classes: int,
              l2: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
  """Closed-form least squares onto one-hot targets of standardised features.

  Returns (weights (d+1, C), [mean, std] (2, d)) for `ridge_predict`.
  """
  features = np.asarray(features, np.float64)
  stats = np.stack([features.mean(0), features.std(0) + 1e-6])
  x = np.concatenate([(features - stats[0]) / stats[1], np.ones((len(features), 1))], axis=1)
  targets = np.eye(num_classes)[np.asarray(labels)]
  gram = x.T @ x + l2 * len(x) * np.eye(x.shape[1])
  return np.linalg.solve(gram, x.T @ targets), stats


def ridge_predict(weights: np.ndarray, stats: np.ndarray, features: np.ndarray) -> np.ndarray:
  x = (np.asarray(features, np.float64) - stats[0]) / stats[1]
  return np.concatenate([x, np.ones((len(x), 1))], axis=1) @ weights
