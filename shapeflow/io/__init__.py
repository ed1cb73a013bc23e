"""Files in and out: shapes (`shapes.py`), images (`images.py`, `dicom.py`), what `register` writes (`outputs.py`)."""
from .._files import suffix_of
from .files import IMAGE_SUFFIXES, read, write

__all__ = ["read", "write", "suffix_of", "IMAGE_SUFFIXES"]
