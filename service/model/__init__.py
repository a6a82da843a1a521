"""The model: the FNN, the versioned store it is loaded from, the MNIST data and training."""
