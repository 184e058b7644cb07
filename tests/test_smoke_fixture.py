"""The shared trained CNN fixture is actually accurate (other tests rely on it)."""


def test_trained_cnn_is_accurate(trained_cnn, mnist_test):
    x, y = mnist_test
    accuracy = (trained_cnn(x).argmax(1) == y).float().mean().item()
    assert accuracy >= 0.93
