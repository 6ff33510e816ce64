"""Readable numpy block quantizers: the specification the C kernels are tested against.

Every function here names the ggml function it reproduces byte for byte, and each rounding
quirk is written down where it is reproduced.
"""
