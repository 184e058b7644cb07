"""bench.core.precision.exact_float32: TF32 is off inside the block and the caller's settings come back."""
import pytest
import torch

from bench.core.precision import exact_float32


@pytest.mark.parametrize("caller", ["default", "legacy_tf32", "high"])
def test_tf32_off_inside_and_restored(caller):
    backends = torch.backends
    saved = (backends.cuda.matmul.fp32_precision, backends.cudnn.conv.fp32_precision,
             backends.cudnn.rnn.fp32_precision, torch.get_float32_matmul_precision())
    try:
        if caller == "legacy_tf32":
            backends.cuda.matmul.allow_tf32 = True
        elif caller == "high":
            torch.set_float32_matmul_precision("high")
        before = (backends.cuda.matmul.fp32_precision, backends.cudnn.conv.fp32_precision,
                  torch.get_float32_matmul_precision())
        with exact_float32():
            assert backends.cuda.matmul.fp32_precision == "ieee"
            assert backends.cudnn.conv.fp32_precision == "ieee"
            assert torch.get_float32_matmul_precision() == "highest"
        assert (backends.cuda.matmul.fp32_precision, backends.cudnn.conv.fp32_precision,
                torch.get_float32_matmul_precision()) == before
        # The legacy getters still work afterwards (PyTorch refuses to read mixed flags).
        assert isinstance(backends.cudnn.allow_tf32, bool)
    finally:
        torch.set_float32_matmul_precision(saved[3])
        backends.cuda.matmul.fp32_precision, backends.cudnn.conv.fp32_precision = saved[0], saved[1]
        backends.cudnn.rnn.fp32_precision = saved[2]


def test_restored_after_an_error():
    before = torch.backends.cudnn.conv.fp32_precision
    with pytest.raises(ValueError), exact_float32():
        raise ValueError("boom")
    assert torch.backends.cudnn.conv.fp32_precision == before
