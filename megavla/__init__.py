"""MegaVLA: vision-language-action training with human video as another embodiment."""
__version__ = "0.1.0"
