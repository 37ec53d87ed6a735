"""Exception groups from libraries whose task groups wrap what crosses them."""

from __future__ import annotations


def sole_exception(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one exception inside nested single-member groups, else None.

    Used where a library's internal task group (coredis's pools, trio-asyncio's
    loop) wraps a single error, so that callers see that error itself.
    """
    while len(group.exceptions) == 1:
        inner = group.exceptions[0]
        if not isinstance(inner, BaseExceptionGroup):
            return inner
        group = inner
    return None
