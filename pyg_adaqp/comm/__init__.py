"""Communication: the message codec (quantization and packing of exchanged
rows), the transport, and the halo exchange built on both."""
from pyg_adaqp.comm.codec import (
    FULL_PRECISION,
    MessageLayout,
    NonFiniteMessageError,
    QuantizedMessage,
    SharedRows,
    dequantize,
    message_nbytes,
    quantize,
    worker_generator,
)
from pyg_adaqp.comm.exchange import ExchangeStats, HaloExchange, HaloHandle, LinkLoad
from pyg_adaqp.comm.transport import PendingExchange, Transport

__all__ = [
    'ExchangeStats',
    'HaloExchange',
    'HaloHandle',
    'LinkLoad',
    'PendingExchange',
    'Transport',
    'FULL_PRECISION',
    'MessageLayout',
    'NonFiniteMessageError',
    'QuantizedMessage',
    'SharedRows',
    'dequantize',
    'message_nbytes',
    'quantize',
    'worker_generator',
]
