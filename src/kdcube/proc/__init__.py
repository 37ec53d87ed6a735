"""The chat processor: claims turns and runs bundles under watchdogs."""

from kdcube.proc.processor import Processor, ProcessorOptions

__all__ = ["Processor", "ProcessorOptions"]
