"""Evaluating representations: features of a labelled split and weighted kNN.

The kNN classifier is InstDisc's (Wu et al. 2018), the usual monitor of
MoCo-style pretraining: cosine similarity to a memory bank of training
features, the k nearest neighbours vote for their class with weight
exp(similarity / t).
"""

import numpy as np
import tensorflow as tf


def extract_features(backbone, dataset):
    """L2-normalised features and labels of a finite (images, labels) dataset."""
    features, labels = [], []
    for images, y in dataset:
        # Keras's own compiled predict function, traced once per model.
        f = tf.cast(backbone.predict_on_batch(images), tf.float32)
        features.append(tf.math.l2_normalize(f, -1))
        labels.append(tf.cast(y, tf.int32))
    return tf.concat(features, 0), tf.concat(labels, 0)


def knn_predict_scores(train_features, train_labels, test_features, num_classes, k=200,
                       temperature=0.1, chunk=512):
    """Class scores [N_test, C] of the weighted kNN vote.

    Features must be L2-normalised. Test examples are processed in chunks so
    that the [chunk, N_train] similarity matrix stays small.
    """
    k = min(k, int(train_features.shape[0]))
    scores = []
    for start in range(0, int(test_features.shape[0]), chunk):
        sims = tf.matmul(test_features[start:start + chunk], train_features, transpose_b=True)
        top_sims, top_idx = tf.math.top_k(sims, k=k)
        weights = tf.exp(top_sims / temperature)
        votes = tf.one_hot(tf.gather(train_labels, top_idx), num_classes) * weights[..., None]
        scores.append(tf.reduce_sum(votes, axis=1))
    return tf.concat(scores, 0)


def knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes, k=200,
                 temperature=0.1):
    """Top-1 accuracy (a fraction) of the weighted kNN classifier."""
    scores = knn_predict_scores(train_features, train_labels, test_features, num_classes, k,
                                temperature)
    predicted = np.argmax(scores.numpy(), axis=-1)
    return float(np.mean(predicted == np.asarray(test_labels)))


def knn_eval(backbone, train_dataset, test_dataset, num_classes, k=200, temperature=0.1):
    """kNN top-1 of `backbone` features: memory bank from train, queries from test."""
    train_f, train_y = extract_features(backbone, train_dataset)
    test_f, test_y = extract_features(backbone, test_dataset)
    return knn_accuracy(train_f, train_y, test_f, test_y, num_classes, k, temperature)
