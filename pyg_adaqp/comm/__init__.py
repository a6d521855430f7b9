"""Communication: the message codec (quantization and packing of exchanged
rows) used by the halo exchange."""
from pyg_adaqp.comm.codec import (
    FULL_PRECISION,
    MessageLayout,
    NonFiniteMessageError,
    QuantizedMessage,
    dequantize,
    message_nbytes,
    quantize,
    worker_generator,
)

__all__ = [
    'FULL_PRECISION',
    'MessageLayout',
    'NonFiniteMessageError',
    'QuantizedMessage',
    'dequantize',
    'message_nbytes',
    'quantize',
    'worker_generator',
]
