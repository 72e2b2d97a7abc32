"""watcherd: an OCR hot-folder daemon with a supervised, killable OCR child."""

__version__ = "0.1.0"
