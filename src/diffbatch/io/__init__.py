"""Job input and output: prompts files, init images, PNG + manifest writing, progress."""

from .images import list_images, load_init_image
from .prompts import JobItem, JobSource, read_job
from .writer import OutputWriter, format_parameters, png_name

__all__ = [
    "JobItem", "JobSource", "OutputWriter", "format_parameters", "list_images", "load_init_image",
    "png_name", "read_job",
]
