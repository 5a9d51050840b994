"""qatcifar.int8_export: a layer the int8 file cannot hold is refused, not written wrong."""
import mindspore as ms
import numpy as np
import pytest

from conftest import observed_qat_net
from qatcifar import cli, int8_export, quant


def test_a_bias_beyond_int32_is_refused_not_wrapped_around():
    net = observed_qat_net()
    net.layer2[0].conv1.bn.beta.set_data(ms.Tensor(np.full(32, 1e9, np.float32)))  # folded into the bias
    with pytest.raises(cli.InputError, match="layer2.0.conv1's bias reaches .* beyond int32"):
        int8_export.int8_model(net, quant.QuantConfig())
