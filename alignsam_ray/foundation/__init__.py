"""Frozen foundation models: SAM (official checkpoints + the embedded micro-SAM)."""
from ..checksum import file_sha256
from .decoder import SamPromptDecoder
from .encoder import SamImageEncoder
from .sam_models import (
                         SAM_TYPES,
                         CheckpointError,
                         detect_sam_type,
                         load_sam,
                         load_weights,
                         pick_device,
                         read_state_dict,
)

__all__ = ["SAM_TYPES", "CheckpointError", "SamImageEncoder", "SamPromptDecoder", "detect_sam_type",
           "file_sha256", "load_sam", "load_weights", "pick_device", "read_state_dict"]
