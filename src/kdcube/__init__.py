"""kdcube: a self-hosted runtime for AI chat assistants on structured concurrency.

The public surface for bundle authors is ``kdcube.sdk``; operators use the
``kdcube`` command (``kdcube.cli``).
"""

__version__ = "0.1.0"
