"""mpad: few-shot anomaly detection and segmentation with learned CLIP prompts.

Library code only: importing it does no I/O and reads no params file (the stages in `stages/` do that).
"""

__version__ = "0.1.0"
