"""Third-party import-time notices, held back until they matter.

bitsandbytes logs "Failed to load CPU gemm_4bit_forward ..." (a note about its optional 4-bit CPU kernel) when it
is imported, and transformers and peft import it whether or not anything is quantised. The CLI holds that record
back (`hold_back_4bit_notice`) and `release_4bit_notice` re-emits it when a 4-bit layer is actually built, so the
line shows only for 4-bit runs. Stdlib logging only: no torch, safe to import first.
"""

from __future__ import annotations

import logging

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"


class _HoldBack(logging.Filter):
    def __init__(self):
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.held.append(record)
        return False


_filter: _HoldBack | None = None


def hold_back_4bit_notice() -> None:
    """Keep bitsandbytes' import-time kernel notice from printing until `release_4bit_notice` (idempotent)."""
    global _filter
    if _filter is None:
        _filter = _HoldBack()
        logging.getLogger(BNB_CPU_LOGGER).addFilter(_filter)


def release_4bit_notice() -> None:
    """Stop holding the notice back and emit what was held (once): 4-bit layers are being built."""
    global _filter
    if _filter is None:
        return
    logger = logging.getLogger(BNB_CPU_LOGGER)
    logger.removeFilter(_filter)
    held, _filter = _filter.held, None
    for record in held:
        logger.handle(record)
