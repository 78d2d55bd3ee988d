"""Write scikit-learn's breast cancer set (569 samples, 30 features, 2 classes; it ships with the
package, nothing is downloaded) as an .npz that `--data PATH.npz` reads: a stratified split of
60% training and 40% test drawn with seed 0, each feature standardised with the training
split's mean and standard deviation.

    python bench/make_breast_cancer.py OUT.npz     # needs scikit-learn (pip install scikit-learn)
"""

import sys

import numpy as np
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split


def main(path: str) -> None:
    x, y = load_breast_cancer(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.4, stratify=y, random_state=0)
    mean, std = x_train.mean(0), x_train.std(0)
    np.savez(path, x_train=((x_train - mean) / std).astype(np.float32), y_train=y_train.astype(np.int64),
             x_test=((x_test - mean) / std).astype(np.float32), y_test=y_test.astype(np.int64))
    print(f"{path}: {len(y_train)} training and {len(y_test)} test samples, {x.shape[1]} features")


if __name__ == "__main__":
    main(sys.argv[1])
