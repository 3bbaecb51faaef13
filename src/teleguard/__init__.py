"""teleguard: slow-thinking call-fraud detectors trained with RL (SAFE-QAQ) and served in real time."""

__version__ = "0.1.0"
