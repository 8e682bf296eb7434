"""AdderSR: multiplication-free image super-resolution with adder layers."""

__version__ = "0.1.0"
