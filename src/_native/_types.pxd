# Shared by the native modules: cdef inline helpers only (STYLE.md: no classes cimported
# across modules). Each module cimports what it needs: `from _types cimport ...`.

cdef inline Py_ssize_t count_arg(object v, str name, Py_ssize_t hi) except -1:
    """A constructor's size argument as an int in [1, hi].

    TypeError (naming the argument) unless it is an integer that is not a bool; ValueError
    if it is out of range.
    """
    cdef Py_ssize_t n
    if isinstance(v, bool):
        raise TypeError(f"{name} must be an int, not bool")
    try:
        n = v.__index__()
    except (AttributeError, TypeError):
        raise TypeError(f"{name} must be an int, not {type(v).__name__}") from None
    except OverflowError:
        raise ValueError(f"{name} must be in 1..{hi}, got {v}") from None
    if not 1 <= n <= hi:
        raise ValueError(f"{name} must be in 1..{hi}, got {n}")
    return n
