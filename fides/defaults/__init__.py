"""The embedded default models: small digit classifiers trained on scikit-learn's bundled data."""
