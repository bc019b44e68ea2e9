"""bioreactor-mpc: the command line and the composition of the layers below it."""

__version__ = "0.1.0"
