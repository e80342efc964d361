"""Constants of the datasets, shared by the data (loaders), the networks (normalisation) and the report."""

CIFAR10_TRAIN_SIZE, CIFAR10_TEST_SIZE = 50_000, 10_000
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# The robustness library's normalisation (spec section 0), a layer of every CIFAR-10 model.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
# MNIST's pixel mean and standard deviation (the usual constants of its normalisation), in [0, 1] units.
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
