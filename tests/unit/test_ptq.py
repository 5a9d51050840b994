"""qatcifar.ptq: calibration sets each activation quantizer's range from the float network's activations."""
import numpy as np
import pytest

from conftest import ARCH
from qatcifar import cifar, cli, networks, ptq
from qatcifar.quant import ActQuant


@pytest.mark.parametrize("method", ptq.METHODS)
def test_calibration_takes_the_ranges_of_the_float_activations(method, synthetic_dir):
    dataset = cifar.calibration_dataset(synthetic_dir, 96, 32)
    images = np.concatenate([x for x, _ in dataset.create_tuple_iterator(num_epochs=1, output_numpy=True)])
    qnet, config, seen = ptq.calibrate(networks.resnet(ARCH).set_train(False), dataset, method)
    assert seen == 96
    assert config.weight_bits == ptq.WEIGHT_BITS == 8 and not qnet.training
    quantizers = [(name, cell) for name, cell in qnet.cells_and_names() if isinstance(cell, ActQuant)]
    assert len(quantizers) > 5 and all(int(cell.steps.asnumpy()) == 1 for _, cell in quantizers)  # eval quantizes
    first = qnet.conv1.input_quant  # it sees the images themselves
    low, high = float(first.min_val.asnumpy()), float(first.max_val.asnumpy())
    if method == "minmax":
        assert (low, high) == pytest.approx((images.min(), images.max()))
    else:  # the 0.01th and 99.99th percentiles of a sample: inside the range, near its ends
        assert images.min() <= low < high <= images.max()
        assert np.mean(images < low) < 0.001 and np.mean(images > high) < 0.001
    for name, cell in quantizers:
        low, high = float(cell.min_val.asnumpy()), float(cell.max_val.asnumpy())
        assert low < high, name
        if cell.relu:  # after a ReLU
            assert low == 0.0, name


def test_the_first_images_of_the_training_files_calibrate(synthetic_dir):
    """The first N training images in file order, unaugmented: the same ones every time."""
    batches = [[x for x, _ in cifar.calibration_dataset(synthetic_dir, 40, 16).create_tuple_iterator(
        num_epochs=1, output_numpy=True)] for _ in range(2)]
    assert [len(x) for x in batches[0]] == [16, 16, 8]
    for a, b in zip(*batches, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("pixel", [0, 128])
def test_calibration_on_images_without_spread_is_refused(pixel, tmp_path):
    """Blank or constant calibration images would give every activation a range too narrow for real images (int8 18 %
    against float 29.5 % when it was silent): one line saying so, before anything is written."""
    data = tmp_path / "constant"
    data.mkdir()
    labels = np.arange(cifar.RECORDS_PER_FILE) % cifar.NUM_CLASSES
    images = np.full((len(labels), 3, cifar.IMAGE_SIZE, cifar.IMAGE_SIZE), pixel, np.uint8)
    cifar.write_records(str(data / "data_batch_1.bin"), labels.astype(np.uint8), images)
    with pytest.raises(cli.InputError, match="the 64 calibration images span 0 pixel level"):
        ptq.calibrate(networks.resnet(ARCH).set_train(False), cifar.calibration_dataset(str(data), 64, 32))
