"""Argument checks shared by the operator Cells: each raises ValueError naming the argument."""


def check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed values: {', '.join(map(repr, allowed))}")
    return value


def check_positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_odd(name, value):
    check_positive_int(name, value)
    if value % 2 == 0:
        raise ValueError(f"{name} must be odd (the kernel needs a centre), got {value}")
    return value


def check_divisible(name, value, divisor_name, divisor):
    if value % divisor != 0:
        raise ValueError(f"{name}={value} must be divisible by {divisor_name}={divisor}")
    return value // divisor


def check_rates(rates):
    if len(tuple(rates)) != 2:
        raise ValueError(f"rates must be a pair (rate1 for attention, rate2 for convolution), got {rates!r}")
    return float(rates[0]), float(rates[1])
