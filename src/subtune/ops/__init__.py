from subtune.ops.sliced import INPUT_COLUMNS, OUTPUT_ROWS, SlicedDeltaLinear, sliced_delta_linear

__all__ = ["INPUT_COLUMNS", "OUTPUT_ROWS", "SlicedDeltaLinear", "sliced_delta_linear"]
