"""qatcifar.measure: bench.py's training measurements time the network they name."""
import argparse

import pytest

from conftest import ARCH
from qatcifar import checkpoint, measure


@pytest.mark.slow
def test_the_lsq_kind_times_a_network_of_learned_steps(synthetic_dir, tmp_path):
    path = str(tmp_path / "lsq.ckpt")
    args = argparse.Namespace(kind="lsq", arch=ARCH, device="CPU", data=synthetic_dir, batch=4, steps=2,
                              checkpoint=path, adv_steps=1)
    result = measure.train_worker(args)
    assert len(result["step_s"]) == 2 and result["first_step_s"] > 0
    assert checkpoint.quant_config(path, checkpoint.read(path)).quantizer == "lsq"
