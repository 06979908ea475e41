"""Network definitions (Flax NNX, channels-last) whose parameter names mirror the reference libraries."""
