"""qatcifar.cifar: the input pipeline, the data-folder checks, the class names. (preprocess.py's --synthetic and
--download end to end: commands/test_preprocess.py.)"""
import os

import numpy as np
import pytest

from qatcifar import cifar
from qatcifar.cifar import CIFAR10_MEAN, CIFAR10_STD, DatasetError


def first_batch(dataset):
    images, labels = next(dataset.create_tuple_iterator(num_epochs=1))
    return images.asnumpy(), labels.asnumpy()


def test_training_pipeline_shapes_and_types(synthetic_dir):
    dataset = cifar.create_dataset(synthetic_dir, training=True, batch_size=16, num_samples=40)
    assert dataset.get_dataset_size() == 2  # 40 // 16: the remainder is dropped when training
    images, labels = first_batch(dataset)
    assert images.shape == (16, 3, 32, 32) and images.dtype == np.float32
    assert labels.shape == (16,) and labels.dtype == np.int32
    assert labels.min() >= 0 and labels.max() < cifar.NUM_CLASSES


def test_eval_pipeline_is_normalized_and_in_file_order(synthetic_dir):
    dataset = cifar.create_dataset(synthetic_dir, training=False, batch_size=32, num_samples=70)
    assert dataset.get_dataset_size() == 3  # the last, partial batch is kept for evaluation
    images, labels = first_batch(dataset)
    raw = np.fromfile(os.path.join(synthetic_dir, "test_batch.bin"), np.uint8,
                      count=32 * cifar.RECORD_BYTES).reshape(32, -1)
    assert (labels == raw[:, 0]).all()
    pixels = raw[:, 1:].reshape(32, 3, 32, 32) / 255.0
    expected = (pixels - np.array(CIFAR10_MEAN)[:, None, None]) / np.array(CIFAR10_STD)[:, None, None]
    np.testing.assert_allclose(images, expected, atol=1e-5)


def test_training_draws_different_samples_each_epoch(synthetic_dir):
    dataset = cifar.create_dataset(synthetic_dir, training=True, batch_size=32, num_samples=32)
    iterator = dataset.create_tuple_iterator(num_epochs=2)  # one iterator over all epochs, as Model.train
    epochs = [[labels.asnumpy() for _, labels in iterator] for _ in range(2)]
    assert len(epochs[1]) == 1 and not np.array_equal(epochs[0][0], epochs[1][0])


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(DatasetError, match="does not exist.*preprocess.py --download"):
        cifar.check_data_dir(str(tmp_path / "nope"), training=True)


def test_parent_of_the_data_folder_gets_a_hint(tmp_path):
    (tmp_path / cifar.ARCHIVE_FOLDER).mkdir()
    with pytest.raises(DatasetError, match=f"did you mean -data .*{cifar.ARCHIVE_FOLDER}"):
        cifar.check_data_dir(str(tmp_path), training=True)


def test_empty_folder_is_named(tmp_path):
    with pytest.raises(DatasetError, match=r"no data_batch_\*.bin"):
        cifar.check_data_dir(str(tmp_path), training=True)
    with pytest.raises(DatasetError, match="no test_batch.bin"):
        cifar.check_data_dir(str(tmp_path), training=False)


def test_truncated_file_says_its_size(tmp_path):
    (tmp_path / "data_batch_1.bin").write_bytes(bytes(cifar.RECORD_BYTES * 300))
    with pytest.raises(DatasetError, match=r"921900 bytes \(300.00 records of 3073 bytes\)"):
        cifar.check_data_dir(str(tmp_path), training=True)


def test_bad_label_is_named(tmp_path):
    records = np.zeros((cifar.RECORDS_PER_FILE, cifar.RECORD_BYTES), np.uint8)
    records[17, 0] = 12
    records.tofile(tmp_path / "test_batch.bin")
    with pytest.raises(DatasetError, match="record 17 has label 12"):
        cifar.check_data_dir(str(tmp_path), training=False)


def test_class_names_from_meta_file(synthetic_dir, tmp_path, capsys):
    assert cifar.class_names(synthetic_dir)[3] == "synthetic_3"
    assert cifar.class_names(str(tmp_path)) == [str(i) for i in range(10)]
    (tmp_path / cifar.META_FILE).write_text("cat\ndog\n")
    assert cifar.class_names(str(tmp_path)) == [str(i) for i in range(10)]
    assert "names 2 classes, not 10; classes are numbered instead" in capsys.readouterr().err


@pytest.mark.parametrize("content, why", [(b"\xff\xfe\x00binary" * 3, "it is not UTF-8 text"),
                                          (b"x" * 5000, "it is over 4096 bytes")])
def test_unreadable_class_names_are_an_error(content, why, tmp_path):
    (tmp_path / cifar.META_FILE).write_bytes(content)
    with pytest.raises(DatasetError, match=f"cannot read the class names in .*batches.meta.txt \\({why}\\)"):
        cifar.class_names(str(tmp_path))


def test_class_names_from_a_fifo_are_refused_not_waited_for(tmp_path):
    os.mkfifo(tmp_path / cifar.META_FILE)
    with pytest.raises(DatasetError, match="batches.meta.txt is not a file"):
        cifar.class_names(str(tmp_path))


def full_file(path, label=0):
    records = np.zeros((cifar.RECORDS_PER_FILE, cifar.RECORD_BYTES), np.uint8)
    records[:, 0] = label
    records.tofile(path)


@pytest.mark.parametrize("name, training", [("old_test_batch.bin", False), ("test_batch_old.bin", False),
                                            (".test_batch.bin", False), ("backup_data_batch_1.bin", True),
                                            ("data_batch_1_copy.bin", True)])
def test_a_stray_file_that_cifar10dataset_would_read_is_named(name, training, tmp_path):
    """MindSpore's Cifar10Dataset reads every *.bin holding data_batch or test_batch: a stray full-size copy would
    double the split without a word, a short one fail in the pipeline."""
    full_file(tmp_path / ("data_batch_1.bin" if training else "test_batch.bin"))
    full_file(tmp_path / name)
    with pytest.raises(DatasetError, match=f"{name} is not a CIFAR-10 file name, but MindSpore's Cifar10Dataset "
                                           f"would read it .*move it out of"):
        cifar.check_data_dir(str(tmp_path), training)
    os.remove(tmp_path / name)
    cifar.check_data_dir(str(tmp_path), training)


def test_links_and_folders_among_the_data_files_are_named(tmp_path):
    os.symlink(tmp_path / "gone.bin", tmp_path / "test_batch.bin")
    with pytest.raises(DatasetError, match="cannot read .*test_batch.bin \\(No such file or directory\\)"):
        cifar.check_data_dir(str(tmp_path), training=False)
    os.remove(tmp_path / "test_batch.bin")
    os.symlink("test_batch.bin", tmp_path / "test_batch.bin")  # a loop
    with pytest.raises(DatasetError, match="cannot read .*test_batch.bin \\(Too many levels of symbolic links\\)"):
        cifar.check_data_dir(str(tmp_path), training=False)
    os.remove(tmp_path / "test_batch.bin")
    os.mkdir(tmp_path / "test_batch.bin")
    with pytest.raises(DatasetError, match="test_batch.bin is not a file; move it out"):
        cifar.check_data_dir(str(tmp_path), training=False)
    os.symlink("loop", tmp_path / "loop")
    with pytest.raises(DatasetError, match="data folder .*loop is a broken symbolic link \\(or a loop\\)"):
        cifar.check_data_dir(str(tmp_path / "loop"), training=False)


# --- download, against a server on 127.0.0.1 that serves an archive built here --------------


